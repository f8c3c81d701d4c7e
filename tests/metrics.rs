//! `/metrics` on a real server: Prometheus' conventions (HELP and TYPE on every family, counters and
//! only counters ending in `_total`, the model_name label, name order), the Gateway API Inference
//! Extension's gauges, token counters that match HF's token counts, TTFT and phase histograms for
//! non-streamed requests too, a client that leaves counted as aborted, and the vLLM aliases.
//! The tests take turns (the recorder is process-wide), so each one's counters move only by what it does.

mod api_common;

use api_common::*;
use serde_json::{json, Value};
use std::time::Duration;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn scrape(t: &TestServer) -> String {
    let r = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

async fn chat(t: &TestServer, body: &Value) -> Value {
    let (status, answer) = post(t, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn count(text: &str, family: &str) -> f64 {
    metric(text, &format!("{family}_count")).unwrap_or(0.0)
}

/// Families as (name, TYPE) in the order of their `# TYPE` lines; every sample's family has HELP.
fn check_conventions(text: &str) -> Vec<(String, String)> {
    let mut types = Vec::new();
    let mut helps = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.push((name.to_owned(), kind.to_owned()));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            helps.push(name.to_owned());
        } else if !line.is_empty() {
            assert!(
                line.contains("model_name=\"tiny-llava\""),
                "a sample without model_name: {line}"
            );
        }
    }
    for (name, kind) in &types {
        assert!(helps.contains(name), "no HELP for {name}");
        assert_eq!(
            name.ends_with("_total"),
            kind == "counter",
            "{name} is a {kind}: counters, and only counters, end in _total"
        );
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_conventions_and_count_what_happened() {
    let _turn = TURN.lock().await;
    let t = start(options()).await;
    let text_case = reference("text_only");
    let image_case = reference("chat_template");
    let before = scrape(&t).await;

    // One plain-text chat and one image chat, neither streamed.
    let body = json!({"model": MODEL, "max_tokens": 16, "temperature": 0, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "Write a haiku about llamas."}]});
    let answer = chat(&t, &body).await;
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        text_case["greedy"]["text"]
    );
    chat(&t, &image_chat(json!({}))).await;
    let after = scrape(&t).await;

    let types = check_conventions(&after);
    let names: Vec<&String> = types.iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "families are in name order");

    let delta =
        |name: &str| metric(&after, name).unwrap_or(0.0) - metric(&before, name).unwrap_or(0.0);
    // HF's own token counts of the two prompts (tests/fixtures/refs/tiny.json), 16 tokens each back.
    let prompt_tokens = text_case["num_input_ids"].as_f64().unwrap()
        + image_case["num_input_ids"].as_f64().unwrap();
    assert_eq!(delta("llava_prompt_tokens_total"), prompt_tokens);
    assert_eq!(delta("llava_generation_tokens_total"), 32.0);
    let ok =
        |text: &str| metric_where(text, "llava_requests_total", "status=\"200\"").unwrap_or(0.0);
    assert_eq!(ok(&after) - ok(&before), 2.0);
    // Non-streamed requests have a time to first token too, and every phase is recorded once each.
    for family in [
        "llava_time_to_first_token_seconds",
        "llava_e2e_request_latency_seconds",
        "llava_request_queue_time_seconds",
        "llava_request_prefill_time_seconds",
        "llava_request_decode_time_seconds",
    ] {
        assert_eq!(
            count(&after, family) - count(&before, family),
            2.0,
            "{family}"
        );
    }
    // 15 gaps between 16 tokens, per request.
    let itl = "llava_inter_token_latency_seconds";
    assert_eq!(count(&after, itl) - count(&before, itl), 30.0);
    for family in [
        "llava_media_fetch_seconds",
        "llava_media_decode_seconds",
        "llava_media_preprocess_seconds",
    ] {
        assert_eq!(
            count(&after, family) - count(&before, family),
            1.0,
            "{family}: one image"
        );
    }
    assert_eq!(delta("llava_images_encoded_total"), 1.0);

    // The Gateway API Inference Extension's gauges and cache_config_info (options(): 400 blocks of 16).
    // Gauges are the engine's state as of its last step: the finished request leaves at the next one.
    let mut after = after;
    for _ in 0..500 {
        if metric(&after, "llava_num_requests_running") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = scrape(&t).await;
    }
    assert_eq!(metric(&after, "llava_num_requests_waiting"), Some(0.0));
    assert_eq!(metric(&after, "llava_num_requests_running"), Some(0.0));
    assert_eq!(
        metric(&after, "llava_kv_cache_capacity_blocks"),
        Some(400.0)
    );
    let usage = metric(&after, "llava_kv_cache_usage_ratio").unwrap();
    let used = metric(&after, "llava_kv_cache_used_blocks").unwrap();
    assert_eq!(usage, used / 400.0);
    assert!((0.0..=1.0).contains(&usage));
    assert_eq!(
        metric_where(
            &after,
            "llava_cache_config_info",
            "block_size=\"16\",num_gpu_blocks=\"400\""
        ),
        Some(1.0),
        "{after}"
    );
    assert!(!after.contains("vllm:"), "vLLM names are opt-in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_is_counted_as_aborted_not_200() {
    let _turn = TURN.lock().await;
    use tokio::io::AsyncWriteExt;
    let t = start(options()).await;
    let before = scrape(&t).await;
    let body = json!({"model": MODEL, "max_tokens": 3000, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut socket = tokio::net::TcpStream::connect(t.server.addr).await.unwrap();
    let request = raw_json_post("/v1/chat/completions", &body);
    socket.write_all(request.as_bytes()).await.unwrap();
    let engine = &t.server.state.model.get().unwrap().engine;
    while engine.metrics().generated_tokens < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(socket);
    let status = |text: &str, s: &str| {
        metric_where(text, "llava_requests_total", &format!("status=\"{s}\"")).unwrap_or(0.0)
    };
    for _ in 0..500 {
        let now = scrape(&t).await;
        if status(&now, "aborted") - status(&before, "aborted") == 1.0 {
            assert_eq!(status(&now, "200"), status(&before, "200"), "{now}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the abandoned request was not counted as aborted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_metric_names_are_aliases_of_ours() {
    let _turn = TURN.lock().await;
    let mut opts = options();
    opts.api.vllm_metric_names = true;
    let t = start(opts).await;
    chat(&t, &image_chat(json!({"max_tokens": 4}))).await;
    let text = scrape(&t).await;
    for (ours, theirs) in [
        ("llava_num_requests_waiting", "vllm:num_requests_waiting"),
        ("llava_num_requests_running", "vllm:num_requests_running"),
        ("llava_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"),
        ("llava_kv_cache_usage_ratio", "vllm:gpu_cache_usage_perc"),
        ("llava_prompt_tokens_total", "vllm:prompt_tokens_total"),
        (
            "llava_generation_tokens_total",
            "vllm:generation_tokens_total",
        ),
        (
            "llava_time_to_first_token_seconds_count",
            "vllm:time_to_first_token_seconds_count",
        ),
        (
            "llava_e2e_request_latency_seconds_sum",
            "vllm:e2e_request_latency_seconds_sum",
        ),
    ] {
        assert!(metric(&text, ours).is_some(), "{ours} missing");
        assert_eq!(metric(&text, ours), metric(&text, theirs), "{theirs}");
        assert!(text.contains(&format!(
            "# HELP {}",
            theirs.trim_end_matches("_count").trim_end_matches("_sum")
        )));
    }
    assert_eq!(
        metric_where(&text, "vllm:cache_config_info", "block_size=\"16\""),
        Some(1.0)
    );
}
