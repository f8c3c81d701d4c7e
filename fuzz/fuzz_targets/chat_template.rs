//! Fuzzed conversations (roles, texts, image placements) → the tiny checkpoint's chat template →
//! tokenization with image placeholders. Checks that every `<image>` the template writes becomes
//! exactly one placeholder run of `features_per_image` image tokens.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llava_server::frontend::{ChatMessage, FrontendError, MessagePart, PromptBuilder, Role};
use llava_server::model::LlavaConfig;
use llava_server::types::ProcessedImage;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny");
const IMAGE_TOKEN: &str = "<image>";

fn builder() -> &'static (PromptBuilder, u32) {
    static B: OnceLock<(PromptBuilder, u32)> = OnceLock::new();
    B.get_or_init(|| {
        let dir = Path::new(DIR);
        let config = LlavaConfig::from_file(&dir.join("config.json")).expect("fixture config");
        let builder = PromptBuilder::from_checkpoint(dir, &config).expect("fixture checkpoint");
        (builder, config.image_token_id)
    })
}

fn role(name: &str) -> Role {
    match name {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => [Role::System, Role::User, Role::Assistant][other.len() % 3],
    }
}

fn dummy_image() -> ProcessedImage {
    ProcessedImage {
        pixel_values: Vec::new(),
        channels: 3,
        height: 0,
        width: 0,
        content_hash: [0; 32],
    }
}

// A message is a role and its parts in order; `None` is an image, `Some` a text.
fuzz_target!(|conversation: Vec<(String, Vec<Option<String>>)>| {
    let (builder, image_id) = builder();
    let messages: Vec<ChatMessage> = conversation
        .into_iter()
        .map(|(name, parts)| ChatMessage {
            role: role(&name),
            parts: parts
                .into_iter()
                .map(|p| p.map_or(MessagePart::Image, MessagePart::Text))
                .collect(),
        })
        .collect();
    let text = match builder.render(&messages) {
        Ok(text) => text,
        Err(e) => panic!("rendering failed: {e}"),
    };
    let written = text.matches(IMAGE_TOKEN).count();
    let images = messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter(|p| matches!(p, MessagePart::Image))
        .count();
    let texts_mention = messages.iter().flat_map(|m| &m.parts).any(|p| match p {
        MessagePart::Text(t) => t.contains(IMAGE_TOKEN),
        MessagePart::Image => false,
    });
    if !texts_mention {
        assert_eq!(
            written, images,
            "the template wrote {written} image tokens for {images} images"
        );
    }
    let images: Vec<ProcessedImage> = (0..written).map(|_| dummy_image()).collect();
    match builder.tokenize(&text, images) {
        Ok(prompt) => {
            let per = builder.features_per_image();
            assert_eq!(prompt.image_spans.len(), written);
            assert_eq!(prompt.images.len(), written);
            let image_tokens = prompt.token_ids.iter().filter(|&&t| t == *image_id).count();
            assert_eq!(image_tokens, written * per);
            for span in &prompt.image_spans {
                assert_eq!(span.len, per);
                assert!(prompt.token_ids[span.start..span.start + span.len]
                    .iter()
                    .all(|&t| t == *image_id));
            }
        }
        Err(FrontendError::ImageCountMismatch {
            placeholders,
            images,
        }) => panic!("{placeholders} placeholders for the {images} `<image>` in {text:?}"),
        Err(e) => panic!("tokenizing failed: {e}"),
    }
});
