//! Structured outputs on the tiny random-weight fixture: whatever the weights, the grammar makes
//! every finished answer valid for its schema, checked here by hand against the schema's rules.
//! Unconstrained requests batched beside constrained ones still give HF's greedy text.

mod api_common;

use api_common::*;
use serde_json::{json, Value};

/// A nested schema whose every string and number is bounded, so a finished answer is short.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
                "required": ["kind", "legs"],
                "additionalProperties": false
            },
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}
        },
        "required": ["name", "age", "pet", "tags"],
        "additionalProperties": false
    })
}

/// The schema's rules, checked on an answer.
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let o = v.as_object().expect("object");
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["age", "name", "pet", "tags"], "{text}");
    assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
    assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{text}");
    let pet = o["pet"].as_object().unwrap();
    assert_eq!(pet.len(), 2, "{text}");
    assert!(
        ["cat", "dog"].contains(&pet["kind"].as_str().unwrap()),
        "{text}"
    );
    assert!((0..=4).contains(&pet["legs"].as_i64().unwrap()), "{text}");
    let tags = o["tags"].as_array().unwrap();
    assert!(
        tags.len() <= 3 && tags.iter().all(Value::is_boolean),
        "{text}"
    );
}

fn person_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": person_schema()}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_follow_the_schema_greedy_sampled_and_streamed() {
    let t = start(options()).await;
    // Greedy, and n = 3 sampled choices at temperature 1.5 (each its own grammar state).
    for extra in [
        json!({"temperature": 0}),
        json!({"temperature": 1.5, "seed": 7, "n": 3}),
    ] {
        let mut body = image_chat(extra.clone());
        body["max_tokens"] = json!(120);
        body["response_format"] = person_format();
        let (status, answer) = post(&t, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        for choice in answer["choices"].as_array().unwrap() {
            assert_eq!(choice["finish_reason"], "stop", "{extra}: {choice}");
            assert_person(choice["message"]["content"].as_str().unwrap());
        }
    }
    // Streamed: the deltas join into a valid answer.
    let mut body = image_chat(json!({"stream": true, "temperature": 1.0, "seed": 3}));
    body["max_tokens"] = json!(120);
    body["response_format"] = person_format();
    let text = post_for_text(&t, "/v1/chat/completions", &body).await;
    let mut joined = String::new();
    for data in sse_data(&text) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            joined.push_str(piece);
        }
    }
    assert_person(&joined);
    assert_still_exact(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_and_completions_and_responses_give_json() {
    let t = start(options()).await;
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                        "required": ["ok"], "additionalProperties": false});
    // Completions take `response_format` as vLLM's do.
    let (status, body) = post(
        &t,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Answer:", "max_tokens": 20, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(body["choices"][0]["text"].as_str().unwrap()).unwrap();
    assert!(
        v["ok"].is_boolean() && v.as_object().unwrap().len() == 1,
        "{v}"
    );

    // The Responses API: `text.format` json_schema, echoed in the response object.
    let format = json!({"type": "json_schema", "name": "ok", "schema": schema, "strict": true});
    let (status, body) = post(
        &t,
        "/v1/responses",
        &json!({"model": MODEL, "input": "Answer:", "max_output_tokens": 20, "temperature": 0,
                "text": {"format": format}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"]["format"], format);
    let text = body["output"][0]["content"][0]["text"].as_str().unwrap();
    let v: Value = serde_json::from_str(text).unwrap();
    assert!(v["ok"].is_boolean(), "{v}");

    // json_object: an object whenever the answer finishes.
    let mut finished = 0;
    for seed in 0..4 {
        let mut body = image_chat(json!({"temperature": 1.0, "seed": seed}));
        body["max_tokens"] = json!(60);
        body["response_format"] = json!({"type": "json_object"});
        let (status, answer) = post(&t, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{answer}");
        let choice = &answer["choices"][0];
        let content = choice["message"]["content"].as_str().unwrap();
        assert!(content.starts_with('{'), "{content:?}");
        if choice["finish_reason"] == "stop" {
            finished += 1;
            let v: Value =
                serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
            assert!(v.is_object());
        }
    }
    eprintln!("json_object: {finished} of 4 answers finished within 60 tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconstrained_requests_beside_constrained_ones_keep_hfs_greedy_text() {
    let t = start(options()).await;
    let constrained = |seed: u64| {
        let mut body = image_chat(json!({"temperature": 1.0, "seed": seed, "n": 2}));
        body["max_tokens"] = json!(60);
        body["response_format"] = person_format();
        body
    };
    let (first, plain, second) = (constrained(1), image_chat(json!({})), constrained(2));
    let (a, b, c) = tokio::join!(
        post(&t, "/v1/chat/completions", &first),
        post(&t, "/v1/chat/completions", &plain),
        post(&t, "/v1/chat/completions", &second),
    );
    for (status, body) in [&a, &b, &c] {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(
        b.1["choices"][0]["message"]["content"],
        reference("chat_template")["greedy"]["text"]
    );
    assert_eq!(kv_blocks_used(&t).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_formats_and_schemas_are_400s_naming_response_format() {
    let t = start(options()).await;
    for format in [
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
        json!({"type": "json_schema", "json_schema": {"name": "x",
               "schema": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
        json!({"type": "yaml"}),
    ] {
        let (status, body) = post(
            &t,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "response_format": format}),
        )
        .await;
        assert_eq!(status, 400, "{format}: {body}");
        assert_eq!(body["error"]["param"], "response_format", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // The format is compiled before any image is fetched: an image the server would refuse to
    // fetch (a private address) is never reached.
    let mut body = chat_with_image("http://10.0.0.1/cat.png", "hi");
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}});
    let (status, answer) = post(&t, "/v1/chat/completions", &body).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "response_format", "{answer}");
    assert_still_exact(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllms_structured_outputs_constrain_to_a_regex_a_choice_or_a_grammar() {
    let t = start(options()).await;
    let ask = |outputs: Value, seed: u64| {
        json!({"model": MODEL, "prompt": "Answer:", "max_tokens": 24, "temperature": 1.0,
               "seed": seed, "structured_outputs": outputs})
    };
    for seed in 0..3 {
        let cases = [
            (json!({"regex": "[0-9]{3}-[a-c]{2}"}), "regex"),
            (json!({"choice": ["yes", "no", "maybe not"]}), "choice"),
            (
                json!({"grammar": "start: \"(\" item (\",\" item)* \")\"\nitem: \"x\" | \"yy\""}),
                "grammar",
            ),
            (
                json!({"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}}),
                "json",
            ),
        ];
        for (outputs, kind) in cases {
            let (status, body) = post(&t, "/v1/completions", &ask(outputs, seed)).await;
            assert_eq!(status, 200, "{body}");
            let choice = &body["choices"][0];
            let text = choice["text"].as_str().unwrap();
            if choice["finish_reason"] != "stop" {
                // Only the grammar's language is unbounded: the others end within 24 tokens.
                assert_eq!(kind, "grammar", "{kind} (seed {seed}) was cut: {text:?}");
                continue;
            }
            let valid = match kind {
                "regex" => {
                    let b = text.as_bytes();
                    b.len() == 6
                        && b[..3].iter().all(u8::is_ascii_digit)
                        && b[3] == b'-'
                        && b[4..].iter().all(|c| (b'a'..=b'c').contains(c))
                }
                "choice" => ["yes", "no", "maybe not"].contains(&text),
                "grammar" => {
                    let inner = text.strip_prefix('(').and_then(|s| s.strip_suffix(')'));
                    inner.is_some_and(|s| s.split(',').all(|item| item == "x" || item == "yy"))
                }
                _ => serde_json::from_str::<Vec<bool>>(text).is_ok_and(|v| v.len() <= 2),
            };
            assert!(valid, "{kind} (seed {seed}): {text:?}");
        }
    }
    // Refusals: both fields, vLLM's older `guided_*` fields, and an expression that cannot compile.
    for (body, param) in [
        (
            json!({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "a"},
                   "response_format": {"type": "json_object"}}),
            "structured_outputs",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "guided_json": {"type": "object"}}),
            "guided_json",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}),
            "structured_outputs",
        ),
    ] {
        let (status, answer) = post(&t, "/v1/completions", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{answer}");
    }
}
