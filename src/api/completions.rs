//! `POST /v1/completions`: text or token-id prompts (no template, no images), one or a list, each
//! with `n` choices (choice `i` of prompt `p` is index `p × n + i`, as OpenAI numbers them), whole
//! or streamed, the prompt's text first with `echo`.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokenizers::Tokenizer;

use super::access::TokenCounts;
use super::body::parse_json;
use super::error::ApiError;
use super::generation::{
    final_usage, finish_reason_str, prepare_completion, pump_events, run_to_completion, submit,
    token_text, Prepared,
};
use super::sse::{sse_response, SseSink, StreamEnd};
use super::state::{new_id, unix_now, SharedState};
use super::validate::{validate_completion, CompletionPrompt};
use super::wire::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorResponse,
    UsageWire,
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
    state.check_model(&req.model)?;
    let model = state.served()?;
    let key = client_key.as_ref().map(|k| k.0 .0.as_str());
    let valid = validate_completion(&req, &state.limits(model), key)?;
    let echoes: Vec<String> = if valid.echo {
        let tokenizer = model.builder.tokenizer();
        valid
            .prompts
            .iter()
            .map(|p| match p {
                CompletionPrompt::Text(text) => Ok(text.clone()),
                CompletionPrompt::Ids(ids) => tokenizer.decode(ids, false).map_err(|e| {
                    ApiError::invalid(format!("cannot decode the prompt: {e}"), "prompt")
                }),
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![String::new(); valid.prompts.len()]
    };
    let mut prepared = Vec::with_capacity(valid.prompts.len());
    for prompt in &valid.prompts {
        prepared.push(prepare_completion(&state, prompt, &valid.generation).await?);
    }
    let reply = Reply {
        id: new_id("cmpl"),
        created: unix_now(),
        model: req.model.clone(),
        fingerprint: state.system_fingerprint.clone(),
    };
    if valid.echo_only {
        return Ok(Json(echo_only(&reply, &prepared, &echoes, &counts)).into_response());
    }
    let include_usage = req
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    if req.sampling.stream {
        return stream_completion(state, reply, prepared, echoes, include_usage, counts);
    }
    let params = prepared[0].params.clone();
    let n = params.n;
    let first_tokens: Vec<u32> = prepared.iter().map(|p| p.prompt.token_ids[0]).collect();
    let mut runs = Vec::with_capacity(prepared.len());
    for p in prepared {
        let (stream, in_flight, tokenizer, usage) = submit(&state, p)?;
        let params = &params;
        runs.push(async move {
            let _in_flight = in_flight;
            let done = run_to_completion(stream, tokenizer.clone(), params, usage).await;
            (done, tokenizer)
        });
    }
    let mut choices = Vec::new();
    let mut usage = UsageWire::default();
    for (p, (done, tokenizer)) in futures_util::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        let done = done?;
        add_usage(&mut usage, &done.usage);
        let prompt = params
            .prompt_logprobs
            .map(|_| (first_tokens[p], done.prompt_logprobs.as_slice()));
        let lines = done.texts.into_iter().zip(done.finishes).zip(done.logprobs);
        for (i, ((text, finish), lp)) in lines.enumerate() {
            choices.push(CompletionChoice {
                index: p * n + i,
                text: format!("{}{text}", echoes[p]),
                logprobs: params
                    .logprobs
                    .map(|_| legacy_logprobs(&tokenizer, prompt, &lp)),
                finish_reason: Some(finish_reason_str(finish)),
            });
        }
    }
    counts.record(usage.prompt_tokens, usage.completion_tokens);
    Ok(Json(reply.response(choices, Some(usage))).into_response())
}

/// What every answer (and chunk) of one request repeats.
#[derive(Clone)]
struct Reply {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Reply {
    fn response(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<UsageWire>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        }
    }
}

/// Sums another prompt's usage into a request's.
fn add_usage(total: &mut UsageWire, one: &UsageWire) {
    total.prompt_tokens += one.prompt_tokens;
    total.completion_tokens += one.completion_tokens;
    total.total_tokens += one.total_tokens;
    let (t, o) = (&mut total.prompt_tokens_details, &one.prompt_tokens_details);
    t.cached_tokens += o.cached_tokens;
    t.image_tokens += o.image_tokens;
    t.text_tokens += o.text_tokens;
    t.prompt_tokens += o.prompt_tokens;
}

/// `echo` with `max_tokens: 0`: the prompts themselves (how evaluation harnesses ask for them),
/// nothing generated; each prompt's tokens are counted.
fn echo_only(
    reply: &Reply,
    prepared: &[Prepared],
    echoes: &[String],
    counts: &TokenCounts,
) -> CompletionResponse {
    let mut usage = UsageWire::default();
    let mut choices = Vec::new();
    for (p, prepared) in prepared.iter().enumerate() {
        let tokens = prepared.prompt.token_ids.len();
        usage.prompt_tokens += tokens;
        usage.total_tokens += tokens;
        usage.prompt_tokens_details.text_tokens += tokens;
        usage.prompt_tokens_details.prompt_tokens += tokens;
        let n = prepared.params.n;
        for i in 0..n {
            choices.push(CompletionChoice {
                index: p * n + i,
                text: echoes[p].clone(),
                logprobs: None,
                finish_reason: Some("length"),
            });
        }
    }
    counts.record(usage.prompt_tokens, 0);
    reply.response(choices, Some(usage))
}

/// A prompt to report before the generated tokens (`echo` with `logprobs`): its first token, which
/// has no score (nothing comes before it), and the scores of the rest.
type ScoredPrompt<'a> = Option<(u32, &'a [StepLogprobs])>;

/// The legacy API's logprobs of one choice: the scored prompt first when there is one (as OpenAI
/// and vLLM report an echoed prompt), then the generated tokens.
fn legacy_logprobs(
    tokenizer: &Tokenizer,
    prompt: ScoredPrompt<'_>,
    steps: &[StepLogprobs],
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    let mut push = |out: &mut CompletionLogprobs, id: u32, scored: Option<&StepLogprobs>| {
        let (token, _) = token_text(tokenizer, id);
        out.text_offset.push(offset);
        offset += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(scored.map(|s| s.chosen.logprob));
        out.top_logprobs.push(scored.map(|s| {
            s.top
                .iter()
                .map(|t| (token_text(tokenizer, t.token_id).0, t.logprob))
                .collect()
        }));
    };
    if let Some((first, scores)) = prompt {
        push(&mut out, first, None);
        for s in scores {
            push(&mut out, s.chosen.token_id, Some(s));
        }
    }
    for s in steps {
        push(&mut out, s.chosen.token_id, Some(s));
    }
    out
}

fn stream_completion(
    state: SharedState,
    reply: Reply,
    prepared: Vec<Prepared>,
    echoes: Vec<String>,
    include_usage: bool,
    counts: TokenCounts,
) -> Result<Response, ApiError> {
    let params = prepared[0].params.clone();
    let n = params.n;
    let first_tokens: Vec<u32> = prepared.iter().map(|p| p.prompt.token_ids[0]).collect();
    let mut submitted = Vec::with_capacity(prepared.len());
    for p in prepared {
        submitted.push(submit(&state, p)?);
    }
    Ok(sse_response(move |sink: SseSink| async move {
        let mut runs = Vec::with_capacity(submitted.len());
        for (p, (stream, in_flight, tokenizer, usage)) in submitted.into_iter().enumerate() {
            let (sink, params, reply, echo) = (&sink, &params, &reply, &echoes[p]);
            let first_token = first_tokens[p];
            runs.push(async move {
                let _in_flight = in_flight;
                let mut echoed = vec![echo.is_empty(); n];
                // Choice 0's first event carries the prompt's scores; each choice's echo repeats them.
                let mut prompt_scores = Vec::new();
                let choices = pump_events(stream, sink, tokenizer.clone(), params, |i, delta| {
                    if !delta.prompt_logprobs.is_empty() {
                        prompt_scores = delta.prompt_logprobs.clone();
                    }
                    if delta.text.is_empty() && delta.finish.is_none() && echoed[i] {
                        return Ok(());
                    }
                    let echoing = !echoed[i];
                    let text = if echoed[i] {
                        delta.text
                    } else {
                        echoed[i] = true;
                        format!("{echo}{}", delta.text)
                    };
                    let prompt = params
                        .prompt_logprobs
                        .filter(|_| echoing)
                        .map(|_| (first_token, prompt_scores.as_slice()));
                    let choice = CompletionChoice {
                        index: p * n + i,
                        text,
                        logprobs: params
                            .logprobs
                            .map(|_| legacy_logprobs(&tokenizer, prompt, &delta.logprobs)),
                        finish_reason: delta.finish.map(finish_reason_str),
                    };
                    sink.send_json(&reply.response(vec![choice], None))
                })
                .await?;
                Ok::<_, StreamEnd>(final_usage(usage, &choices))
            });
        }
        let mut usage = UsageWire::default();
        for one in futures_util::future::join_all(runs).await {
            add_usage(&mut usage, &one?);
        }
        counts.record(usage.prompt_tokens, usage.completion_tokens);
        if include_usage {
            sink.send_json(&reply.response(Vec::new(), Some(usage)))?;
        }
        sink.send_done()
    }))
}
