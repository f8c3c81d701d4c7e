//! `/v1/completions` with `echo` and `logprobs`: every prompt token after the first is scored by the
//! logits of the position before it, as HF computes them (`refs/prompt_logprobs.json`, made by
//! `tests/fixtures/make_prompt_logprobs.py`), with `max_tokens: 0` (lm-eval-harness' log-likelihood
//! request), with generated tokens after the prompt, streamed, and again when the prompt is in the
//! prefix cache (which a scored prompt must not use).

mod api_common;

use api_common::*;
use serde_json::{json, Value};

const TOLERANCE: f64 = 1e-4;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("refs/prompt_logprobs.json")).unwrap();
    let refs: Value = serde_json::from_str(&text).unwrap();
    refs["cases"].as_array().unwrap().clone()
}

fn request(prompt: &str, max_tokens: u32, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": prompt, "echo": true, "logprobs": 2,
                          "max_tokens": max_tokens, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The prompt part of a choice's `logprobs` against HF's: the first token unscored, then each
/// token's log-probability and the two most likely values.
fn assert_prompt_scores(logprobs: &Value, case: &Value) {
    let tokens = case["tokens"].as_array().unwrap();
    let got = logprobs["token_logprobs"].as_array().unwrap();
    let top = logprobs["top_logprobs"].as_array().unwrap();
    assert!(got.len() > tokens.len(), "{logprobs}");
    assert!(
        got[0].is_null() && top[0].is_null(),
        "the first token has no score"
    );
    for (j, want) in tokens.iter().enumerate() {
        let lp = got[j + 1].as_f64().unwrap();
        let expected = want["logprob"].as_f64().unwrap();
        assert!(
            (lp - expected).abs() < TOLERANCE,
            "token {}: {lp} vs HF {expected}",
            j + 1
        );
        let mut values: Vec<f64> = top[j + 1]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .collect();
        values.sort_by(|a, b| b.total_cmp(a));
        let hf: Vec<f64> = want["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        // Two distinct pieces always: the map holds both (no two top tokens share a text here).
        assert_eq!(values.len(), 2, "{}", top[j + 1]);
        for (a, b) in values.iter().zip(&hf) {
            assert!(
                (a - b).abs() < TOLERANCE,
                "top at token {}: {a} vs {b}",
                j + 1
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_tokens_are_scored_as_hf_scores_them() {
    let t = start(options()).await;
    for case in cases() {
        let prompt = case["prompt"].as_str().unwrap();
        let count = case["input_ids"].as_array().unwrap().len();
        // Scored alone (nothing generated), twice: the second time the prompt's blocks are in the
        // prefix cache, and a scored prompt is computed in full all the same.
        for _ in 0..2 {
            let (status, body) = post(&t, "/v1/completions", &request(prompt, 0, json!({}))).await;
            assert_eq!(status, 200, "{body}");
            let choice = &body["choices"][0];
            assert_eq!(choice["text"], prompt);
            assert_eq!(choice["finish_reason"], "length");
            assert_eq!(
                choice["logprobs"]["tokens"].as_array().unwrap().len(),
                count
            );
            assert_prompt_scores(&choice["logprobs"], &case);
            assert_eq!(body["usage"]["completion_tokens"], 0);
            assert_eq!(body["usage"]["prompt_tokens"], count);
            assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        }
        // With 3 generated tokens after it, for both of n = 2 choices.
        let (status, body) =
            post(&t, "/v1/completions", &request(prompt, 3, json!({"n": 2}))).await;
        assert_eq!(status, 200, "{body}");
        for choice in body["choices"].as_array().unwrap() {
            let logprobs = &choice["logprobs"];
            assert_eq!(
                logprobs["token_logprobs"].as_array().unwrap().len(),
                count + 3
            );
            assert_prompt_scores(logprobs, &case);
        }
    }
    assert_eq!(kv_blocks_used(&t).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_computed_in_chunks_is_scored_whole() {
    // A 7-token step budget splits the 28-token prompt over four prefill steps.
    let mut opts = options();
    opts.engine.max_num_batched_tokens = 7;
    let t = start(opts).await;
    let case = &cases()[1];
    let prompt = case["prompt"].as_str().unwrap();
    let (status, body) = post(&t, "/v1/completions", &request(prompt, 0, json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_prompt_scores(&body["choices"][0]["logprobs"], case);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_echo_carries_the_prompt_scores_first() {
    let t = start(options()).await;
    let case = &cases()[1];
    let prompt = case["prompt"].as_str().unwrap();
    let body = request(prompt, 2, json!({"stream": true}));
    let text = post_for_text(&t, "/v1/completions", &body).await;
    let chunks: Vec<Value> = sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let first = &chunks[0]["choices"][0];
    assert!(first["text"].as_str().unwrap().starts_with(prompt));
    assert_prompt_scores(&first["logprobs"], case);
    let scored: usize = chunks
        .iter()
        .map(|c| {
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum();
    assert_eq!(scored, case["input_ids"].as_array().unwrap().len() + 2);
}
