//! `/v1/completions` in full: lists of prompts, token-id prompts, `echo`, and `max_tokens: 0` with
//! `echo` (how evaluation harnesses fetch prompts). Expected texts and ids are HF's (`text_only`).

mod api_common;

use api_common::*;
use serde_json::{json, Value};

fn completion(prompt: Value, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                          "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn texts(body: &Value) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().unwrap(),
                c["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_token_ids_and_echo_give_hfs_text() {
    let t = start(options()).await;
    let want = reference("text_only");
    let (prompt, ids) = (want["prompt"].clone(), want["input_ids"].clone());
    let greedy = want["greedy"]["text"].as_str().unwrap().to_owned();
    let tokens = want["num_input_ids"].as_u64().unwrap();
    let path = "/v1/completions";

    // Two prompts × n = 2: indexes 0..4, prompt p's choice i at p × 2 + i.
    let (status, body) = post(
        &t,
        path,
        &completion(json!([prompt, prompt]), json!({"n": 2})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = texts(&body);
    assert_eq!(got.iter().map(|c| c.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(got.iter().all(|c| c.1 == greedy), "{got:?}");
    assert_eq!(body["usage"]["prompt_tokens"], 2 * tokens);
    assert_eq!(body["usage"]["completion_tokens"], 64);

    // HF's input ids as the prompt, alone and in a list.
    for prompt in [ids.clone(), json!([ids, ids])] {
        let (status, body) = post(&t, path, &completion(prompt, json!({}))).await;
        assert_eq!(status, 200, "{body}");
        assert!(texts(&body).iter().all(|c| c.1 == greedy), "{body}");
    }

    // Echo: the prompt's text first; with max_tokens 0 the prompt alone, nothing generated.
    let (_, body) = post(&t, path, &completion(prompt.clone(), json!({"echo": true}))).await;
    assert_eq!(
        texts(&body)[0].1,
        format!("{}{greedy}", prompt.as_str().unwrap())
    );
    let (status, body) = post(
        &t,
        path,
        &completion(
            json!([prompt, prompt]),
            json!({"echo": true, "max_tokens": 0}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        texts(&body).iter().all(|c| c.1 == prompt.as_str().unwrap()),
        "{body}"
    );
    assert_eq!(body["usage"]["completion_tokens"], 0);
    assert_eq!(body["usage"]["prompt_tokens"], 2 * tokens);

    // Streamed, two prompts with echo: each index's text is the prompt and then HF's text.
    let r = t
        .client
        .post(format!("{}{path}", t.base))
        .json(&completion(
            json!([prompt, prompt]),
            json!({"echo": true, "stream": true}),
        ))
        .send()
        .await
        .unwrap();
    let mut streamed = [String::new(), String::new()];
    for data in sse_data(&r.text().await.unwrap()) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            streamed[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap();
        }
    }
    let whole = format!("{}{greedy}", prompt.as_str().unwrap());
    assert_eq!(streamed, [whole.clone(), whole]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_completions_cannot_do_is_refused() {
    let t = start(options()).await;
    let path = "/v1/completions";
    for (body, param) in [
        (
            completion(json!("Hi"), json!({"max_tokens": 0})),
            "max_tokens",
        ),
        (completion(json!([]), json!({})), "prompt"),
        (completion(json!([[1, 2], []]), json!({})), "prompt"),
        (completion(json!([1, 32064]), json!({})), "prompt"),
        (completion(json!(vec!["a"; 33]), json!({})), "prompt"),
    ] {
        let (status, answer) = post(&t, path, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
}
