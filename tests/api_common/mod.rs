//! A real server on an ephemeral loopback port with the tiny fixture, for the API tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use llava_server::api::server::{spawn, RunningServer, ServeOptions};
use llava_server::api::state::ApiConfig;
use llava_server::engine::EngineConfig;
use llava_server::frontend::media::MediaPolicy;

pub const MODEL: &str = "tiny-llava";

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn options() -> ServeOptions {
    ServeOptions {
        model: fixtures().join("tiny").to_str().unwrap().to_owned(),
        load_format: llava_server::model::LoadFormat::Auto,
        dtype: "f32".into(),
        cpu_f16_weights: false,
        original: Default::default(),
        device: "cpu".into(),
        host: "127.0.0.1".into(),
        port: 0,
        api: ApiConfig {
            served_model_name: MODEL.into(),
            api_keys: vec![],
            max_body_bytes: 4 << 20,
            max_images_per_request: 4,
            max_queued_requests: 64,
            max_running_requests: 16,
            max_concurrent_preparations: 2,
            prefix_cache_salt_per_api_key: false,
            vllm_metric_names: false,
            allowed_origins: vec!["*".into()],
        },
        media: MediaPolicy::default(),
        engine: EngineConfig {
            num_kv_blocks: Some(400),
            max_num_seqs: 16,
            ..EngineConfig::default()
        },
        shutdown_timeout: Duration::from_secs(5),
        max_connections: 256,
        write_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(30),
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub base: String,
    pub client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts a server and waits (bounded) until `/health` says the model is loaded.
pub async fn start(opts: ServeOptions) -> TestServer {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = spawn(opts, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    for _ in 0..600 {
        let r = client.get(format!("{base}/health")).send().await.unwrap();
        if r.status() == 200 {
            return TestServer {
                server,
                base,
                client,
                _stop: stop,
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the server never became healthy");
}

pub fn data_uri(file: &str) -> String {
    let bytes = std::fs::read(fixtures().join("images").join(file)).unwrap();
    let mime = if file.ends_with(".jpg") {
        "image/jpeg"
    } else {
        "image/png"
    };
    data_uri_of(&bytes, mime)
}

pub fn data_uri_of(bytes: &[u8], mime: &str) -> String {
    use base64::Engine;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A greedy chat request: one image by URL, then `question`.
pub fn chat_with_image(url: &str, question: &str) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "temperature": 0,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": question}
        ]}]
    })
}

/// The HF reference case of `tiny` named `name`.
pub fn reference(name: &str) -> serde_json::Value {
    reference_case("tiny", name)
}

/// The case `name` of `refs/{refs}.json`.
pub fn reference_case(refs: &str, name: &str) -> serde_json::Value {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("refs/{refs}.json"))).unwrap(),
    )
    .unwrap();
    refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

/// The `chat_template` reference case as an OpenAI request: one image by data URI, then the question.
pub fn image_chat(extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": MODEL,
        "temperature": 0,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri("scene_640x480.png"), "detail": "auto"}},
            {"type": "text", "text": "What is in the picture?"}
        ]}]
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The value of the first Prometheus sample of `name` (any labels: `name{...} value` or `name value`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    metric_where(text, name, "")
}

/// The value of the first sample of `name` whose label set contains `labels` (e.g. `status="200"`).
pub fn metric_where(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (label_set, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            label_set.contains(labels).then_some(value)
        })
        .and_then(|v| v.trim().parse().ok())
}

/// GETs `path`; the JSON answer.
pub async fn get_json(t: &TestServer, path: &str) -> serde_json::Value {
    t.client
        .get(format!("{}{path}", t.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// POSTs `body` as JSON; the status and the JSON answer.
pub async fn post(
    t: &TestServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = send_json(t, path, body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn send_json(t: &TestServer, path: &str, body: &serde_json::Value) -> reqwest::Response {
    t.client
        .post(format!("{}{path}", t.base))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// POSTs `body` as JSON; the answer's body as text (an SSE stream read to its end).
pub async fn post_for_text(t: &TestServer, path: &str, body: &serde_json::Value) -> String {
    send_json(t, path, body).await.text().await.unwrap()
}

/// The status `/health` answers now.
pub async fn health_status(t: &TestServer) -> u16 {
    let url = format!("{}/health", t.base);
    t.client.get(url).send().await.unwrap().status().as_u16()
}

/// A `serve` process on an ephemeral port, and that port (read from its start-up line).
pub fn spawn_server(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava-server"))
        .args(["serve", "--model"])
        .arg(fixtures().join("tiny"))
        .args(["--port", "0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = stderr
        .by_ref()
        .find_map(|line| {
            line.unwrap()
                .strip_prefix("llava-server listening on ")
                .map(|url| url.trim().to_owned())
        })
        .expect("the server printed its address");
    // Keep reading its log, as a supervisor would: a closed pipe is not what is under test.
    std::thread::spawn(move || stderr.for_each(drop));
    (child, base)
}

/// Waits (bounded) until a server at `base` answers `/health` with 200.
pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client
        .get(format!("{base}/health"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(std::time::Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The bytes of an HTTP/1.1 JSON POST, for tests that drive a raw socket (to stall or drop it).
pub fn raw_json_post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// KV blocks in use now.
pub async fn kv_blocks_used(t: &TestServer) -> u64 {
    // The engine publishes its gauges after each step; give the last one a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.server
        .state
        .model
        .get()
        .unwrap()
        .engine
        .metrics()
        .kv_blocks_used
}

/// HF's greedy answer to the reference image chat is still exact, and no KV block is left in use.
pub async fn assert_still_exact(t: &TestServer) {
    let (status, body) = post(t, "/v1/chat/completions", &image_chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reference("chat_template")["greedy"]["text"]
    );
    assert_eq!(kv_blocks_used(t).await, 0);
}
