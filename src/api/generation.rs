//! The path every generation request takes, streamed or not, over HTTP or from `run-batch`: validate,
//! fetch and preprocess images off the async runtime, render and tokenize, submit, and turn the engine's
//! token events into per-choice text (stop strings included) and usage.

use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::error::ApiError;
use super::state::{AppState, InFlight, ServedModel, SharedState};
use super::telemetry::{self, RequestTimer};
use super::validate::{context_error, validate_chat, CompletionPrompt, ValidGeneration};
use super::wire::{
    ChatCompletionRequest, PromptTokensDetails, TokenLogprobWire, TopLogprobWire, UsageWire,
};
use crate::engine::RequestStream;
use crate::frontend::media::read_header;
use crate::frontend::ChoiceText;
use crate::types::{
    FinishReason, ProcessedImage, SamplingParams, StepLogprobs, TokenConstraint, TokenEvent,
    TokenizedPrompt,
};

/// A request ready for the engine.
pub struct Prepared {
    pub prompt: TokenizedPrompt,
    pub params: SamplingParams,
    /// Counted against the running + queued limit from admission, before any preparation work.
    pub in_flight: InFlight,
}

/// Admission, then a place in the bounded preparation stage: work on the request's images and text
/// starts only within both limits.
async fn admit_and_wait(
    state: &SharedState,
) -> Result<(InFlight, tokio::sync::SemaphorePermit<'_>), ApiError> {
    let in_flight = state.admit()?;
    let permit = state
        .preparing
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
    Ok((in_flight, permit))
}

/// The context rule on the tokenized prompt: fills in `max_tokens` (the rest of the context when
/// the client left it out) or refuses the request.
fn resolve_max_tokens(
    model: &ServedModel,
    params: &mut SamplingParams,
    asked: Option<usize>,
    prompt_tokens: usize,
) -> Result<(), ApiError> {
    params.max_tokens = model
        .engine
        .context_limit()
        .fit(prompt_tokens, asked)
        .map_err(|overflow| {
            context_error(overflow, &format!("the prompt is {prompt_tokens} tokens"))
        })?;
    Ok(())
}

/// Fetches every image (concurrently), then decodes and preprocesses them on the blocking pool.
async fn load_images(
    state: &AppState,
    model: &ServedModel,
    urls: Vec<String>,
    asked_max_tokens: Option<usize>,
) -> Result<Vec<ProcessedImage>, ApiError> {
    let fetched = futures_util::future::join_all(urls.iter().map(|u| async move {
        let started = Instant::now();
        let bytes = state.media.fetch(u).await;
        metrics::histogram!(telemetry::MEDIA_FETCH).record(started.elapsed().as_secs_f64());
        bytes
    }))
    .await;
    let mut bytes = Vec::with_capacity(fetched.len());
    for f in fetched {
        bytes.push(f?);
    }
    let max_pixels = state.media.policy().max_pixels;
    check_image_tokens_fit(state, model, &bytes, max_pixels, asked_max_tokens)?;
    let processor = model.processor.clone();
    let images = tokio::task::spawn_blocking(move || {
        bytes
            .iter()
            .map(|b| {
                let started = Instant::now();
                let rgb = processor.decode_within(b, max_pixels)?;
                let decoded = Instant::now();
                let image = processor.process(&rgb);
                metrics::histogram!(telemetry::MEDIA_DECODE)
                    .record((decoded - started).as_secs_f64());
                metrics::histogram!(telemetry::MEDIA_PREPROCESS)
                    .record(decoded.elapsed().as_secs_f64());
                Ok(image)
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("image worker failed: {e}")))??;
    Ok(images)
}

/// Where an image's token count depends on its size (LLaVA-NeXT), the counts from the images'
/// headers, before any pixel is decoded: images that cannot fit the context with `max_tokens` are
/// refused here rather than after decoding. (Validation counted each at the least any image takes.)
fn check_image_tokens_fit(
    state: &AppState,
    model: &ServedModel,
    images: &[Vec<u8>],
    max_pixels: u64,
    asked_max_tokens: Option<usize>,
) -> Result<(), ApiError> {
    if !model.builder.image_counts_vary() || images.is_empty() {
        return Ok(());
    }
    let mut counts = Vec::with_capacity(images.len());
    for bytes in images {
        let (width, height) = read_header(bytes, max_pixels)?.size();
        counts.push(model.builder.image_token_count(height, width));
    }
    let least: usize = counts.iter().sum();
    let limits = state.limits(model);
    limits
        .context
        .fit(least, asked_max_tokens)
        .map(drop)
        .map_err(|overflow| {
            context_error(
                overflow,
                &format!("the prompt is at least {least} tokens (images of {counts:?} tokens, by their sizes, and the text)"),
            )
        })
}

/// Validation, images and tokenization of a chat request.
pub async fn prepare_chat(
    state: &SharedState,
    req: &ChatCompletionRequest,
    client_key: Option<&str>,
) -> Result<Prepared, ApiError> {
    state.check_model(&req.model)?;
    let model = state.served()?;
    let valid = validate_chat(req, &state.limits(model), client_key)?;
    let (in_flight, _preparing) = admit_and_wait(state).await?;
    let constraint = compile_output_format(model, &valid.generation).await?;
    let images = load_images(
        state,
        model,
        valid.image_urls,
        valid.generation.asked_max_tokens,
    )
    .await?;
    let builder = model.builder.clone();
    let messages = valid.messages;
    let prompt = tokio::task::spawn_blocking(move || builder.build(&messages, images))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer worker failed: {e}")))??;
    let mut generation = valid.generation;
    for stop in model.builder.template_stop_strings() {
        if !generation.params.stop.contains(&stop) {
            generation.params.stop.push(stop);
        }
    }
    finish_preparing(model, prompt, generation, constraint, in_flight)
}

/// Admission and tokenization of one prompt of a validated completion request (no images, no
/// template), the tokenization off the async runtime.
pub async fn prepare_completion(
    state: &SharedState,
    prompt: &CompletionPrompt,
    generation: &ValidGeneration,
) -> Result<Prepared, ApiError> {
    let model = state.served()?;
    let (in_flight, _preparing) = admit_and_wait(state).await?;
    let constraint = compile_output_format(model, generation).await?;
    let tokenized = match prompt {
        CompletionPrompt::Ids(ids) => TokenizedPrompt {
            token_ids: ids.clone(),
            images: Vec::new(),
            image_spans: Vec::new(),
            cache_salt: None,
        },
        CompletionPrompt::Text(text) => {
            let builder = model.builder.clone();
            let text = text.clone();
            tokio::task::spawn_blocking(move || builder.tokenize(&text, Vec::new()))
                .await
                .map_err(|e| ApiError::internal(format!("tokenizer worker failed: {e}")))??
        }
    };
    finish_preparing(model, tokenized, generation.clone(), constraint, in_flight)
}

/// The response format's grammar, compiled off the async runtime (or taken from the cache), first
/// of the admitted work: a format that cannot compile is refused before any image is fetched or
/// any text tokenized.
async fn compile_output_format(
    model: &ServedModel,
    generation: &ValidGeneration,
) -> Result<Option<TokenConstraint>, ApiError> {
    let Some((format, field)) = generation.output_format.clone() else {
        return Ok(None);
    };
    let structured = model.structured.clone();
    let constraint = tokio::task::spawn_blocking(move || structured.compile(&format))
        .await
        .map_err(|e| ApiError::internal(format!("grammar worker failed: {e}")))?
        .map_err(|e| ApiError::invalid(e.to_string(), field))?;
    Ok(Some(constraint))
}

/// The tokenized prompt checked against the context, salted and paired with its parameters and
/// its response format's grammar.
fn finish_preparing(
    model: &ServedModel,
    mut prompt: TokenizedPrompt,
    generation: ValidGeneration,
    constraint: Option<TokenConstraint>,
    in_flight: InFlight,
) -> Result<Prepared, ApiError> {
    let mut params = generation.params;
    resolve_max_tokens(
        model,
        &mut params,
        generation.asked_max_tokens,
        prompt.token_ids.len(),
    )?;
    prompt.cache_salt = generation.cache_salt;
    params.constraint = constraint;
    Ok(Prepared {
        prompt,
        params,
        in_flight,
    })
}

/// Submits a prepared (and so already admitted) request.
pub fn submit(
    state: &SharedState,
    prepared: Prepared,
) -> Result<(RequestStream, InFlight, Arc<Tokenizer>, UsageWire), ApiError> {
    let model = state.served()?;
    let guard = prepared.in_flight;
    let prompt_tokens = prepared.prompt.token_ids.len();
    let image_tokens: usize = prepared.prompt.image_spans.iter().map(|s| s.len).sum();
    let usage = UsageWire {
        prompt_tokens,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: 0,
            image_tokens,
            text_tokens: prompt_tokens - image_tokens,
            prompt_tokens: prompt_tokens - image_tokens,
        },
        ..UsageWire::default()
    };
    let stream = model
        .engine
        .submit(prepared.prompt, prepared.params.clone())?;
    Ok((stream, guard, model.builder.tokenizer().clone(), usage))
}

/// One choice's progress: text so far is emitted as deltas; finish once the engine or a stop string ends it.
pub struct ChoiceProgress {
    text: ChoiceText,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    pub cached_prompt_tokens: usize,
}

/// What one engine event adds to a choice.
pub struct ChoiceDelta {
    pub text: String,
    pub logprobs: Vec<StepLogprobs>,
    /// Scores of the prompt's tokens after the first (`prompt_logprobs`), on choice 0's first delta.
    pub prompt_logprobs: Vec<StepLogprobs>,
    pub finish: Option<FinishReason>,
    /// A stop string ended the choice here, before the engine did: the engine should stop it.
    pub stop_string: bool,
}

impl ChoiceProgress {
    pub fn new(tokenizer: Arc<Tokenizer>, params: &SamplingParams) -> Self {
        Self {
            text: ChoiceText::new(tokenizer, params.skip_special_tokens, params.stop.clone()),
            finish: None,
            completion_tokens: 0,
            cached_prompt_tokens: 0,
        }
    }

    pub fn apply(&mut self, event: &TokenEvent) -> Result<ChoiceDelta, ApiError> {
        let mut delta = ChoiceDelta {
            text: String::new(),
            logprobs: Vec::new(),
            prompt_logprobs: event.prompt_logprobs.clone(),
            finish: None,
            stop_string: false,
        };
        if self.finish.is_some() {
            return Ok(delta);
        }
        self.completion_tokens += event.token_ids.len();
        self.cached_prompt_tokens = event.cached_prompt_tokens;
        let pushed = self.text.push(&event.token_ids)?;
        delta.text = pushed.text;
        delta.logprobs = event.logprobs.clone();
        if pushed.hit_stop_string {
            delta.finish = Some(FinishReason::Stop);
            delta.stop_string = event.finish_reason.is_none();
        } else if let Some(reason) = event.finish_reason {
            delta.text.push_str(&self.text.finish()?.text);
            delta.finish = Some(reason);
        }
        self.finish = delta.finish;
        Ok(delta)
    }
}

/// Usage once every choice is done (counted here, since stop strings end choices before the engine).
pub fn final_usage(mut usage: UsageWire, choices: &[ChoiceProgress]) -> UsageWire {
    usage.completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    usage.prompt_tokens_details.cached_tokens =
        choices.first().map_or(0, |c| c.cached_prompt_tokens);
    usage
}

pub fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A token as text for logprobs: its vocabulary piece with SentencePiece's `▁` as a space and byte
/// tokens as their byte; `bytes` are the UTF-8 (or raw) bytes.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let piece = tokenizer.id_to_token(id).unwrap_or_default();
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if let Ok(byte) = u8::from_str_radix(hex, 16) {
            return (String::from_utf8_lossy(&[byte]).into_owned(), vec![byte]);
        }
    }
    let text = piece.replace('\u{2581}', " ");
    let bytes = text.as_bytes().to_vec();
    (text, bytes)
}

pub fn chat_logprobs(tokenizer: &Tokenizer, steps: &[StepLogprobs]) -> Vec<TokenLogprobWire> {
    steps
        .iter()
        .map(|s| {
            let (token, bytes) = token_text(tokenizer, s.chosen.token_id);
            TokenLogprobWire {
                token,
                logprob: s.chosen.logprob,
                bytes,
                top_logprobs: s
                    .top
                    .iter()
                    .map(|t| {
                        let (token, bytes) = token_text(tokenizer, t.token_id);
                        TopLogprobWire {
                            token,
                            logprob: t.logprob,
                            bytes,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Every choice's text, finish and logprobs, by running the request to its end.
pub struct Completed {
    pub texts: Vec<String>,
    pub finishes: Vec<FinishReason>,
    pub logprobs: Vec<Vec<StepLogprobs>>,
    /// Scores of the prompt's tokens after the first, with `prompt_logprobs`.
    pub prompt_logprobs: Vec<StepLogprobs>,
    pub usage: UsageWire,
}

pub async fn run_to_completion(
    mut stream: RequestStream,
    tokenizer: Arc<Tokenizer>,
    params: &SamplingParams,
    usage: UsageWire,
) -> Result<Completed, ApiError> {
    let n = params.n;
    let mut choices: Vec<ChoiceProgress> = (0..n)
        .map(|_| ChoiceProgress::new(tokenizer.clone(), params))
        .collect();
    let mut texts = vec![String::new(); n];
    let mut logprobs = vec![Vec::new(); n];
    let mut prompt_logprobs = Vec::new();
    // Dropped with this future when the client leaves: counted as aborted.
    let mut timer = RequestTimer::start();
    while choices.iter().any(|c| c.finish.is_none()) {
        let Some(event) = stream.next().await else {
            timer.counted_elsewhere();
            return Err(ApiError::internal("the engine ended the request early"));
        };
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                timer.counted_elsewhere();
                return Err(e.into());
            }
        };
        timer.on_event(event.usage.as_ref());
        let delta = match choices[event.index].apply(&event) {
            Ok(delta) => delta,
            Err(e) => {
                timer.counted_elsewhere();
                return Err(e);
            }
        };
        if delta.stop_string {
            stream.stop_choice(event.index);
        }
        texts[event.index].push_str(&delta.text);
        logprobs[event.index].extend(delta.logprobs);
        prompt_logprobs.extend(delta.prompt_logprobs);
    }
    // Every choice has finished, so dropping the stream frees nothing more (the abort is a no-op).
    drop(stream);
    timer.finish();
    Ok(Completed {
        texts,
        finishes: choices
            .iter()
            .map(|c| c.finish.expect("all finished"))
            .collect(),
        logprobs,
        prompt_logprobs,
        usage: final_usage(usage, &choices),
    })
}

/// Streams a request's events as per-choice deltas through `emit` until every choice has finished,
/// stopping as soon as the client leaves; records TTFT, inter-token and end-to-end latency. Returns the
/// choices (for usage) once done. Engine failures become an SSE error frame.
pub async fn pump_events(
    mut stream: RequestStream,
    sink: &super::sse::SseSink,
    tokenizer: Arc<Tokenizer>,
    params: &SamplingParams,
    mut emit: impl FnMut(usize, ChoiceDelta) -> Result<(), super::sse::StreamEnd>,
) -> Result<Vec<ChoiceProgress>, super::sse::StreamEnd> {
    // Dropped on an early return when the client leaves: counted as aborted.
    let mut timer = RequestTimer::start();
    let mut choices: Vec<ChoiceProgress> = (0..params.n)
        .map(|_| ChoiceProgress::new(tokenizer.clone(), params))
        .collect();
    while choices.iter().any(|c| c.finish.is_none()) {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = sink.closed() => return Err(super::sse::StreamEnd),
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                let e = ApiError::from(e);
                timer.failed(e.status().as_u16());
                return Err(sink.fail(&e));
            }
            None => {
                let e = ApiError::internal("the engine ended the request early");
                timer.failed(e.status().as_u16());
                return Err(sink.fail(&e));
            }
        };
        timer.on_event(event.usage.as_ref());
        let index = event.index;
        let delta = match choices[index].apply(&event) {
            Ok(delta) => delta,
            Err(e) => {
                timer.failed(e.status().as_u16());
                return Err(sink.fail(&e));
            }
        };
        if delta.stop_string {
            stream.stop_choice(index);
        }
        emit(index, delta)?;
    }
    drop(stream);
    timer.finish();
    Ok(choices)
}
