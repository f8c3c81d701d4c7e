//! OpenAI-shaped messages through the checkpoint's chat template give the prompts HF rendered for the
//! reference cases (tiny's `chat_template` case, tiny_gqa's `chat_messages`).

mod common;

use common::{hf_messages, ids, Fixture};
use llava_server::frontend::{ChatMessage, MessagePart, Role};

#[test]
fn reference_conversations_render_and_tokenize_like_hf() {
    let tiny = Fixture::load("tiny");
    let case = tiny.case("chat_template");
    // The tiny case's conversation: one user message, the image then the question.
    let messages = vec![ChatMessage {
        role: Role::User,
        parts: vec![
            MessagePart::Image,
            MessagePart::Text("What is in the picture?".into()),
        ],
    }];
    let text = tiny.builder.render(&messages).unwrap();
    assert_eq!(text, case["prompt"].as_str().unwrap());
    let prompt = tiny.builder.build(&messages, tiny.images(case)).unwrap();
    assert_eq!(prompt.token_ids, ids(&case["input_ids"]));

    let gqa = Fixture::load("tiny_gqa");
    for case in gqa
        .cases()
        .iter()
        .filter(|c| c.get("chat_messages").is_some())
    {
        let messages = hf_messages(&case["chat_messages"]);
        assert_eq!(
            gqa.builder.render(&messages).unwrap(),
            case["prompt"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        let prompt = gqa.builder.build(&messages, gqa.images(case)).unwrap();
        assert_eq!(
            prompt.token_ids,
            ids(&case["input_ids"]),
            "{}",
            case["name"]
        );
        assert_eq!(prompt.image_spans.len(), prompt.images.len());
    }
}

#[test]
fn template_places_images_first_and_system_without_prefix() {
    // Facts of the llava-hf template recorded with the fixtures (tests/fixtures/README.md).
    let tiny = Fixture::load("tiny");
    let messages = vec![
        ChatMessage {
            role: Role::System,
            parts: vec![MessagePart::Text("Be brief.".into())],
        },
        ChatMessage {
            role: Role::User,
            parts: vec![MessagePart::Text("Look:".into()), MessagePart::Image],
        },
        ChatMessage {
            role: Role::Assistant,
            parts: vec![MessagePart::Text("A scene.".into())],
        },
        ChatMessage {
            role: Role::User,
            parts: vec![MessagePart::Text("More?".into())],
        },
    ];
    assert_eq!(
        tiny.builder.render(&messages).unwrap(),
        "Be brief. USER: <image>\nLook: ASSISTANT: A scene. USER: More? ASSISTANT:"
    );
}
