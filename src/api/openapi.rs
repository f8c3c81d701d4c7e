//! The OpenAPI document, assembled from the handlers' and wire types' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::wire::*;

#[derive(OpenApi)]
#[openapi(
    info(title = "llava-server", description = "OpenAI-compatible API for LLaVA vision-language models"),
    paths(
        super::chat::chat_completions,
        super::completions::completions,
        super::misc::models,
        super::misc::health,
        super::misc::prometheus,
    ),
    components(schemas(
        ChatCompletionRequest, CompletionRequest, SamplingFields, StreamOptions, StopField, LogprobsField,
        ChatMessage, MessageContent, ContentPart, ImageUrl, PromptInput,
        ChatCompletionResponse, ChatChoice, AssistantMessage, ChatCompletionChunk, ChatChunkChoice, ChatDelta,
        ChatLogprobs, TokenLogprobWire, TopLogprobWire, UsageWire, PromptTokensDetails,
        CompletionResponse, CompletionChoice, CompletionLogprobs, ModelList, ModelCard, ErrorResponse, ErrorObject,
    )),
    modifiers(&BearerAuth),
    tags((name = "OpenAI", description = "OpenAI-compatible endpoints"), (name = "Server", description = "Operations"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as `print-openapi` writes it (and as `openapi/openapi.json` holds it).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the document serialises")
}
