//! Overload and shutdown of a real server: a burst past the queue limit gets 429s with Retry-After and
//! exact answers for the rest; SIGTERM during 32 streams lets them finish, refuses new work and exits 0.

mod api_common;

use std::process::Child;
use std::time::{Duration, Instant};

use api_common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_queue_limit_gets_429s_and_exact_answers() {
    let mut opts = options();
    opts.api.max_running_requests = 2;
    opts.api.max_queued_requests = 2;
    let t = start(opts).await;
    let want = reference("chat_template")["greedy"]["text"].clone();
    let burst = (0..12).map(|_| {
        let client = t.client.clone();
        let url = format!("{}/v1/chat/completions", t.base);
        async move {
            let r = client
                .post(url)
                .json(&image_chat(json!({})))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry_after, body)
        }
    });
    let answers = futures_util::future::join_all(burst).await;
    let (mut ok, mut refused) = (0, 0);
    for (status, retry_after, body) in answers {
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["choices"][0]["message"]["content"], want);
            }
            429 => {
                refused += 1;
                assert!(retry_after, "{body}");
                assert_eq!(body["error"]["type"], "rate_limit_error");
            }
            other => panic!("{other}: {body}"),
        }
    }
    // At most 4 in flight at a time out of 12 sent at once: some wait their turn, some are refused.
    assert!(ok >= 4 && refused >= 1, "{ok} answered, {refused} refused");
}

fn sigterm(child: &Child) {
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_32_streams_finish_refuses_new_work_and_exits_0() {
    let (mut child, base) = spawn_server(&["--shutdown-timeout", "60"]);
    let client = reqwest::Client::new();
    wait_healthy(&client, &base).await;
    let model = fixtures().join("tiny").to_str().unwrap().to_owned();
    let body = json!({"model": model, "stream": true, "max_tokens": 48, "ignore_eos": true,
                      "temperature": 0, "messages": [{"role": "user", "content": "Count to ten."}]});
    let mut streams = Vec::new();
    for _ in 0..32 {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New work is refused: the listener is closed, or the request gets a 503.
    let late = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await;
    assert!(
        late.as_ref().map_or(true, |r| r.status() == 503),
        "{:?}",
        late.map(|r| r.status())
    );
    for r in streams {
        let text = r.text().await.unwrap();
        let frames = sse_data(&text);
        assert_eq!(frames.last().map(String::as_str), Some("[DONE]"), "{text}");
        let tokens = frames
            .iter()
            .filter(|f| f.contains("\"content\":\"") && !f.contains("\"content\":\"\""))
            .count();
        assert!(tokens > 0 && !text.contains("\"error\""), "{text}");
    }
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_exit_at_the_shutdown_timeout_reports_failure() {
    let (mut child, base) = spawn_server(&["--shutdown-timeout", "1"]);
    let client = reqwest::Client::new();
    wait_healthy(&client, &base).await;
    let model = fixtures().join("tiny").to_str().unwrap().to_owned();
    // Far longer than the one second the server gets to drain.
    let body = json!({"model": model, "stream": true, "max_tokens": 4000, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "Go on forever."}]});
    let stream = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(20)), 1);
    drop(stream);
}
