//! Fields at the validation boundary: what OpenAI defines and the server does not implement gets a
//! 400 naming it (never a 200 that ignored it), unknown extra fields are ignored as OpenAI ignores
//! them, integral floats are integers (as JSON Schema reads them), fractions are checked before they
//! are narrowed to f32, and the context is the least of positions, KV cache and `--max-model-len`.

mod api_common;

use api_common::*;
use serde_json::{json, Value};

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "max_tokens": 2, "temperature": 0,
                          "messages": [{"role": "user", "content": "Hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "max_tokens": 2, "temperature": 0, "prompt": "Hi"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn refused(t: &TestServer, path: &str, body: Value, field: &str) {
    let (status, answer) = post(t, path, &body).await;
    assert_eq!(status, 400, "{field}: {answer}");
    assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
    assert_eq!(answer["error"]["param"], field, "{answer}");
}

async fn accepted(t: &TestServer, path: &str, body: Value) {
    let (status, answer) = post(t, path, &body).await;
    assert_eq!(status, 200, "{body}: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_fields_are_refused_by_name_and_unknown_ones_ignored() {
    let t = start(options()).await;
    let chats = "/v1/chat/completions";
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for (field, value) in [
        ("tools", tool),
        ("tool_choice", json!("required")),
        ("parallel_tool_calls", json!(true)),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("modalities", json!(["text", "audio"])),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("web_search_options", json!({})),
        ("reasoning_effort", json!("low")),
        // Served (tests/api_structured_outputs.rs), but only in OpenAI's shapes.
        ("response_format", json!({"type": "yaml"})),
        ("best_of", json!(3)),
    ] {
        refused(&t, chats, chat(json!({ field: value })), field).await;
    }
    // `null`, or the value that asks for what the server does anyway, is fine.
    for extra in [
        json!({"tools": null, "tool_choice": "none", "response_format": {"type": "text"}}),
        json!({"best_of": 1}),
        json!({"n": 2, "best_of": 2, "temperature": 1}),
        // Unknown fields are ignored, as OpenAI ignores them.
        json!({"metadata": {"a": "b"}, "store": false, "some_future_field": [1, 2]}),
    ] {
        accepted(&t, chats, chat(extra)).await;
    }
    let completions = "/v1/completions";
    refused(&t, completions, completion(json!({"echo": "yes"})), "echo").await;
    refused(
        &t,
        completions,
        completion(json!({"suffix": "!"})),
        "suffix",
    )
    .await;
    refused(
        &t,
        completions,
        completion(json!({"best_of": 2})),
        "best_of",
    )
    .await;
    accepted(
        &t,
        completions,
        completion(json!({"echo": false, "suffix": null})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_are_read_as_json_schema_reads_them() {
    let t = start(options()).await;
    let path = "/v1/chat/completions";
    // Integral floats are integers.
    let (status, answer) = post(&t, path, &chat(json!({"n": 2.0, "max_tokens": 3.0}))).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"].as_array().unwrap().len(), 2);
    assert_eq!(answer["usage"]["completion_tokens"], 6);
    refused(&t, path, chat(json!({"n": 2.5})), "n").await;
    refused(&t, path, chat(json!({"top_k": 1.5})), "top_k").await;
    // One f64 ulp past a bound is outside it, though it rounds onto the bound in f32.
    let past_two = f64::from_bits(2f64.to_bits() + 1);
    assert_eq!(past_two as f32, 2.0);
    refused(
        &t,
        path,
        chat(json!({"temperature": past_two})),
        "temperature",
    )
    .await;
    accepted(&t, path, chat(json!({"temperature": 2.0}))).await;
    let past_minus_two = f64::from_bits((-2f64).to_bits() + 1);
    assert_eq!(past_minus_two as f32, -2.0);
    refused(
        &t,
        path,
        chat(json!({"presence_penalty": past_minus_two})),
        "presence_penalty",
    )
    .await;
    let (status, answer) = post(&t, path, &chat(json!({"temperature": -1e308}))).await;
    assert_eq!(status, 400);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("-1e308"), "the value as sent: {message}");
    // Each budget field is checked, though `max_completion_tokens` wins when both are sent.
    refused(
        &t,
        path,
        chat(json!({"max_tokens": 0, "max_completion_tokens": 2})),
        "max_tokens",
    )
    .await;
    // Past 64 bits an integer cannot be told from its rounding: out of range, not rounded in.
    let body = r#"{"model":"tiny-llava","seed":-9223372036854775809,"messages":[{"role":"user","content":"Hi"}]}"#;
    let r = t
        .client
        .post(format!("{}{path}", t.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Token ids in their one decimal spelling, as the document's pattern states them.
    accepted(&t, path, chat(json!({"logit_bias": {"7": 1}}))).await;
    refused(
        &t,
        path,
        chat(json!({"logit_bias": {"07": 1}})),
        "logit_bias",
    )
    .await;
    refused(
        &t,
        path,
        chat(json!({"logit_bias": {"+7": 1}})),
        "logit_bias",
    )
    .await;
    // A content part's type is its name; serde would take a variant index for it.
    let numbered = json!({"messages": [{"role": "user", "content": [{"type": 0, "text": "Hi"}]}]});
    refused(&t, path, chat(numbered), "messages[0].content").await;
    let detail = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri("scene_336x336.png"), "detail": "ultra"}}]}]});
    refused(&t, path, chat(detail), "messages[0].content").await;
    // Stop sequences are bounded in characters, as `maxLength` counts them.
    accepted(&t, path, chat(json!({"stop": ["é".repeat(1024)]}))).await;
    refused(&t, path, chat(json!({"stop": ["é".repeat(1025)]})), "stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_is_the_least_of_positions_cache_and_max_model_len() {
    // 400 blocks of 16 = 6,400 cache tokens, 4,096 positions: positions decide.
    let t = start(options()).await;
    let (_, models) = get_json(&t, "/v1/models").await;
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    drop(t);
    // A cache of 2,048 tokens decides, for the API's check as for the engine's: without
    // `max_tokens` a request gets the rest of the cache, not of the positions.
    let mut opts = options();
    opts.engine.num_kv_blocks = Some(128);
    let t = start(opts).await;
    let (_, models) = get_json(&t, "/v1/models").await;
    assert_eq!(models["data"][0]["max_model_len"], 2048);
    let (status, answer) = post(
        &t,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 2100})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context of 2048 tokens"),
        "{answer}"
    );
    drop(t);
    let mut opts = options();
    opts.engine.max_model_len = Some(100);
    let t = start(opts).await;
    let (status, answer) = post(&t, "/v1/chat/completions", &chat(json!({"max_tokens": 99}))).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "max_tokens");
    let (status, answer) = post(&t, "/v1/chat/completions", &chat(json!({"max_tokens": 80}))).await;
    assert_eq!(status, 200, "{answer}");
}

async fn get_json(t: &TestServer, path: &str) -> (u16, Value) {
    let r = t
        .client
        .get(format!("{}{path}", t.base))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_by_id_and_unknown_routes_answer_with_openai_errors() {
    let mut opts = options();
    opts.api.served_model_name = "llava-hf/llava-1.5-7b-hf".into();
    let t = start(opts).await;
    let get = |path: &str| t.client.get(format!("{}{path}", t.base)).send();
    // A hub-style name, slash and all.
    let r = get("/v1/models/llava-hf/llava-1.5-7b-hf").await.unwrap();
    assert_eq!(r.status(), 200);
    let card: Value = r.json().await.unwrap();
    assert_eq!(card["id"], "llava-hf/llava-1.5-7b-hf");
    assert_eq!(card["object"], "model");
    let r = get("/v1/models/gpt-4o").await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    // No such route.
    let r = get("/v1/embeddings").await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    // A route served with another method: 405, `Allow`, and the error object.
    let r = get("/v1/chat/completions").await.unwrap();
    assert_eq!(r.status(), 405);
    let allow = r
        .headers()
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(allow.as_deref(), Some("POST"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_made_and_cors_answers_preflights() {
    let mut opts = options();
    opts.api.api_keys = vec!["k".into()];
    let t = start(opts).await;
    let url = format!("{}/v1/chat/completions", t.base);
    let send = |id: Option<&str>| {
        let mut r = t.client.post(&url).bearer_auth("k").json(&chat(json!({})));
        if let Some(id) = id {
            r = r.header("x-request-id", id);
        }
        r.send()
    };
    let r = send(Some("client-id-42")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "client-id-42");
    // Made when absent, or when the client's is unusable; errors carry one too.
    let r = send(None).await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(made.starts_with("req-") && made.len() > 10, "{made}");
    let r = send(Some(&"x".repeat(500))).await.unwrap();
    assert!(r.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req-"));
    let r = t
        .client
        .post(&url)
        .json(&chat(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("x-request-id"));
    // A browser's preflight is answered without a key (the default origin is `*`).
    let r = t
        .client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    drop(t);

    let mut opts = options();
    opts.api.allowed_origins = vec!["https://good.example".into()];
    let t = start(opts).await;
    let preflight = |origin: &'static str| {
        t.client
            .request(reqwest::Method::OPTIONS, format!("{}/v1/models", t.base))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let r = preflight("https://good.example").await.unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://good.example"
    );
    let r = preflight("https://evil.example").await.unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_is_stateless_and_says_so() {
    let t = start(options()).await;
    let path = "/v1/responses";
    let body = |extra: Value| {
        let mut b = json!({"model": MODEL, "input": "Hi", "max_output_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (field, value) in [
        ("store", json!(true)),
        ("previous_response_id", json!("resp_123")),
        ("tools", json!([{"type": "web_search"}])),
        // `text.format` is served (tests/api_structured_outputs.rs); `text` must be an object.
        ("text", json!("plain")),
        ("reasoning", json!({"effort": "low"})),
        ("background", json!(true)),
    ] {
        refused(&t, path, body(json!({ field: value })), field).await;
    }
    refused(&t, path, body(json!({"input": []})), "input").await;
    let misplaced = json!([{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]);
    refused(
        &t,
        path,
        body(json!({ "input": misplaced })),
        "input[0].content",
    )
    .await;
    // The harmless values, and a whole answer.
    let (status, answer) = post(
        &t,
        path,
        &body(
            json!({"store": false, "tools": [], "text": {"format": {"type": "text"}},
                     "instructions": "Be brief.", "metadata": {"k": "v"}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["status"], "incomplete");
    assert_eq!(answer["usage"]["output_tokens"], 2);
    assert_eq!(answer["metadata"]["k"], "v");
    assert_eq!(answer["output"][0]["content"][0]["type"], "output_text");
}
