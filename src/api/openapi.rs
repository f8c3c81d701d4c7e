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
        super::responses::create_response,
        super::misc::models,
        super::misc::model,
        super::tokenize::tokenize,
        super::tokenize::detokenize,
        super::misc::health,
        super::misc::prometheus,
    ),
    components(schemas(
        ChatCompletionRequest, CompletionRequest,
        TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse, ResponsesRequest,
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

/// The document as `/openapi.json` serves it: derived from the handlers and response types, with
/// the request bodies' exact schemas (`request_schemas`) in place of the derived ones.
pub fn openapi_document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    let schemas = &mut doc["components"]["schemas"];
    schemas["ChatCompletionRequest"] = super::request_schemas::chat_request();
    schemas["CompletionRequest"] = super::request_schemas::completion_request();
    schemas["TokenizeRequest"] = super::request_schemas::tokenize_request();
    schemas["DetokenizeRequest"] = super::request_schemas::detokenize_request();
    schemas["ResponsesRequest"] = super::request_schemas::responses_request();
    schemas["ResponseStreamEvent"] = serde_json::json!({
        "type": "object",
        "required": ["event", "data"],
        "description": "One server-sent event of a streamed response: its type in `event`, the event as JSON in `data`.",
        "properties": {"event": {"type": "string"}, "data": {"type": "string", "contentMediaType": "application/json"}}
    });
    doc["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]
        ["schema"] = serde_json::json!({"$ref": "#/components/schemas/ResponseStreamEvent"});
    // A stream is described one server-sent event at a time, as SSE clients (and schema checkers)
    // read it: a chunk as JSON in `data`, or the closing `[DONE]`.
    for (path, chunk) in [
        ("/v1/chat/completions", "ChatCompletionChunk"),
        ("/v1/completions", "CompletionResponse"),
    ] {
        let event = format!("{chunk}Event");
        doc["components"]["schemas"][&event] = serde_json::json!({
            "type": "object",
            "required": ["data"],
            "description": format!("One server-sent event: a `{chunk}` as JSON in `data`, or `[DONE]` last."),
            "properties": {
                "data": {"oneOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": format!("#/components/schemas/{chunk}")}}
                ]}
            }
        });
        doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"] =
            serde_json::json!({"$ref": format!("#/components/schemas/{event}")});
    }
    doc
}

/// The document a running server serves: the checked-in one, with `model` narrowed to the served
/// model's name (any other is a 404), so schema-driven clients generate requests that can succeed.
pub fn served_document(served_model_name: &str) -> serde_json::Value {
    let mut doc = openapi_document();
    for (request, optional) in [
        ("ChatCompletionRequest", false),
        ("CompletionRequest", false),
        ("TokenizeRequest", true),
        ("DetokenizeRequest", true),
        ("ResponsesRequest", false),
    ] {
        let names = if optional {
            serde_json::json!([served_model_name, null])
        } else {
            serde_json::json!([served_model_name])
        };
        doc["components"]["schemas"][request]["properties"]["model"] = serde_json::json!({
            "enum": names,
            "description": "The served model's name; any other is a 404."
        });
    }
    doc
}

/// The document as `print-openapi` writes it (and as `openapi/openapi.json` holds it).
pub fn openapi_json() -> String {
    serde_json::to_string_pretty(&openapi_document()).expect("the document serialises")
}
