//! The one validation boundary: a wire request becomes the values the rest of the server trusts.
//! Every rule is checked here, once, against one `Limits`, before anything is fetched, decoded or
//! tokenized; each error names the field it is about, as OpenAI's do. The only check left for
//! later is the context rule on the tokenized prompt (`types::ContextLimit`, the same rule applied
//! here to a lower bound of the prompt).

mod messages;
pub mod response_format;
mod sampling;

use serde_json::{Map, Value};

use super::error::ApiError;
use super::wire::{
    ChatCompletionRequest, CompletionRequest, PromptInput, SamplingFields, TokenizeRequest,
};
use crate::frontend::{ChatMessage, MessagePart};
use crate::types::{ContextLimit, OutputFormat, SamplingParams};

pub use sampling::{
    FRACTION_BOUNDS, MAX_LOGIT_BIAS, MAX_N, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS,
};

/// What a request is checked against: the served model's sizes and the server's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub vocab_size: usize,
    pub context: ContextLimit,
    pub max_images: usize,
    pub features_per_image: usize,
    /// Longest vocabulary entry in bytes: text of N bytes is at least N / this many tokens.
    pub max_token_bytes: usize,
    /// Whether the API key salts the prefix cache (`--prefix-cache-salt-per-api-key`).
    pub salt_per_api_key: bool,
}

/// What both endpoints share once valid.
#[derive(Debug, Clone)]
pub struct ValidGeneration {
    /// `max_tokens` is a placeholder until the prompt is tokenized: see `asked_max_tokens`.
    pub params: SamplingParams,
    /// What the client asked for; `None`: the rest of the context.
    pub asked_max_tokens: Option<usize>,
    /// The prefix-cache salt (`cache_salt`, and the API key when keys salt the cache).
    pub cache_salt: Option<[u8; 32]>,
    /// Structured outputs: compiled into `params.constraint` during preparation; with the field it
    /// came from, which a compile error names.
    pub output_format: Option<(OutputFormat, &'static str)>,
}

/// A chat request the server can serve, as far as the request alone can tell.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub messages: Vec<ChatMessage>,
    pub image_urls: Vec<String>,
    pub generation: ValidGeneration,
}

/// One prompt of a completion request.
#[derive(Debug, Clone)]
pub enum CompletionPrompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A completion request the server can serve, as far as the request alone can tell.
#[derive(Debug, Clone)]
pub struct ValidCompletion {
    pub prompts: Vec<CompletionPrompt>,
    /// Each choice's text starts with its prompt's.
    pub echo: bool,
    /// `max_tokens: 0` with `echo`: the prompts come back, nothing is generated.
    pub echo_only: bool,
    pub generation: ValidGeneration,
}

/// Most prompts one completion request may list; each gets `n` choices.
pub const MAX_PROMPTS: usize = 32;

/// The image `detail` values OpenAI defines; all mean the same here (LLaVA-1.5 sees every image at
/// one resolution).
pub const IMAGE_DETAILS: [&str; 3] = ["auto", "low", "high"];

/// Fields OpenAI's chat API defines that this server does not implement. Sent with any value but
/// `null` (or the value that asks for what the server does anyway), they get a 400 naming them:
/// a client that relies on one must not get a 200 that silently ignored it.
pub const REFUSED_CHAT_FIELDS: [&str; 9] = [
    "tools",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
];

/// The same for the legacy completions API.
pub const REFUSED_COMPLETION_FIELDS: [&str; 1] = ["suffix"];

/// vLLM's older structured-output fields, refused on both endpoints (`structured_outputs` and
/// `response_format` are served): ignoring them would give free text to a client that asked for
/// a format.
pub const REFUSED_GUIDED_FIELDS: [&str; 6] = [
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
];

pub fn validate_chat(
    req: &ChatCompletionRequest,
    limits: &Limits,
    api_key: Option<&str>,
) -> Result<ValidChat, ApiError> {
    refuse_unsupported(&req.other, &REFUSED_CHAT_FIELDS, req.sampling.n)?;
    let generation = generation(&req.sampling, true, limits, api_key)?;
    let (messages, image_urls) = messages::chat_messages(&req.messages)?;
    let text_bytes = messages
        .iter()
        .flat_map(|m| &m.parts)
        .map(|p| match p {
            MessagePart::Text(t) => t.len(),
            MessagePart::Image => 0,
        })
        .sum();
    fits_at_all(
        limits,
        image_urls.len(),
        text_bytes,
        generation.asked_max_tokens,
    )?;
    Ok(ValidChat {
        messages,
        image_urls,
        generation,
    })
}

pub fn validate_completion(
    req: &CompletionRequest,
    limits: &Limits,
    api_key: Option<&str>,
) -> Result<ValidCompletion, ApiError> {
    refuse_unsupported(&req.other, &REFUSED_COMPLETION_FIELDS, req.sampling.n)?;
    let prompts: Vec<CompletionPrompt> = match &req.prompt {
        PromptInput::Text(t) => vec![CompletionPrompt::Text(t.clone())],
        PromptInput::Tokens(ids) => vec![CompletionPrompt::Ids(ids.0.clone())],
        PromptInput::Texts(v) => v.iter().cloned().map(CompletionPrompt::Text).collect(),
        PromptInput::TokenLists(v) => v
            .iter()
            .map(|ids| CompletionPrompt::Ids(ids.0.clone()))
            .collect(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(
            format!("`prompt` takes 1 to {MAX_PROMPTS} prompts"),
            "prompt",
        ));
    }
    let echo = req.echo.unwrap_or(false);
    // `max_tokens: 0` asks for the prompt alone, which only `echo` gives (scored, with `logprobs`:
    // how evaluation harnesses ask for log-likelihoods); the other fields are checked as for a
    // generation.
    let zero = |v: Option<u32>| v == Some(0);
    let prompt_alone =
        echo && (zero(req.sampling.max_tokens) || zero(req.sampling.max_completion_tokens));
    let echo_only = prompt_alone && req.sampling.logprobs.is_none();
    let mut generation = if prompt_alone {
        let mut fields = req.sampling.clone();
        fields.max_tokens = None;
        fields.max_completion_tokens = None;
        let mut valid = generation(&fields, false, limits, api_key)?;
        valid.asked_max_tokens = Some(0);
        valid
    } else {
        generation(&req.sampling, false, limits, api_key)?
    };
    if echo {
        generation.params.prompt_logprobs = generation.params.logprobs;
    }
    for prompt in &prompts {
        match prompt {
            CompletionPrompt::Text(text) => {
                fits_at_all(limits, 0, text.len(), generation.asked_max_tokens)?
            }
            CompletionPrompt::Ids(ids) => {
                if ids.is_empty() {
                    return Err(ApiError::invalid(
                        "a token prompt must not be empty",
                        "prompt",
                    ));
                }
                if let Some(id) = ids.iter().find(|&&id| id as usize >= limits.vocab_size) {
                    return Err(ApiError::invalid(
                        format!(
                            "token id {id} is not below the vocabulary size {}",
                            limits.vocab_size
                        ),
                        "prompt",
                    ));
                }
                limits
                    .context
                    .fit(ids.len(), generation.asked_max_tokens)
                    .map_err(|o| {
                        context_error(o, &format!("the prompt is {} tokens", ids.len()))
                    })?;
            }
        }
    }
    Ok(ValidCompletion {
        prompts,
        echo,
        echo_only,
        generation,
    })
}

/// What `/tokenize` tokenizes.
#[derive(Debug, Clone)]
pub enum TokenizeInput {
    Prompt {
        text: String,
        add_special_tokens: bool,
    },
    Chat {
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
        /// `None`: BOS only where the template did not already put it.
        add_special_tokens: Option<bool>,
    },
}

pub fn validate_tokenize(
    req: &TokenizeRequest,
    limits: &Limits,
) -> Result<TokenizeInput, ApiError> {
    match (&req.prompt, &req.messages) {
        (Some(text), None) => {
            if req.add_generation_prompt.is_some() {
                return Err(ApiError::invalid(
                    "`add_generation_prompt` applies to `messages` only",
                    "add_generation_prompt",
                ));
            }
            Ok(TokenizeInput::Prompt {
                text: text.clone(),
                add_special_tokens: req.add_special_tokens.unwrap_or(true),
            })
        }
        (None, Some(wire)) => {
            let (messages, urls) = messages::chat_messages(wire)?;
            check_image_count(limits, urls.len())?;
            Ok(TokenizeInput::Chat {
                messages,
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                add_special_tokens: req.add_special_tokens,
            })
        }
        _ => Err(ApiError::invalid(
            "give either `prompt` or `messages`",
            None,
        )),
    }
}

fn generation(
    fields: &SamplingFields,
    chat: bool,
    limits: &Limits,
    api_key: Option<&str>,
) -> Result<ValidGeneration, ApiError> {
    let (params, asked_max_tokens) = sampling::sampling_params(fields, chat, limits.vocab_size)?;
    let cache_salt = cache_salt(limits, api_key, fields.cache_salt.as_deref())?;
    let output_format = match (
        response_format::response_format(fields.response_format.as_ref())?,
        response_format::structured_outputs(fields.structured_outputs.as_ref())?,
    ) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "`response_format` and `structured_outputs` cannot both ask for a format",
                "structured_outputs",
            ))
        }
        (Some(format), None) => Some((format, "response_format")),
        (None, Some(format)) => Some((format, "structured_outputs")),
        (None, None) => None,
    };
    Ok(ValidGeneration {
        params,
        asked_max_tokens,
        cache_salt,
        output_format,
    })
}

/// A 400 for the first refused field the request sets. Values that ask for what the server does
/// anyway pass: `tool_choice` `none`, `echo` false, `best_of` equal to `n`.
fn refuse_unsupported(
    other: &Map<String, Value>,
    refused: &[&'static str],
    n: Option<u32>,
) -> Result<(), ApiError> {
    let harmless = |name: &str, value: &Value| match name {
        "tool_choice" => value.as_str() == Some("none"),
        "echo" => value.as_bool() == Some(false),
        // Compared as a number, so `2.0` is `2` here as everywhere.
        "best_of" => value.as_f64() == Some(f64::from(n.unwrap_or(1))),
        _ => false,
    };
    let always = ["tool_choice", "best_of"];
    for name in refused
        .iter()
        .chain(&REFUSED_GUIDED_FIELDS)
        .chain(always.iter())
    {
        match other.get(*name) {
            None | Some(Value::Null) => {}
            Some(value) if harmless(name, value) => {}
            Some(_) => {
                let message = match *name {
                    "best_of" => "`best_of` is only supported equal to `n`".to_owned(),
                    guided if guided.starts_with("guided_") => format!(
                        "`{guided}` (vLLM's older form) is not supported: use `structured_outputs` \
                         or `response_format`"
                    ),
                    _ => format!("`{name}` is not supported by this server"),
                };
                return Err(ApiError::invalid(message, *name));
            }
        }
    }
    Ok(())
}

/// Responses API fields of features this stateless, text-only server does not serve. Their
/// harmless values pass: `store` false, empty `tools` and `include`, `tool_choice` `none` or
/// `auto` (no tools to call), `truncation` `disabled`, `background` false; `text` is an object whose
/// `format` the chat validator reads as `response_format`.
const REFUSED_RESPONSES_FIELDS: [&str; 14] = [
    "previous_response_id",
    "conversation",
    "prompt",
    "reasoning",
    "store",
    "tools",
    "tool_choice",
    "include",
    "text",
    "truncation",
    "background",
    "max_tool_calls",
    "top_logprobs",
    "prompt_cache_key",
];

pub fn refuse_unsupported_response_fields(other: &Map<String, Value>) -> Result<(), ApiError> {
    let harmless = |name: &str, value: &Value| match name {
        "store" | "background" => value.as_bool() == Some(false),
        "tools" | "include" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" => matches!(value.as_str(), Some("none" | "auto")),
        // Its `format` is read (and checked) as chat's `response_format`.
        "text" => value.is_object(),
        "truncation" => value.as_str() == Some("disabled"),
        "top_logprobs" => value.as_f64() == Some(0.0),
        _ => false,
    };
    for name in REFUSED_RESPONSES_FIELDS {
        match other.get(name) {
            None | Some(Value::Null) => {}
            Some(value) if harmless(name, value) => {}
            Some(_) => {
                let message = match name {
                    "store" | "previous_response_id" | "conversation" => format!(
                        "`{name}` is not supported: this server keeps no responses (send the whole conversation as `input`)"
                    ),
                    "text" => "`text` must be an object".to_owned(),
                    _ => format!("`{name}` is not supported by this server"),
                };
                return Err(ApiError::invalid(message, name));
            }
        }
    }
    Ok(())
}

/// What can be refused from the request alone: the image count, and whether the images and the
/// least number of tokens the text can become could fit the context at all.
fn fits_at_all(
    limits: &Limits,
    images: usize,
    text_bytes: usize,
    asked: Option<usize>,
) -> Result<(), ApiError> {
    check_image_count(limits, images)?;
    let per_image = limits.features_per_image;
    let least = images * per_image + text_bytes / limits.max_token_bytes.max(1);
    limits.context.fit(least, asked).map(drop).map_err(|overflow| {
        let prompt = if images == 0 {
            format!("the prompt is at least {least} tokens")
        } else {
            format!("the prompt is at least {least} tokens ({images} images of {per_image} tokens each, and the text)")
        };
        context_error(overflow, &prompt)
    })
}

fn check_image_count(limits: &Limits, images: usize) -> Result<(), ApiError> {
    if images > limits.max_images {
        return Err(ApiError::invalid(
            format!(
                "{images} images given; at most {} per request",
                limits.max_images
            ),
            "messages",
        ));
    }
    Ok(())
}

/// The API's error for a prompt and budget that do not fit, naming the field to change.
pub fn context_error(overflow: crate::types::ContextOverflow, prompt: &str) -> ApiError {
    let param = if overflow.max_tokens.is_some() {
        "max_tokens"
    } else {
        "messages"
    };
    ApiError::invalid(overflow.describe(prompt), param)
}

/// The prefix-cache salt of a request: its `cache_salt`, and its API key when keys salt the cache.
fn cache_salt(
    limits: &Limits,
    api_key: Option<&str>,
    requested: Option<&str>,
) -> Result<Option<[u8; 32]>, ApiError> {
    use sha2::{Digest, Sha256};
    if requested == Some("") {
        return Err(ApiError::invalid(
            "`cache_salt` must not be empty",
            "cache_salt",
        ));
    }
    let key = api_key.filter(|_| limits.salt_per_api_key);
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
