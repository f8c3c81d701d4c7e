//! `POST /v1/completions`: a text prompt (no template, no images), whole or streamed.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokenizers::Tokenizer;

use super::access::TokenCounts;
use super::body::parse_json;
use super::error::ApiError;
use super::generation::{
    finish_reason_str, prepare_completion, pump_events, run_to_completion, submit, token_text,
    Prepared,
};
use super::sse::{sse_response, SseSink};
use super::state::{new_id, unix_now, SharedState};
use super::wire::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorResponse,
};
use crate::types::StepLogprobs;

#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A text completion, or (with `stream`) server-sent `text_completion` events ending in `data: [DONE]`",
         content((CompletionResponse = "application/json"), (CompletionResponse = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 429, description = "Queue full", body = ErrorResponse),
        (status = 503, description = "Loading or shutting down", body = ErrorResponse),
    ),
    security(("bearer" = [])),
    tag = "OpenAI"
)]
pub async fn completions(
    State(state): State<SharedState>,
    client_key: Option<axum::Extension<super::auth::ClientKey>>,
    counts: Option<axum::Extension<TokenCounts>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let counts = counts.map(|c| c.0).unwrap_or_default();
    let req: CompletionRequest = parse_json(&state, body)?;
    let key = client_key.as_ref().map(|k| k.0 .0.as_str());
    let prepared = prepare_completion(&state, &req, key).await?;
    let include_usage = req
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    if req.sampling.stream {
        return stream_completion(state, req.model, prepared, include_usage, counts);
    }
    let params = prepared.params.clone();
    let (stream, _in_flight, tokenizer, usage) = submit(&state, prepared)?;
    let done = run_to_completion(stream, tokenizer.clone(), &params, usage).await?;
    counts.record(done.usage.prompt_tokens, done.usage.completion_tokens);
    let response = CompletionResponse {
        id: new_id("cmpl"),
        object: "text_completion",
        created: unix_now(),
        model: req.model,
        system_fingerprint: state.system_fingerprint.clone(),
        choices: done
            .texts
            .into_iter()
            .zip(done.finishes)
            .zip(done.logprobs)
            .enumerate()
            .map(|(index, ((text, finish), lp))| CompletionChoice {
                index,
                text,
                logprobs: params.logprobs.map(|_| legacy_logprobs(&tokenizer, &lp)),
                finish_reason: Some(finish_reason_str(finish)),
            })
            .collect(),
        usage: Some(done.usage),
    };
    Ok(Json(response).into_response())
}

fn legacy_logprobs(tokenizer: &Tokenizer, steps: &[StepLogprobs]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    for s in steps {
        let (token, _) = token_text(tokenizer, s.chosen.token_id);
        out.text_offset.push(offset);
        offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(s.chosen.logprob);
        out.top_logprobs.push(
            s.top
                .iter()
                .map(|t| (token_text(tokenizer, t.token_id).0, t.logprob))
                .collect(),
        );
    }
    out
}

fn stream_completion(
    state: SharedState,
    model: String,
    prepared: Prepared,
    include_usage: bool,
    counts: TokenCounts,
) -> Result<Response, ApiError> {
    let params = prepared.params.clone();
    let (stream, in_flight, tokenizer, usage) = submit(&state, prepared)?;
    let id = new_id("cmpl");
    let created = unix_now();
    let fingerprint = state.system_fingerprint.clone();
    let chunk = move |choices: Vec<CompletionChoice>, usage| CompletionResponse {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        system_fingerprint: fingerprint.clone(),
        choices,
        usage,
    };
    Ok(sse_response(move |sink: SseSink| async move {
        let _in_flight = in_flight;
        let choices = pump_events(stream, &sink, tokenizer.clone(), &params, |index, delta| {
            if delta.text.is_empty() && delta.finish.is_none() {
                return Ok(());
            }
            let choice = CompletionChoice {
                index,
                text: delta.text,
                logprobs: params
                    .logprobs
                    .map(|_| legacy_logprobs(&tokenizer, &delta.logprobs)),
                finish_reason: delta.finish.map(finish_reason_str),
            };
            sink.send_json(&chunk(vec![choice], None))
        })
        .await?;
        let usage = super::generation::final_usage(usage, &choices);
        counts.record(usage.prompt_tokens, usage.completion_tokens);
        if include_usage {
            sink.send_json(&chunk(Vec::new(), Some(usage)))?;
        }
        sink.send_done()
    }))
}
