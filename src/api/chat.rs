//! `POST /v1/chat/completions`: whole answers, or `chat.completion.chunk` events over SSE.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::access::TokenCounts;
use super::body::parse_json;
use super::error::ApiError;
use super::generation::{
    chat_logprobs, finish_reason_str, prepare_chat, pump_events, run_to_completion, submit,
};
use super::sse::{sse_response, SseSink};
use super::state::{new_id, unix_now, SharedState};
use super::wire::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ErrorResponse,
};

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A chat completion, or (with `stream`) server-sent `chat.completion.chunk` events ending in `data: [DONE]`",
         content((ChatCompletionResponse = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
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
pub async fn chat_completions(
    State(state): State<SharedState>,
    client_key: Option<axum::Extension<super::auth::ClientKey>>,
    counts: Option<axum::Extension<TokenCounts>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let counts = counts.map(|c| c.0).unwrap_or_default();
    let req: ChatCompletionRequest = parse_json(&state, body)?;
    let stream = req.sampling.stream;
    let include_usage = req
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let key = client_key.as_ref().map(|k| k.0 .0.as_str());
    let prepared = prepare_chat(&state, &req, key).await?;
    if stream {
        Ok(stream_chat(
            state,
            req.model,
            prepared,
            include_usage,
            counts,
        )?)
    } else {
        let response = complete_chat(&state, req.model, prepared).await?;
        counts.record(
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        );
        Ok(Json(response).into_response())
    }
}

/// Runs a prepared chat request to its end (also used by `run-batch`).
pub async fn complete_chat(
    state: &SharedState,
    model: String,
    prepared: super::generation::Prepared,
) -> Result<ChatCompletionResponse, ApiError> {
    let params = prepared.params.clone();
    let (stream, _in_flight, tokenizer, usage) = submit(state, prepared)?;
    let done = run_to_completion(stream, tokenizer.clone(), &params, usage).await?;
    Ok(ChatCompletionResponse {
        id: new_id("chatcmpl"),
        object: "chat.completion",
        created: unix_now(),
        model,
        system_fingerprint: state.system_fingerprint.clone(),
        choices: done
            .texts
            .into_iter()
            .zip(done.finishes)
            .zip(done.logprobs)
            .enumerate()
            .map(|(index, ((content, finish), lp))| ChatChoice {
                index,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                },
                logprobs: params.logprobs.map(|_| ChatLogprobs {
                    content: chat_logprobs(&tokenizer, &lp),
                }),
                finish_reason: Some(finish_reason_str(finish)),
            })
            .collect(),
        usage: done.usage,
    })
}

fn stream_chat(
    state: SharedState,
    model: String,
    prepared: super::generation::Prepared,
    include_usage: bool,
    counts: TokenCounts,
) -> Result<Response, ApiError> {
    let params = prepared.params.clone();
    let (stream, in_flight, tokenizer, usage) = submit(&state, prepared)?;
    let id = new_id("chatcmpl");
    let created = unix_now();
    let fingerprint = state.system_fingerprint.clone();
    let chunk = move |choices: Vec<ChatChunkChoice>, usage| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        system_fingerprint: fingerprint.clone(),
        choices,
        usage,
    };
    Ok(sse_response(move |sink: SseSink| async move {
        let _in_flight = in_flight;
        for index in 0..params.n {
            let role = ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            let first = ChatChunkChoice {
                index,
                delta: role,
                logprobs: None,
                finish_reason: None,
            };
            sink.send_json(&chunk(vec![first], None))?;
        }
        let choices = pump_events(stream, &sink, tokenizer.clone(), &params, |index, delta| {
            if !delta.text.is_empty() || !delta.logprobs.is_empty() {
                let choice = ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: None,
                        content: Some(delta.text),
                    },
                    logprobs: params.logprobs.map(|_| ChatLogprobs {
                        content: chat_logprobs(&tokenizer, &delta.logprobs),
                    }),
                    finish_reason: None,
                };
                sink.send_json(&chunk(vec![choice], None))?;
            }
            if let Some(reason) = delta.finish {
                let choice = ChatChunkChoice {
                    index,
                    delta: ChatDelta::default(),
                    logprobs: None,
                    finish_reason: Some(finish_reason_str(reason)),
                };
                sink.send_json(&chunk(vec![choice], None))?;
            }
            Ok(())
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
