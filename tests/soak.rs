//! Soak (ignored by default; a few minutes here): rounds of 256 concurrent streaming clients against a
//! `serve` process, a tenth of them hanging up at a random point. Every stream that completes equals
//! HF's greedy text, no KV block is in use after a round, and the server's RSS settles.
//!
//!     cargo test --test soak -- --ignored --nocapture

mod api_common;

use std::time::{Duration, Instant};

use api_common::*;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::json;

const CLIENTS: usize = 256;
const ROUNDS: usize = 5;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// One client: streams the reference request; `hang_up_after` chunks, if set, then drops it.
async fn client(
    http: &reqwest::Client,
    base: &str,
    model: &str,
    hang_up_after: Option<usize>,
) -> Option<String> {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&image_chat(json!({"stream": true, "model": model})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        chunks += 1;
        if hang_up_after.is_some_and(|n| chunks >= n) {
            return None;
        }
    }
    Some(
        sse_data(&text)
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .filter_map(|d| {
                let v: serde_json::Value = serde_json::from_str(d).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rounds_of_256_streams_with_hang_ups() {
    let (mut server, base) = spawn_server(&[
        "--max-queued-requests",
        "256",
        "--max-num-seqs",
        "64",
        "--num-kv-blocks",
        "2560",
        "--max-images-per-request",
        "4",
    ]);
    let model = fixtures().join("tiny").to_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    wait_healthy(&http, &base).await;
    let want = reference("chat_template")["greedy"]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let blocks_in_use = || async {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric(&text, "llava_kv_cache_used_blocks").unwrap()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut rss = Vec::new();
    for round in 1..=ROUNDS {
        let started = Instant::now();
        let plans: Vec<Option<usize>> = (0..CLIENTS)
            .map(|_| rng.random_bool(0.1).then(|| rng.random_range(1..12)))
            .collect();
        let answers = futures_util::future::join_all(
            plans.iter().map(|&plan| client(&http, &base, &model, plan)),
        )
        .await;
        let completed: Vec<&String> = answers.iter().flatten().collect();
        for text in &completed {
            assert_eq!(text.as_str(), want, "round {round}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while blocks_in_use().await != 0.0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: blocks still in use"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rss.push(rss_mib(server.id()));
        let port = base.rsplit(':').next().unwrap();
        let sockets = std::process::Command::new("ss")
            .args([
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
        println!(
            "round {round}: {} completed exactly, {} hung up, {:.1} s, KV blocks in use 0, RSS {:.1} MiB, {sockets} connections open",
            completed.len(),
            CLIENTS - completed.len(),
            started.elapsed().as_secs_f64(),
            rss[round - 1]
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    let (second, last) = (rss[1], rss[ROUNDS - 1]);
    assert!(
        last <= second * 1.05,
        "RSS grew from {second:.1} MiB after round 2 to {last:.1} MiB after round {ROUNDS}"
    );
}
