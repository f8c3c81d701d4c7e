//! `/tokenize` and `/detokenize` in vLLM's shapes: chat messages with an image give HF's expanded
//! input ids (576 image tokens), prompts HF's ids, and ids decode as HF's tokenizer decodes them
//! with special tokens kept. Expected values: the fixture's HF reference (`chat_template`) and HF
//! tokenizers 0.23.3 on this tokenizer.json.

mod api_common;

use api_common::*;
use serde_json::{json, Value};

async fn call(t: &TestServer, path: &str, body: Value) -> (u16, Value) {
    post(t, path, &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_tokenize_to_hfs_expanded_input_ids() {
    let t = start(options()).await;
    let reference = reference("chat_template");
    let messages = image_chat(json!({}))["messages"].clone();
    let (status, body) = call(
        &t,
        "/tokenize",
        json!({"model": MODEL, "messages": messages, "return_token_strs": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens"], reference["input_ids"]);
    assert_eq!(body["count"], 594);
    assert_eq!(body["max_model_len"], 4096);
    let strs: Vec<&str> = body["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(&strs[..5], ["<s>", "▁US", "ER", ":", "▁"]);
    assert_eq!(strs.iter().filter(|&&s| s == "<image>").count(), 576);

    // A prompt: BOS added unless asked not to.
    let (_, body) = call(
        &t,
        "/tokenize",
        json!({"prompt": "What is in the picture?"}),
    )
    .await;
    assert_eq!(body["tokens"], json!([1, 1724, 338, 297, 278, 7623, 29973]));
    assert_eq!(body["token_strs"], Value::Null);
    let (_, body) = call(
        &t,
        "/tokenize",
        json!({"prompt": "What is in the picture?", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(body["tokens"], json!([1724, 338, 297, 278, 7623, 29973]));

    let (status, body) = call(
        &t,
        "/detokenize",
        json!({"model": MODEL, "tokens": [1, 1724, 338, 297, 278, 7623, 29973, 32000, 2]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["prompt"], "<s> What is in the picture?<image></s>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokenize_requests_get_a_400() {
    let t = start(options()).await;
    let messages = json!([{"role": "user", "content": "Hi"}]);
    for (path, body, param) in [
        ("/tokenize", json!({}), Value::Null),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": messages}),
            Value::Null,
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "add_generation_prompt": true}),
            json!("add_generation_prompt"),
        ),
        ("/detokenize", json!({"tokens": [32064]}), json!("tokens")),
        ("/detokenize", json!({"tokens": [-1]}), json!("tokens[0]")),
    ] {
        let (status, answer) = call(&t, path, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
    let (status, _) = call(&t, "/tokenize", json!({"model": "other", "prompt": "a"})).await;
    assert_eq!(status, 404);
}
