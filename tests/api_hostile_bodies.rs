//! Request bodies an attacker would send: each gets an answer below 500 within seconds, `/health`
//! answers within 2 s all the while, and afterwards HF's greedy answer is still exact with no KV
//! block in use. The body cap is raised above every body here, so each one reaches the parser and
//! the validator rather than stopping at the size check.

mod api_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_common::*;
use serde_json::json;

fn chat(extra: serde_json::Value) -> Vec<u8> {
    let mut body = json!({
        "model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hi"}]
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string().into_bytes()
}

/// The hostile bodies: what each is, where it goes, its bytes.
fn hostile_bodies() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let two_mb = "s".repeat(2 << 20);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut invalid_utf8 = chat(json!({}));
    let at = invalid_utf8.len() - 10;
    invalid_utf8.splice(at..at, [0xff, 0xfe, 0xc3]);
    let chat_path = "/v1/chat/completions";
    vec![
        ("100,000-deep JSON", chat_path, deep.into_bytes()),
        (
            "4 × 2 MB stop strings with n = 16",
            chat_path,
            chat(json!({"n": 16, "stop": [two_mb, two_mb, two_mb, two_mb]})),
        ),
        (
            "a 30 MB completions prompt",
            "/v1/completions",
            json!({"model": MODEL, "max_tokens": 4, "prompt": "word ".repeat(6 << 20)})
                .to_string()
                .into_bytes(),
        ),
        ("invalid UTF-8", chat_path, invalid_utf8),
        (
            "n: 1e400",
            chat_path,
            br#"{"model":"tiny-llava","n":1e400,"messages":[{"role":"user","content":"Hi"}]}"#
                .to_vec(),
        ),
        (
            "max_tokens past u32",
            chat_path,
            chat(json!({"max_tokens": 4_294_967_296u64 * 16})),
        ),
        (
            "temperature -1e308",
            chat_path,
            chat(json!({"temperature": -1e308})),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_a_4xx_while_the_server_keeps_serving() {
    let mut opts = options();
    opts.api.max_body_bytes = 48 << 20;
    let t = start(opts).await;

    // A probe of /health every 100 ms for the whole run; its slowest answer is the figure.
    let done = Arc::new(AtomicBool::new(false));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let probe = {
        let (done, slowest) = (done.clone(), slowest.clone());
        let url = format!("{}/health", t.base);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !done.load(Ordering::Relaxed) {
                let started = Instant::now();
                let status = client
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                assert_eq!(status.ok(), Some(200), "/health did not answer 200");
                let took = started.elapsed();
                {
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    for (what, path, body) in hostile_bodies() {
        let started = Instant::now();
        let response = t
            .client
            .post(format!("{}{path}", t.base))
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status().as_u16();
        let answer: serde_json::Value = response.json().await.unwrap();
        let took = started.elapsed();
        println!(
            "{what}: {status} in {took:?}: {}",
            answer["error"]["message"]
        );
        assert!((400..500).contains(&status), "{what}: {status} {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{what}");
        assert!(took < Duration::from_secs(10), "{what} took {took:?}");
    }

    done.store(true, Ordering::Relaxed);
    probe.await.unwrap();
    let slowest = *slowest.lock().unwrap();
    println!("slowest /health answer meanwhile: {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "/health took {slowest:?}");
    assert_still_exact(&t).await;
}
