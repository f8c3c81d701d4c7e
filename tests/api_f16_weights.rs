//! `--cpu-f16-weights`: the decoder's weights rounded to f16, products and sums in f32. Its greedy
//! answers are compared token by token with HF's (through the f32 server, which gives HF's exact
//! text, checked here too). Rounding the weights moves the logits a little, so agreement is required
//! only up to the first step where HF's own top-1/top-2 gap is below `MARGIN`; the rest is printed.

mod api_common;

use api_common::*;
use serde_json::{json, Value};

const MARGIN: f64 = 0.05;

/// Greedy tokens (as strings, from logprobs) and text of a chat request.
async fn greedy(t: &TestServer, body: &Value) -> (Vec<String>, String) {
    let mut body = body.clone();
    body["logprobs"] = json!(true);
    let (status, answer) = post(t, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    let tokens = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["token"].as_str().unwrap().to_owned())
        .collect();
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    (tokens, text)
}

#[tokio::test]
async fn f16_weights_agree_with_hf_until_its_close_calls() {
    // The f16 weights through the kernel that widens them (off by default in debug builds).
    std::env::set_var("LLAVA_SERVER_CPU_DECODE_KERNELS", "on");
    let cases = [
        ("chat_template", image_chat(json!({}))),
        (
            "text_only",
            json!({"model": MODEL, "temperature": 0, "max_tokens": 16,
                   "messages": [{"role": "user", "content": "Write a haiku about llamas."}]}),
        ),
    ];
    let exact = start(options()).await;
    let mut opts = options();
    opts.cpu_f16_weights = true;
    let rounded = start(opts).await;
    for (name, body) in &cases {
        let reference = reference(name);
        let (hf_tokens, hf_text) = greedy(&exact, body).await;
        assert_eq!(
            hf_text, reference["greedy"]["text"],
            "{name}: the f32 server is HF's"
        );
        let (tokens, _) = greedy(&rounded, body).await;
        let gaps: Vec<f64> = reference["greedy"]["step_top1_minus_top2"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        let agree = tokens
            .iter()
            .zip(&hf_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let clear = gaps.iter().take_while(|&&g| g >= MARGIN).count();
        println!(
            "{name}: f16 weights agree with HF for {agree} of {} greedy tokens \
             (HF's first gap below {MARGIN} is at step {clear})",
            hf_tokens.len()
        );
        assert!(
            agree >= clear.min(hf_tokens.len()),
            "{name}: diverged at step {agree}, where HF's gap is {:.3}",
            gaps[agree]
        );
    }
}

#[tokio::test]
async fn f16_weights_are_refused_off_the_f32_cpu_path() {
    let mut opts = options();
    opts.cpu_f16_weights = true;
    opts.dtype = "bf16".into();
    let error = llava_server::api::server::load_served_model(&opts, opts.engine.clone())
        .err()
        .expect("bf16 with f16 weights is refused");
    assert!(
        error.to_string().contains("--cpu-f16-weights needs"),
        "{error}"
    );
}
