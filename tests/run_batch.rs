//! `run-batch`: an OpenAI Batch API file of mixed requests gives, per line and in order, the same text
//! as the same request over HTTP (and an error line for a bad request).

mod api_common;

use api_common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_lines_equal_http_answers() {
    let bodies = [
        image_chat(json!({})),
        json!({"model": MODEL, "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Write a haiku about llamas."}]}),
        json!({"model": MODEL, "temperature": 9, "messages": [{"role": "user", "content": "hi"}]}),
        image_chat(
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri("gray_300x200.png")}},
            {"type": "text", "text": "What do you see?"}]}]}),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines: Vec<String> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": b})
                .to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_llava-server"))
        .args([
            "run-batch",
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ])
        .args([
            "--model",
            fixtures().join("tiny").to_str().unwrap(),
            "--served-model-name",
            MODEL,
        ])
        .args(["--num-kv-blocks", "400"])
        .env("RUST_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
    let results: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), bodies.len());

    let t = start(options()).await;
    for (i, (body, result)) in bodies.iter().zip(&results).enumerate() {
        assert_eq!(result["custom_id"], format!("req-{i}"));
        assert!(result["id"].as_str().unwrap().starts_with("batch_req"));
        let r = t
            .client
            .post(format!("{}/v1/chat/completions", t.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let http: Value = r.json().await.unwrap();
        assert_eq!(result["response"]["status_code"], status, "line {i}");
        if status == 200 {
            assert_eq!(
                result["response"]["body"]["choices"][0]["message"]["content"],
                http["choices"][0]["message"]["content"],
                "line {i}"
            );
            assert_eq!(
                result["response"]["body"]["usage"]["prompt_tokens"],
                http["usage"]["prompt_tokens"]
            );
        } else {
            assert_eq!(
                result["response"]["body"]["error"]["param"],
                http["error"]["param"]
            );
        }
    }
    assert_eq!(results[2]["response"]["status_code"], 400);
    assert_eq!(
        results[0]["response"]["body"]["choices"][0]["message"]["content"],
        reference("chat_template")["greedy"]["text"]
    );
}
