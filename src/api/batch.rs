//! `run-batch`: OpenAI Batch API files in and out. Every line is submitted to the engine at once
//! (offline batch inference, as `vllm run-batch`); results come back one line per input, in order.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::chat::complete_chat;
use super::error::ApiError;
use super::generation::prepare_chat;
use super::state::{new_id, ApiConfig, AppState, ServedModel, SharedState};
use super::wire::ChatCompletionRequest;
use crate::frontend::media::{MediaFetcher, MediaPolicy};

#[derive(Debug, Deserialize)]
struct BatchLine {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct BatchOutput {
    id: String,
    custom_id: String,
    response: BatchResponse,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct BatchResponse {
    status_code: u16,
    request_id: String,
    body: serde_json::Value,
}

async fn run_line(state: SharedState, line: &str) -> (String, Result<serde_json::Value, ApiError>) {
    let parsed: BatchLine = match serde_json::from_str(line) {
        Ok(p) => p,
        Err(e) => {
            return (
                String::new(),
                Err(ApiError::invalid(format!("invalid batch line: {e}"), None)),
            )
        }
    };
    let custom_id = parsed.custom_id.clone();
    if parsed.method != "POST" || parsed.url != "/v1/chat/completions" {
        let e = ApiError::invalid(
            format!(
                "only POST /v1/chat/completions is supported, not {} {}",
                parsed.method, parsed.url
            ),
            "url",
        );
        return (custom_id, Err(e));
    }
    let result = async {
        let req: ChatCompletionRequest = serde_json::from_value(parsed.body)
            .map_err(|e| ApiError::invalid(format!("invalid body: {e}"), None))?;
        if req.sampling.stream {
            return Err(ApiError::invalid(
                "streaming is not available in a batch",
                "stream",
            ));
        }
        let prepared = prepare_chat(&state, &req, None).await?;
        let response = complete_chat(&state, req.model, prepared).await?;
        Ok(serde_json::to_value(response).expect("wire types serialise"))
    }
    .await;
    (custom_id, result)
}

/// Runs every line of `input` through the served model and writes `output`.
pub async fn run_batch(
    served: ServedModel,
    mut api: ApiConfig,
    media: MediaPolicy,
    input: &Path,
    output: &Path,
) -> anyhow::Result<()> {
    let text = tokio::fs::read_to_string(input)
        .await
        .with_context(|| format!("cannot read {}", input.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // Everything is submitted at once: the queue limit must admit every line.
    api.max_queued_requests = api.max_queued_requests.max(lines.len());
    let state: SharedState = Arc::new(AppState::new(api, MediaFetcher::new(media)?));
    let _ = state.model.set(served);
    let results =
        futures_util::future::join_all(lines.iter().map(|l| run_line(state.clone(), l))).await;
    let mut out = String::new();
    let (mut ok, mut failed) = (0, 0);
    for (custom_id, result) in results {
        let (status_code, body) = match result {
            Ok(body) => {
                ok += 1;
                (200, body)
            }
            Err(e) => {
                failed += 1;
                (
                    e.status().as_u16(),
                    serde_json::to_value(e.body()).expect("serialises"),
                )
            }
        };
        let line = BatchOutput {
            id: new_id("batch_req"),
            custom_id,
            response: BatchResponse {
                status_code,
                request_id: new_id("req"),
                body,
            },
            error: None,
        };
        out.push_str(&serde_json::to_string(&line).expect("serialises"));
        out.push('\n');
    }
    tokio::fs::write(output, out)
        .await
        .with_context(|| format!("cannot write {}", output.display()))?;
    tracing::info!(ok, failed, "batch done");
    Ok(())
}
