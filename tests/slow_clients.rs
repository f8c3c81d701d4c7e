//! Clients that open streams and never read them: their streams are cut once their backlog passes its
//! cap, their requests are aborted (every KV block returns), their connections are closed after the
//! write timeout, and other clients are served exactly meanwhile.

mod api_common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_common::*;
use serde_json::json;

/// Opens a connection and sends a streaming request whose answer is far larger than any backlog
/// cap (`n` choices × 2,000 tokens × 20 alternatives each), then never reads.
fn stalled_stream(addr: std::net::SocketAddr, n: usize) -> TcpStream {
    let body = json!({
        "model": MODEL, "stream": true, "n": n, "max_tokens": 2000, "ignore_eos": true,
        "logprobs": true, "top_logprobs": 20, "temperature": 1.0,
        "messages": [{"role": "user", "content": "Write a long story."}]
    })
    .to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(raw_json_post("/v1/chat/completions", &body).as_bytes())
        .unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_nobody_reads_are_cut_and_free_their_blocks() {
    stall(2, 16).await;
}

/// The size: 200 stalled streams at once, all running (prints the process's RSS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn two_hundred_stalled_streams() {
    stall(200, 1).await;
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb >> 10
}

async fn stall(connections: usize, n: usize) {
    let mut opts = options();
    opts.write_timeout = Duration::from_secs(1);
    // One place more than the stalled requests need, so the good request runs beside them.
    opts.engine.max_num_seqs = (connections * n + 1).min(256);
    opts.engine.num_kv_blocks = Some(connections * n * 130);
    opts.api.max_running_requests = connections;
    opts.api.max_queued_requests = 16;
    let t = start(opts).await;
    let before = rss_mib();
    let started = Instant::now();
    let stalled: Vec<TcpStream> = (0..connections)
        .map(|_| stalled_stream(t.server.addr, n))
        .collect();

    // Served meanwhile, and exactly.
    let (status, body) = post(&t, "/v1/chat/completions", &image_chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reference("chat_template")["greedy"]["text"]
    );

    // Every stalled request ends long before its 32,000 tokens: the streams are cut.
    let engine = &t.server.state.model.get().unwrap().engine;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = before;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_mib());
        let m = engine.metrics();
        if m.running == 0 && m.waiting == 0 && m.kv_blocks_used == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stalled requests still hold blocks: {m:?}"
        );
    }
    assert!(llava_server::api::sse::total_backlog() <= llava_server::api::sse::MAX_TOTAL_BACKLOG);
    println!(
        "{connections} stalled streams: all cut and freed after {:.1} s; RSS {before} MiB before, peak {peak} MiB",
        started.elapsed().as_secs_f64()
    );

    // And the server closed each connection (its last writes stalled past the timeout): reading what
    // reached our side ends in EOF or a reset, never in waiting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sink = vec![0u8; 1 << 16];
        let mut got = 0;
        let closed = loop {
            match s.read(&mut sink) {
                Ok(0) => break true,
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break false
                }
                Err(e) => panic!("{e}"),
            }
        };
        let tail = String::from_utf8_lossy(&sink[..200.min(sink.len())]).into_owned();
        assert!(
            closed,
            "a stalled connection is still open after {got} bytes: {tail}"
        );
    }
}

/// A client that sends half a request head and then nothing holds its connection only until the
/// header-read timeout: with one connection allowed, a second client is served once it is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_end_are_cut() {
    let mut opts = options();
    opts.max_connections = 1;
    opts.header_read_timeout = Duration::from_secs(1);
    let t = start(opts).await;
    // `start` polled /health on a keep-alive connection, which holds the only place until it is
    // idle past the same timeout; wait for it to go.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut slow = TcpStream::connect(t.server.addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-")
        .unwrap();
    let sent = Instant::now();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sink = [0u8; 1024];
    let closed = loop {
        match slow.read(&mut sink) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let waited = sent.elapsed();
    assert!(
        closed,
        "a half-sent head still holds its connection after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "closed only after {waited:?}"
    );

    // The place it held serves a fresh client.
    let fresh = reqwest::Client::new();
    let health = fresh
        .get(format!("{}/health", t.base))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}
