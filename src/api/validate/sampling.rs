//! The generation fields both endpoints share → the engine's `SamplingParams`.

use crate::api::error::ApiError;
use crate::api::wire::{LogprobsField, SamplingFields, StopField};
use crate::types::SamplingParams;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 16;
/// Most alternatives per token in logprobs (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most stop sequences per request (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Largest `logit_bias` value, either way (OpenAI's limit).
pub const MAX_LOGIT_BIAS: f64 = 100.0;
/// The fraction fields and their inclusive bounds, checked here and stated in the OpenAPI
/// document from this one table (`top_p` must also be above 0).
pub const FRACTION_BOUNDS: [(&str, (f64, f64)); 6] = [
    ("temperature", (0.0, 2.0)),
    ("top_p", (0.0, 1.0)),
    ("min_p", (0.0, 1.0)),
    ("presence_penalty", (-2.0, 2.0)),
    ("frequency_penalty", (-2.0, 2.0)),
    ("repetition_penalty", (0.01, 2.0)),
];
/// Longest stop sequence, in characters as JSON Schema's `maxLength` counts them: every choice
/// scans its recent text for each stop after every token.
pub const MAX_STOP_CHARS: usize = 1024;

/// Checked in f64, the value as sent, before it is narrowed to the engine's f32: a value one ulp
/// past a bound must not round onto it.
fn check_range(name: &'static str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => {
            // Scientific notation past the everyday range: `-1e308`, not 309 digits.
            let shown = if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
                format!("{x:e}")
            } else {
                x.to_string()
            };
            Err(ApiError::invalid(
                format!("`{name}` must be between {lo} and {hi}, got {shown}"),
                name,
            ))
        }
        _ => Ok(()),
    }
}

/// Sampling fields → engine parameters. `max_tokens` is `None` when the client left it to the server.
pub(super) fn sampling_params(
    f: &SamplingFields,
    chat: bool,
    vocab_size: usize,
) -> Result<(SamplingParams, Option<usize>), ApiError> {
    for (name, (lo, hi)) in FRACTION_BOUNDS {
        let value = match name {
            "temperature" => f.temperature,
            "top_p" => f.top_p,
            "min_p" => f.min_p,
            "presence_penalty" => f.presence_penalty,
            "frequency_penalty" => f.frequency_penalty,
            _ => f.repetition_penalty,
        };
        check_range(name, value, lo, hi)?;
    }
    if f.top_p == Some(0.0) {
        return Err(ApiError::invalid("`top_p` must be greater than 0", "top_p"));
    }
    let n = f.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid(
            format!("`n` must be between 1 and {MAX_N}"),
            "n",
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("`top_k` must be -1, 0 or positive, got {k}"),
                "top_k",
            ))
        }
    };
    // Each budget field is checked on its own; `max_completion_tokens` (OpenAI's newer name)
    // wins when both are sent.
    for (name, value) in [
        ("max_completion_tokens", f.max_completion_tokens),
        ("max_tokens", f.max_tokens),
    ] {
        if value == Some(0) {
            return Err(ApiError::invalid(
                format!("`{name}` must be at least 1"),
                name,
            ));
        }
    }
    let max_tokens = f.max_completion_tokens.or(f.max_tokens).map(|m| m as usize);
    let stop = match &f.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) if v.len() > MAX_STOP_SEQUENCES => {
            return Err(ApiError::invalid(
                format!("`stop` takes at most {MAX_STOP_SEQUENCES} sequences"),
                "stop",
            ))
        }
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "`stop` sequences must not be empty",
            "stop",
        ));
    }
    if stop.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::invalid(
            format!("`stop` sequences must be at most {MAX_STOP_CHARS} characters long"),
            "stop",
        ));
    }
    let mut logit_bias = Vec::new();
    for (token, &bias) in f.logit_bias.iter().flatten() {
        // Token ids in their one decimal spelling ("7", not "07" or "+7"), as the document's
        // pattern states them.
        let id: u32 = token
            .parse()
            .ok()
            .filter(|id: &u32| (*id as usize) < vocab_size && id.to_string() == *token)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("`logit_bias` key {token:?} is not a token id below {vocab_size}"),
                    "logit_bias",
                )
            })?;
        if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
            return Err(ApiError::invalid(
                format!(
                    "`logit_bias` values must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}"
                ),
                "logit_bias",
            ));
        }
        logit_bias.push((id, bias as f32));
    }
    let logprobs = logprobs(f, chat)?;
    if f.stream_options.is_some() && !f.stream {
        return Err(ApiError::invalid(
            "`stream_options` is only allowed with `stream: true`",
            "stream_options",
        ));
    }
    let params = SamplingParams {
        n: n as usize,
        max_tokens: max_tokens.unwrap_or(1),
        temperature: f.temperature.unwrap_or(1.0) as f32,
        top_k,
        top_p: f.top_p.unwrap_or(1.0) as f32,
        min_p: f.min_p.unwrap_or(0.0) as f32,
        // JSON integers may be negative; the bits are what matter for a seed.
        seed: f.seed.map(|s| s as u64),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0) as f32,
        presence_penalty: f.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0) as f32,
        logit_bias,
        logprobs,
        prompt_logprobs: None,
        stop,
        stop_token_ids: Vec::new(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        skip_special_tokens: true,
        constraint: None,
    };
    Ok((params, max_tokens))
}

fn logprobs(f: &SamplingFields, chat: bool) -> Result<Option<usize>, ApiError> {
    if let Some(top) = f.top_logprobs {
        if top > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}"),
                "top_logprobs",
            ));
        }
    }
    match (&f.logprobs, chat) {
        (None, _) | (Some(LogprobsField::Flag(false)), _) => {
            if f.top_logprobs.is_some_and(|t| t > 0) {
                return Err(ApiError::invalid(
                    "`top_logprobs` needs `logprobs: true`",
                    "top_logprobs",
                ));
            }
            Ok(None)
        }
        (Some(LogprobsField::Flag(true)), true) => Ok(Some(f.top_logprobs.unwrap_or(0) as usize)),
        (Some(LogprobsField::Count(k)), false) if *k <= MAX_TOP_LOGPROBS => Ok(Some(*k as usize)),
        (Some(LogprobsField::Count(_)), false) => Err(ApiError::invalid(
            format!("`logprobs` must be at most {MAX_TOP_LOGPROBS}"),
            "logprobs",
        )),
        (Some(_), true) => Err(ApiError::invalid(
            "`logprobs` must be a boolean",
            "logprobs",
        )),
        (Some(LogprobsField::Flag(true)), false) => Ok(Some(0)),
    }
}
