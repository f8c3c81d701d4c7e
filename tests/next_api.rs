//! LLaVA-NeXT through the HTTP API: HF's greedy answers for one and two images (whole and streamed),
//! usage counting each image's own tokens, LLaVA-NeXT and text-only requests batched in one engine,
//! and `/tokenize` refusing images whose counts it cannot know without fetching them.

mod api_common;

use api_common::*;
use serde_json::{json, Value};

fn next_options() -> llava_server::api::server::ServeOptions {
    let mut opts = options();
    opts.model = fixtures()
        .join("tiny_next_mistral")
        .to_str()
        .unwrap()
        .to_owned();
    opts
}

fn case(name: &str) -> Value {
    reference_case("tiny_next_mistral", name)
}

/// The case as an OpenAI request: its messages with each `{"type": "image"}` part in turn replaced
/// by the case's next image as a data URI.
fn request(case: &Value, extra: Value) -> Value {
    let mut images = case["images"].as_array().unwrap().iter();
    let messages: Vec<Value> = case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let content: Vec<Value> = m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "image" => json!({"type": "image_url",
                        "image_url": {"url": data_uri(images.next().unwrap().as_str().unwrap())}}),
                    _ => p.clone(),
                })
                .collect();
            json!({"role": m["role"], "content": content})
        })
        .collect();
    let mut body = json!({"model": MODEL, "temperature": 0, "max_tokens": 16,
        "ignore_eos": true, "messages": messages});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_and_usage_are_hfs_whole_and_streamed() {
    let t = start(next_options()).await;
    for name in ["landscape", "two_images", "multi_turn", "tiny"] {
        let want = case(name);
        let (status, body) = post(&t, "/v1/chat/completions", &request(&want, json!({}))).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"], want["greedy"]["text"],
            "{name}"
        );
        assert_eq!(
            body["usage"]["prompt_tokens"], want["num_input_ids"],
            "{name}"
        );
        let image_tokens: u64 = want["num_image_tokens_per_image"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(
            body["usage"]["prompt_tokens_details"]["image_tokens"], image_tokens,
            "{name}"
        );

        let streamed = post_for_text(
            &t,
            "/v1/chat/completions",
            &request(&want, json!({"stream": true})),
        )
        .await;
        let text: String = sse_data(&streamed)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(
            text,
            want["greedy"]["text"].as_str().unwrap(),
            "{name}: streamed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_and_text_requests_share_batches() {
    // Sent at once, so that the engine batches the prefills and decodes of both kinds.
    let t = start(next_options()).await;
    let cases = ["landscape", "two_images", "text_only", "strip", "tall"].map(case);
    let bodies: Vec<Value> = cases.iter().map(|c| request(c, json!({}))).collect();
    let answers =
        futures_util::future::join_all(bodies.iter().map(|b| post(&t, "/v1/chat/completions", b)))
            .await;
    for (want, (status, body)) in cases.iter().zip(answers) {
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"], want["greedy"]["text"],
            "{}",
            want["name"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_refuses_images_it_cannot_count() {
    let t = start(next_options()).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri("scene_336x336.png")}},
        {"type": "text", "text": "Hi"}]}]});
    let (status, answer) = post(&t, "/tokenize", &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/tokenize does not fetch images"));
    let text = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    let (status, answer) = post(&t, "/tokenize", &text).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_that_cannot_fit_are_refused_from_their_headers() {
    // A 640×480 image is 70 tokens here: with `max_tokens` leaving room for 60 prompt tokens, the
    // request is refused from the header alone — the PNG is cut after its header, so decoding it
    // would have failed with another error.
    let t = start(next_options()).await;
    let models = get_json(&t, "/v1/models").await;
    let context = models["data"][0]["max_model_len"].as_u64().unwrap();
    let png = std::fs::read(fixtures().join("images/scene_640x480.png")).unwrap();
    let body = json!({"model": MODEL, "max_tokens": context - 60, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri_of(&png[..200], "image/png")}},
        {"type": "text", "text": "Hi"}]}]});
    let (status, answer) = post(&t, "/v1/chat/completions", &body).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("images of [70] tokens"), "{message}");
    assert_eq!(answer["error"]["param"], "max_tokens", "{answer}");
}
