//! The Responses API's request body (`POST /v1/responses`), as far as this server serves it:
//! stateless, text and images in, text out. Responses are built as JSON in `api::responses`.

use serde::Deserialize;
use utoipa::ToSchema;

use super::number::integer;

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: ResponsesInput,
    pub instructions: Option<String>,
    #[serde(default, deserialize_with = "integer")]
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stream: bool,
    pub user: Option<String>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Every other field, for the validator to refuse the ones OpenAI defines and we do not serve.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ResponsesInput {
    Text(String),
    Items(Vec<InputItem>),
}

/// One input message (`"type": "message"` may be given or left out).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct InputItem {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: String,
    pub content: InputContent,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InputContent {
    Text(String),
    Parts(Vec<InputPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(try_from = "RawInputPart")]
pub enum InputPart {
    /// `input_text`.
    Text(String),
    /// `output_text`: in an assistant message only.
    OutputText(String),
    Image {
        url: String,
        detail: Option<String>,
    },
}

/// A part as sent: its type must be the name itself (see `request::RawContentPart`).
#[derive(Deserialize)]
struct RawInputPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    image_url: Option<String>,
    detail: Option<String>,
}

impl TryFrom<RawInputPart> for InputPart {
    type Error = String;

    fn try_from(raw: RawInputPart) -> Result<Self, String> {
        match (raw.kind.as_str(), raw.text, raw.image_url) {
            ("input_text", Some(text), _) => Ok(InputPart::Text(text)),
            ("output_text", Some(text), _) => Ok(InputPart::OutputText(text)),
            ("input_image", _, Some(url)) => Ok(InputPart::Image {
                url,
                detail: raw.detail,
            }),
            ("input_text" | "output_text", None, _) => Err("a text part needs `text`".into()),
            ("input_image", _, None) => {
                Err("an image part needs `image_url` (files are not supported)".into())
            }
            (other, _, _) => Err(format!(
                "input part type {other:?} is not supported (input_text, input_image, output_text)"
            )),
        }
    }
}
