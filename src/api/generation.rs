//! The path every generation request takes, streamed or not, over HTTP or from `run-batch`: validate,
//! fetch and preprocess images off the async runtime, render and tokenize, submit, and turn the engine's
//! token events into per-choice text (stop strings included) and usage.

use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::error::ApiError;
use super::state::{AppState, InFlight, ServedModel, SharedState};
use super::telemetry::{self, RequestTimer};
use super::validate::{chat_messages, sampling_params};
use super::wire::{
    ChatCompletionRequest, PromptTokensDetails, TokenLogprobWire, TopLogprobWire, UsageWire,
};
use crate::engine::RequestStream;
use crate::frontend::ChoiceText;
use crate::types::{
    FinishReason, ProcessedImage, SamplingParams, StepLogprobs, TokenEvent, TokenizedPrompt,
};

/// A request ready for the engine.
pub struct Prepared {
    pub prompt: TokenizedPrompt,
    pub params: SamplingParams,
    /// Counted against the running + queued limit from admission, before any preparation work.
    pub in_flight: InFlight,
}

/// What can be refused from the request alone, before anything is fetched, decoded or tokenized:
/// the image count, and whether images and text could fit the context at all.
fn check_before_preparing(
    state: &AppState,
    model: &ServedModel,
    images: usize,
    text_bytes: usize,
    asked: Option<usize>,
) -> Result<(), ApiError> {
    let max_images = state.config.max_images_per_request;
    if images > max_images {
        return Err(ApiError::invalid(
            format!("{images} images given; at most {max_images} per request"),
            "messages",
        ));
    }
    let per_image = model.builder.features_per_image();
    let least = images * per_image + model.builder.min_tokens_for(text_bytes);
    let context = model.max_model_len;
    let prompt = if images == 0 {
        format!("the prompt is at least {least} tokens")
    } else {
        format!("the prompt is at least {least} tokens ({images} images of {per_image} tokens each, and the text)")
    };
    match asked {
        Some(m) if least + m > context => Err(ApiError::invalid(
            format!("{prompt} and max_tokens is {m}: together they exceed the context of {context} tokens"),
            "max_tokens",
        )),
        None if least >= context => Err(ApiError::invalid(
            format!("{prompt}, which fills the context of {context} tokens"),
            "messages",
        )),
        _ => Ok(()),
    }
}

/// The prefix-cache salt of a request: its `cache_salt`, and its API key when keys salt the cache.
fn cache_salt(
    state: &AppState,
    client_key: Option<&str>,
    requested: Option<&str>,
) -> Result<Option<[u8; 32]>, ApiError> {
    use sha2::{Digest, Sha256};
    if requested == Some("") {
        return Err(ApiError::invalid(
            "`cache_salt` must not be empty",
            "cache_salt",
        ));
    }
    let key = client_key.filter(|_| state.config.prefix_cache_salt_per_api_key);
    if key.is_none() && requested.is_none() {
        return Ok(None);
    }
    let mut hash = Sha256::new();
    // Length-prefixed parts, so no key/salt pair can produce another pair's bytes.
    for part in [key, requested] {
        let bytes = part.map_or(&[][..], str::as_bytes);
        hash.update((part.is_some() as u8).to_le_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    }
    Ok(Some(hash.finalize().into()))
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

/// Fills in `max_tokens` (the rest of the context when the client left it out) and checks the fit.
fn resolve_max_tokens(
    params: &mut SamplingParams,
    asked: Option<usize>,
    prompt_len: usize,
    max_model_len: usize,
) -> Result<(), ApiError> {
    let room = max_model_len.saturating_sub(prompt_len);
    params.max_tokens = match asked {
        Some(m) if prompt_len + m > max_model_len => {
            return Err(ApiError::invalid(
                format!(
                    "the prompt is {prompt_len} tokens and max_tokens is {m}: together they exceed the context of {max_model_len} tokens"
                ),
                "max_tokens",
            ))
        }
        Some(m) => m,
        None if room == 0 => {
            return Err(ApiError::invalid(
                format!("the prompt is {prompt_len} tokens, which fills the context of {max_model_len} tokens"),
                "messages",
            ))
        }
        None => room,
    };
    Ok(())
}

/// Fetches every image (concurrently), then decodes and preprocesses them on the blocking pool.
async fn load_images(
    state: &AppState,
    model: &ServedModel,
    urls: Vec<String>,
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
    let processor = model.processor.clone();
    let max_pixels = state.media.policy().max_pixels;
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

/// Validation, images and tokenization of a chat request.
pub async fn prepare_chat(
    state: &SharedState,
    req: &ChatCompletionRequest,
    client_key: Option<&str>,
) -> Result<Prepared, ApiError> {
    state.check_model(&req.model)?;
    let model = state.served()?;
    let (mut params, asked) = sampling_params(&req.sampling, true, model.vocab_size)?;
    let salt = cache_salt(state, client_key, req.sampling.cache_salt.as_deref())?;
    let (messages, urls) = chat_messages(&req.messages)?;
    let text_bytes = messages.iter().flat_map(|m| &m.parts).map(|p| match p {
        crate::frontend::MessagePart::Text(t) => t.len(),
        crate::frontend::MessagePart::Image => 0,
    });
    check_before_preparing(state, model, urls.len(), text_bytes.sum(), asked)?;
    let (in_flight, _preparing) = admit_and_wait(state).await?;
    let images = load_images(state, model, urls).await?;
    let builder = model.builder.clone();
    let mut prompt = tokio::task::spawn_blocking(move || builder.build(&messages, images, 0))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer worker failed: {e}")))??;
    prompt.cache_salt = salt;
    resolve_max_tokens(
        &mut params,
        asked,
        prompt.token_ids.len(),
        model.max_model_len,
    )?;
    Ok(Prepared {
        prompt,
        params,
        in_flight,
    })
}

/// Validation and tokenization of a plain text completion request (no images, no template), the
/// tokenization off the async runtime and only after a length bound that needs none.
pub async fn prepare_completion(
    state: &SharedState,
    model_name: &str,
    prompt: String,
    sampling: &super::wire::SamplingFields,
    client_key: Option<&str>,
) -> Result<Prepared, ApiError> {
    state.check_model(model_name)?;
    let model = state.served()?;
    let (mut params, asked) = sampling_params(sampling, false, model.vocab_size)?;
    let salt = cache_salt(state, client_key, sampling.cache_salt.as_deref())?;
    check_before_preparing(state, model, 0, prompt.len(), asked)?;
    let (in_flight, _preparing) = admit_and_wait(state).await?;
    let builder = model.builder.clone();
    let mut prompt = tokio::task::spawn_blocking(move || builder.tokenize(&prompt, Vec::new(), 0))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer worker failed: {e}")))??;
    prompt.cache_salt = salt;
    resolve_max_tokens(
        &mut params,
        asked,
        prompt.token_ids.len(),
        model.max_model_len,
    )?;
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
    let usage = UsageWire {
        prompt_tokens: prepared.prompt.token_ids.len(),
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: 0,
            image_tokens: prepared.prompt.image_spans.iter().map(|s| s.len).sum(),
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
