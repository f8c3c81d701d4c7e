//! The HTTP API end to end on a real server: HF's greedy text through OpenAI's shapes, streaming equal
//! to whole answers, usage, every error case with its status and error object, and disconnects.

mod api_common;

use api_common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn assert_error(body: &Value, kind: &str, param: Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(e["type"], kind, "{body}");
    match param {
        Some(p) => assert_eq!(e["param"], p, "{body}"),
        None => assert!(e.get("param").is_some(), "param key present: {body}"),
    }
    assert!(e.get("code").is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_matches_hf_and_streaming_matches_whole() {
    let t = start(options()).await;
    let want = reference("chat_template");
    let (status, body) = post(&t, "/v1/chat/completions", &image_chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert!(body["system_fingerprint"].is_string());
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], want["greedy"]["text"]);
    assert_eq!(choice["finish_reason"], "length");
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], want["num_input_ids"]);
    assert_eq!(usage["completion_tokens"], 16);
    assert_eq!(
        usage["total_tokens"],
        want["num_input_ids"].as_u64().unwrap() + 16
    );
    assert_eq!(usage["prompt_tokens_details"]["image_tokens"], 576);
    // The details break `prompt_tokens` down: 594 = 576 image tokens + 18 of text (HF's counts),
    // the text also under vLLM-style clients' name for it.
    assert_eq!(usage["prompt_tokens_details"]["text_tokens"], 18);
    assert_eq!(usage["prompt_tokens_details"]["prompt_tokens"], 18);

    // Streamed: role first, then content deltas, a finish chunk, usage, [DONE].
    let body = image_chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let r = t
        .client
        .post(format!("{}/v1/chat/completions", t.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let frames = sse_data(&r.text().await.unwrap());
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want["greedy"]["text"].as_str().unwrap());
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 16);
    assert_eq!(last["usage"]["prompt_tokens_details"]["image_tokens"], 576);
    // The second request found the first one's blocks in the prefix cache.
    assert!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 576
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_completion_and_string_content_match_hf() {
    let t = start(options()).await;
    let want = reference("text_only");
    // /v1/completions takes the rendered prompt as text.
    let (status, body) = post(
        &t,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": want["prompt"], "max_tokens": 16, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], want["greedy"]["text"]);
    // Chat with plain-string content renders the same prompt.
    let (status, body) = post(
        &t,
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 16, "temperature": 0, "ignore_eos": true,
                "messages": [{"role": "user", "content": "Write a haiku about llamas."}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        want["greedy"]["text"]
    );
    assert_eq!(body["usage"]["prompt_tokens"], want["num_input_ids"]);
    assert_eq!(body["usage"]["prompt_tokens_details"]["image_tokens"], 0);

    // A stop string cuts the text (and is not included); n = 2 greedy choices agree.
    let full = want["greedy"]["text"].as_str().unwrap();
    let stop = &full[10..16];
    let (status, body) = post(
        &t,
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 16, "temperature": 0, "n": 2, "stop": stop,
                "messages": [{"role": "user", "content": "Write a haiku about llamas."}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for i in 0..2 {
        assert_eq!(
            body["choices"][i]["message"]["content"],
            full[..full.find(stop).unwrap()]
        );
        assert_eq!(body["choices"][i]["finish_reason"], "stop");
    }

    // Logprobs: the chosen tokens' log-probabilities, with alternatives.
    let (status, body) = post(
        &t,
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 3, "temperature": 0, "logprobs": true, "top_logprobs": 2,
                "messages": [{"role": "user", "content": "Write a haiku about llamas."}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 3);
    for entry in content {
        let lp = entry["logprob"].as_f64().unwrap();
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(lp <= 0.0);
    }

    let models = get_json(&t, "/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_openai_error_object() {
    let mut opts = options();
    opts.api.api_keys = vec!["secret-key".into()];
    opts.api.max_body_bytes = 64 << 10;
    let t = start(opts).await;
    let url = format!("{}/v1/chat/completions", t.base);
    let send = |body: Value, key: Option<&str>| {
        let mut r = t.client.post(url.clone()).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            (status, headers, r.json::<Value>().await.unwrap())
        }
    };
    let text = |extra: Value| {
        let mut b = json!({"model": MODEL, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let key = Some("secret-key");

    let (s, _, b) = send(text(json!({})), None).await;
    assert_eq!(s, 401);
    assert_error(&b, "authentication_error", None);
    let (s, _, b) = send(text(json!({})), Some("secret-kez")).await;
    assert_eq!(s, 401, "{b}");
    // Health and metrics stay open.
    for open in ["/health", "/metrics"] {
        let r = t
            .client
            .get(format!("{}{open}", t.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }

    let (s, _, b) = send(text(json!({})), key).await;
    assert_eq!(s, 200, "{b}");

    let (s, _, b) = send(text(json!({"temperature": 5})), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("temperature"));
    let (s, _, b) = send(text(json!({"max_tokens": "many"})), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("max_tokens"));
    let (s, _, b) = send(text(json!({"n": 0})), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("n"));
    let (s, _, b) = send(text(json!({"stop": ["a", "b", "c", "d", "e"]})), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("stop"));
    let (s, _, b) = send(text(json!({"logit_bias": {"999999": 1}})), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("logit_bias"));
    let (s, _, b) = send(json!([1, 2, 3]), key).await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected struct"),
        "{b}"
    );
    let (s, _, b) = send(json!({"model": MODEL, "messages": []}), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("messages"));
    let (s, _, b) = send(
        json!({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}),
        key,
    )
    .await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("messages[0].role"));

    let (s, _, b) = send(text(json!({"model": "gpt-17"})), key).await;
    assert_eq!(s, 404);
    assert_error(&b, "not_found_error", Some("model"));

    // Prompt + max_tokens over the 4096-token context.
    let (s, _, b) = send(text(json!({"max_tokens": 5000})), key).await;
    assert_eq!(s, 400);
    assert_error(&b, "invalid_request_error", Some("max_tokens"));

    // A body over --max-body-bytes.
    let big = "x".repeat(100 << 10);
    let (s, _, b) = send(text(json!({"user": big})), key).await;
    assert_eq!(s, 413);
    assert_error(&b, "invalid_request_error", None);

    // An undecodable image and a refused URL are 400s naming the problem.
    let bad_image = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
        {"type": "text", "text": "?"}]}]});
    let (s, _, b) = send(bad_image, key).await;
    assert_eq!(s, 400, "{b}");
    assert_error(&b, "invalid_request_error", Some("messages"));
    let local = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": format!("{}/health", t.base)}},
        {"type": "text", "text": "?"}]}]});
    let (s, _, b) = send(local, key).await;
    assert_eq!(s, 400, "{b}");
    // The refusal says why but names no address: what hosts resolve to is the server's business.
    let message = b["error"]["message"].as_str().unwrap();
    assert!(message.contains("private or local address"), "{b}");
    assert!(!message.contains("127.0.0.1"), "{b}");

    // Shutting down: new work is refused with 503.
    t.server.state.model.get().unwrap().engine.shutdown();
    let (s, _, b) = send(text(json!({})), key).await;
    assert_eq!(s, 503, "{b}");
    assert_error(&b, "service_unavailable_error", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let mut opts = options();
    opts.api.max_running_requests = 1;
    opts.api.max_queued_requests = 0;
    let t = start(opts).await;
    // One long request occupies the only place.
    let long = json!({"model": MODEL, "max_tokens": 3000, "ignore_eos": true, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let busy = t
        .client
        .post(format!("{}/v1/chat/completions", t.base))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 200);
    let r = t
        .client
        .post(format!("{}/v1/chat/completions", t.base))
        .json(&json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let b: Value = r.json().await.unwrap();
    assert_error(&b, "rate_limit_error", None);
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_mid_stream_frees_its_blocks() {
    let t = start(options()).await;
    let metrics = || async {
        t.client
            .get(format!("{}/metrics", t.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let body = image_chat(json!({"stream": true, "max_tokens": 3000, "ignore_eos": true}));
    let mut r = t
        .client
        .post(format!("{}/v1/chat/completions", t.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    // Read until the first content arrives: the request is decoding.
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    let during = metrics().await;
    assert!(
        metric(&during, "llava_kv_cache_used_blocks").unwrap() > 0.0,
        "{during}"
    );
    drop(r);
    let mut last = String::new();
    for _ in 0..500 {
        last = metrics().await;
        if metric(&last, "llava_kv_cache_used_blocks") == Some(0.0)
            && metric(&last, "llava_num_requests_running") == Some(0.0)
        {
            assert_eq!(metric(&last, "llava_kv_cache_capacity_blocks"), Some(400.0));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("blocks were not freed after the disconnect:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_loaded() {
    use llava_server::api::state::AppState;
    use llava_server::frontend::media::MediaFetcher;
    let opts = options();
    let state = std::sync::Arc::new(AppState::new(
        opts.api,
        MediaFetcher::new(opts.media).unwrap(),
    ));
    let app = llava_server::api::router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let r = client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let docs = client
        .get(format!("http://{addr}/docs/"))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger"));
}

#[test]
fn checked_in_openapi_document_is_current() {
    let current = llava_server::api::openapi::openapi_json();
    let path = fixtures().join("../../openapi/openapi.json");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        current.trim() == checked_in.trim(),
        "openapi/openapi.json is stale: run `cargo run -- print-openapi > openapi/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&current).unwrap();
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]
        .get("ChatCompletionChunk")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_without_streaming_aborts_the_request() {
    use tokio::io::AsyncWriteExt;
    let t = start(options()).await;
    let body = json!({"model": MODEL, "max_tokens": 3000, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut socket = tokio::net::TcpStream::connect(t.server.addr).await.unwrap();
    let request = raw_json_post("/v1/chat/completions", &body);
    socket.write_all(request.as_bytes()).await.unwrap();
    let engine = &t.server.state.model.get().unwrap().engine;
    for _ in 0..500 {
        if engine.metrics().generated_tokens > 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(engine.metrics().kv_blocks_used > 0);
    drop(socket);
    for _ in 0..500 {
        let m = engine.metrics();
        if m.kv_blocks_used == 0 && m.running == 0 {
            assert!(
                m.generated_tokens < 3000,
                "the request ran to its end: {m:?}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the request was not aborted: {:?}", engine.metrics());
}
