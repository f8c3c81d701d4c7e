//! vLLM's `/tokenize` and `/detokenize` bodies.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::number::integer;
use super::ChatMessage;

/// `POST /tokenize`: a `prompt`, or chat `messages` rendered with the checkpoint's template.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// Whether the tokenizer adds BOS (default: for a prompt yes; for messages only where the
    /// template did not already put it there).
    pub add_special_tokens: Option<bool>,
    /// Messages only (default true).
    pub add_generation_prompt: Option<bool>,
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Tokens the prompt takes, each image expanded to its features.
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    #[serde(deserialize_with = "token_ids")]
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// Token ids, each an integer as `number::integer` reads one.
pub(crate) fn token_ids<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    struct Id(#[serde(deserialize_with = "integer")] Option<u32>);
    Vec::<Id>::deserialize(deserializer)?
        .into_iter()
        .map(|Id(id)| id.ok_or_else(|| serde::de::Error::custom("a token id is null")))
        .collect()
}
