//! Requests refused from their shape alone, before any image is fetched or any text tokenized (each
//! gets a 400 that names the limit, quickly, and the server goes on serving exact answers), and
//! prefix-cache salts that keep tenants from seeing each other's cached prompts.

mod api_common;

use std::time::{Duration, Instant};

use api_common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_fit_is_refused_before_preparation() {
    let t = start(options()).await;
    // Three images of 576 tokens and 3,000 tokens to generate cannot fit 4,096. The images are not
    // images at all: had they been decoded, the error would say so instead.
    let garbage = "data:image/png;base64,AAAA";
    let parts: Vec<_> = (0..3)
        .map(|_| json!({"type": "image_url", "image_url": {"url": garbage}}))
        .chain([json!({"type": "text", "text": "Compare them."})])
        .collect();
    let body = json!({
        "model": MODEL, "max_tokens": 3000,
        "messages": [{"role": "user", "content": parts}]
    });
    let (status, answer) = post(&t, "/v1/chat/completions", &body).await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("exceed the context of 4096"), "{message}");
    assert!(message.contains("3 images of 576 tokens"), "{message}");

    // 3 MB of text is far more tokens than the context holds, whatever it says: refused untokenized.
    let long = "llamas ".repeat(3 << 20 >> 3);
    let started = Instant::now();
    let (status, answer) = post(
        &t,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": long, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exceed the context"),
        "{answer}"
    );

    // A stop sequence longer than the cap.
    let (status, answer) = post(
        &t,
        "/v1/chat/completions",
        &image_chat(json!({"stop": ["x".repeat(2048)], "n": 16})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "stop");

    let (status, answer) = post(&t, "/v1/chat/completions", &image_chat(json!({}))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        reference("chat_template")["greedy"]["text"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_fits_the_bound_but_not_the_context_is_still_refused() {
    // The early bound is a lower bound only: text that tokenizes long is caught after tokenizing.
    let t = start(options()).await;
    let prompt = "a ".repeat(5000);
    let (status, answer) = post(
        &t,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("exceed the context of 4096"), "{message}");
}

fn cached(body: &serde_json::Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_salts_keep_tenants_out_of_each_others_prefix_cache() {
    let mut opts = options();
    opts.api.api_keys = vec!["key-a".into(), "key-b".into()];
    opts.api.prefix_cache_salt_per_api_key = true;
    let t = start(opts).await;
    let ask = |key: &'static str, extra: serde_json::Value| {
        let client = t.client.clone();
        let url = format!("{}/v1/chat/completions", t.base);
        async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&image_chat(extra))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let want = reference("chat_template")["greedy"]["text"].clone();
    let first = ask("key-a", json!({})).await;
    assert_eq!(first["choices"][0]["message"]["content"], want);
    assert_eq!(cached(&first), 0);
    // Same key: the image prompt's blocks are found again.
    assert!(cached(&ask("key-a", json!({})).await) >= 576);
    // Another key sees nothing of them, and its answer is the same.
    let other = ask("key-b", json!({})).await;
    assert_eq!(cached(&other), 0);
    assert_eq!(other["choices"][0]["message"]["content"], want);
    // Within one key, a request's own `cache_salt` separates it again.
    assert_eq!(cached(&ask("key-a", json!({"cache_salt": "s1"})).await), 0);
    assert!(cached(&ask("key-a", json!({"cache_salt": "s1"})).await) >= 576);
    let (status, body) = {
        let r = t
            .client
            .post(format!("{}/v1/chat/completions", t.base))
            .bearer_auth("key-a")
            .json(&image_chat(json!({"cache_salt": ""})))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "cache_salt");
}
