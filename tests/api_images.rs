//! Images through the HTTP API: JPEG photos get HF's greedy answers, hostile images get a 400 within
//! seconds while the server keeps serving, and a fault inside an engine step fails only that step's
//! requests (repeated faults stop the server with `/health` at 503).

mod api_common;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use api_common::*;
use common::hostile;
use llava_server::engine::handle::StepFaultHook;
use serde_json::{json, Value};

fn jpeg_refs() -> Value {
    let text = std::fs::read_to_string(fixtures().join("refs/jpeg.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg_photos_get_hfs_greedy_answers() {
    let t = start(options()).await;
    let refs = jpeg_refs();
    let question = refs["question"].as_str().unwrap();
    // Cases whose greedy steps are decided by a clear logit margin: below it, float rounding of two
    // implementations may legitimately pick the other token.
    let cases: Vec<&Value> = refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["greedy"]["min_gap"].as_f64().unwrap() >= 0.005)
        .collect();
    assert!(cases.len() >= 6, "{} cases", cases.len());
    for case in cases {
        let url = data_uri(case["file"].as_str().unwrap());
        let (status, body) =
            post(&t, "/v1/chat/completions", &chat_with_image(&url, question)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"], case["greedy"]["text"],
            "{}",
            case["name"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_get_a_400_and_the_server_keeps_serving() {
    let t = start(options()).await;
    let jpeg = std::fs::read(fixtures().join("images/jpeg/photo_422_q90.jpg")).unwrap();
    let hostile = [
        (
            "wide strip",
            data_uri_of(&hostile::flat_png(1_000_000, 1), "image/png"),
        ),
        (
            "tall strip",
            data_uri_of(&hostile::flat_png(1, 400_000), "image/png"),
        ),
        (
            "GIF frame past its screen",
            data_uri_of(&hostile::gif_with_oversized_frame(), "image/gif"),
        ),
        (
            "truncated JPEG",
            data_uri_of(&jpeg[..jpeg.len() / 3], "image/jpeg"),
        ),
        ("not an image", data_uri_of(b"GIF89a\x01\x00", "image/gif")),
    ];
    for (what, url) in &hostile {
        let started = Instant::now();
        let (status, body) = post(
            &t,
            "/v1/chat/completions",
            &chat_with_image(url, "What is this?"),
        )
        .await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{what}");
        assert_eq!(health_status(&t).await, 200, "{what}");
    }
    assert_still_exact(&t).await;
}

/// The seed that makes `faulty_server`'s engine fail a step.
const POISON: u64 = 4242;

/// A server whose engine panics inside any step that holds a request seeded with `POISON`.
async fn faulty_server() -> TestServer {
    let mut opts = options();
    opts.engine.fault_hook = Some(StepFaultHook(Arc::new(|params| {
        params.iter().any(|p| p.seed == Some(POISON))
    })));
    start(opts).await
}

fn poisoned() -> Value {
    image_chat(json!({ "seed": POISON }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_step_fails_its_request_with_a_clean_500_and_the_engine_goes_on() {
    let t = faulty_server().await;
    let (status, body) = post(&t, "/v1/chat/completions", &poisoned()).await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    // Generic text and an id; what failed inside stays in the log.
    assert!(message.contains("error id"), "{message}");
    assert!(
        !message.contains("panic") && !message.contains("injected"),
        "{message}"
    );
    assert_eq!(health_status(&t).await, 200);
    // Streamed, the fault arrives as an error frame, not a dropped connection.
    let mut streamed = poisoned();
    streamed["stream"] = json!(true);
    let r = t
        .client
        .post(format!("{}/v1/chat/completions", t.base))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        sse_data(&text).iter().any(|d| d.contains("server_error")),
        "{text}"
    );
    // Two faults, then a good step: the count of faults in a row starts again.
    assert_still_exact(&t).await;
    let (status, _) = post(&t, "/v1/chat/completions", &poisoned()).await;
    assert_eq!(status, 500);
    assert_still_exact(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_faults_stop_the_engine_and_the_server_says_so() {
    let t = faulty_server().await;
    for _ in 0..3 {
        let (status, body) = post(&t, "/v1/chat/completions", &poisoned()).await;
        assert_eq!(status, 500, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = t.client.get(format!("{}/health", t.base)).send().await;
        match health {
            Ok(r) if r.status() == 503 => break,
            // The server may already have stopped listening: that is the other half of the contract.
            Err(_) => break,
            _ => assert!(Instant::now() < deadline, "/health never turned 503"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), t.server.task)
        .await
        .expect("the server stops by itself")
        .unwrap();
    let err = ended.unwrap_err().to_string();
    assert!(err.contains("engine stopped"), "{err}");
}
