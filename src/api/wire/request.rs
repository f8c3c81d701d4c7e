//! OpenAI request bodies as clients send them. Unknown fields are ignored, as OpenAI ignores them,
//! except the ones OpenAI defines and this server does not implement (kept in `other`, refused by
//! `api::validate`); every field is optional where OpenAI's is, and checked in `api::validate`.
//! Fractions are read as f64 and checked before they are narrowed, so no value just outside a
//! bound rounds into it.

use serde::Deserialize;
use std::collections::HashMap;
use utoipa::ToSchema;

use super::number::integer;

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field, for the validator to refuse the ones OpenAI defines and we do not serve.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    /// A text prompt, token ids, or a list of either (each prompt gets `n` choices).
    pub prompt: PromptInput,
    /// Put the prompt's text before each choice's (with `max_tokens: 0`, the prompt alone).
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field, for the validator to refuse the ones OpenAI defines and we do not serve.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Tokens(TokenIds),
    Texts(Vec<String>),
    TokenLists(Vec<TokenIds>),
}

/// Token ids, each an integer as `number::integer` reads one.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenIds(#[serde(deserialize_with = "super::tokenize::token_ids")] pub Vec<u32>);

/// Generation fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "integer")]
    pub n: Option<u32>,
    #[serde(default, deserialize_with = "integer")]
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    #[serde(default, deserialize_with = "integer")]
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "integer")]
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM extension: 0 or -1 disables.
    #[serde(default, deserialize_with = "integer")]
    pub top_k: Option<i32>,
    /// vLLM extension.
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// vLLM extension (CTRL-style, 1 disables).
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
    /// Chat: a boolean. Completions: the number of top alternatives (legacy API).
    pub logprobs: Option<LogprobsField>,
    #[serde(default, deserialize_with = "integer")]
    pub top_logprobs: Option<u32>,
    /// vLLM extension: keep generating past EOS.
    pub ignore_eos: Option<bool>,
    /// vLLM extension: requests share prefix-cache entries only with requests of the same salt, so
    /// `cached_tokens` cannot reveal what other tenants sent.
    pub cache_salt: Option<String>,
    pub user: Option<String>,
    /// `text`, `json_object` or `json_schema` (structured outputs), on both endpoints as vLLM.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's structured outputs: `json`, `regex`, `choice`, `grammar` or `json_object`.
    pub structured_outputs: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LogprobsField {
    Flag(bool),
    Count(#[serde(deserialize_with = "whole_count")] u32),
}

/// An integer that may come as an integral float (`2.0`), as everywhere else.
fn whole_count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    integer(deserializer)?.ok_or_else(|| serde::de::Error::custom("expected an integer"))
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `developer` (treated as system), `user` or `assistant`.
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(try_from = "RawContentPart")]
pub enum ContentPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// A content part as sent. serde's own internally tagged enums also take a variant's index for
/// its name (`"type": 0` would be a text part); the type here must be the name itself.
#[derive(Deserialize)]
struct RawContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    image_url: Option<ImageUrl>,
}

impl TryFrom<RawContentPart> for ContentPart {
    type Error = String;

    fn try_from(raw: RawContentPart) -> Result<Self, String> {
        match (raw.kind.as_str(), raw.text, raw.image_url) {
            ("text", Some(text), _) => Ok(ContentPart::Text { text }),
            ("image_url", _, Some(image_url)) => Ok(ContentPart::ImageUrl { image_url }),
            ("text", None, _) => Err("a text part needs `text`".into()),
            ("image_url", _, None) => Err("an image part needs `image_url`".into()),
            (other, _, _) => Err(format!(
                "content part type {other:?} is not supported (text, image_url)"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ImageUrl {
    /// `data:image/...;base64,...` or an http(s) URL.
    pub url: String,
    /// `auto`, `low` or `high`: accepted, no effect (LLaVA-1.5 sees every image at one resolution).
    pub detail: Option<String>,
}
