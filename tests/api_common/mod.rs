//! A real server on an ephemeral loopback port with the tiny fixture, for the API tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

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
            vllm_metric_names: false,
        },
        media: MediaPolicy::default(),
        engine: EngineConfig {
            num_kv_blocks: Some(400),
            max_num_seqs: 16,
            ..EngineConfig::default()
        },
        shutdown_timeout: Duration::from_secs(5),
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
    use base64::Engine;
    let bytes = std::fs::read(fixtures().join("images").join(file)).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The HF reference case of `tiny` named `name`.
pub fn reference(name: &str) -> serde_json::Value {
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("refs/tiny.json")).unwrap())
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
