//! `POST /v1/responses`, stateless: the input (a string, or messages of text and image parts) and
//! `instructions` become a chat request that takes the chat path (validation, images, engine);
//! the answer comes back as a Response object, or as the Responses event sequence when streamed.
//! Nothing is stored, so `store: true`, `previous_response_id` and the fields of features not
//! served (tools, reasoning, structured `text.format`) get a 400 naming them.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::access::TokenCounts;
use super::body::parse_json;
use super::chat::complete_chat;
use super::error::ApiError;
use super::generation::{final_usage, prepare_chat, pump_events, submit, Prepared};
use super::sse::{sse_response, SseSink, StreamEnd};
use super::state::{new_id, unix_now, SharedState};
use super::validate::{refuse_unsupported_response_fields, response_format};
use super::wire::{
    ChatCompletionRequest, ChatMessage, ContentPart, ErrorResponse, ImageUrl, InputContent,
    InputPart, MessageContent, ResponsesInput, ResponsesRequest, SamplingFields, UsageWire,
};
use crate::types::FinishReason;

#[utoipa::path(
    post,
    path = "/v1/responses",
    request_body = ResponsesRequest,
    responses(
        (status = 200, description = "A Response object, or (with `stream`) the Responses events, `response.created` … `response.completed`",
         content((Object = "application/json"), (Object = "text/event-stream"))),
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
pub async fn create_response(
    State(state): State<SharedState>,
    client_key: Option<axum::Extension<super::auth::ClientKey>>,
    counts: Option<axum::Extension<TokenCounts>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let counts = counts.map(|c| c.0).unwrap_or_default();
    let req: ResponsesRequest = parse_json(&state, body)?;
    refuse_unsupported_response_fields(&req.other)?;
    let chat = chat_request(&req)?;
    let key = client_key.as_ref().map(|k| k.0 .0.as_str());
    let prepared = prepare_chat(&state, &chat, key).await?;
    let meta = ResponseMeta::new(&req);
    if req.stream {
        return stream_response(state, prepared, meta, counts);
    }
    let answer = complete_chat(&state, req.model.clone(), prepared).await?;
    counts.record(answer.usage.prompt_tokens, answer.usage.completion_tokens);
    let choice = &answer.choices[0];
    let finish = match choice.finish_reason {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let item = message_item(&new_id("msg"), "completed", Some(&choice.message.content));
    Ok(Json(meta.object(finish_status(finish), vec![item], Some(&answer.usage))).into_response())
}

/// `text.format`, when the request sets one.
fn text_format(req: &ResponsesRequest) -> Option<&Value> {
    req.other
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
}

/// The Responses input as chat messages: `instructions` first, as a system message.
fn chat_request(req: &ResponsesRequest) -> Result<ChatCompletionRequest, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = &req.instructions {
        messages.push(message(
            "system",
            MessageContent::Text(instructions.clone()),
        ));
    }
    match &req.input {
        ResponsesInput::Text(text) => {
            messages.push(message("user", MessageContent::Text(text.clone())));
        }
        ResponsesInput::Items(items) if items.is_empty() => {
            return Err(ApiError::invalid("`input` must not be empty", "input"));
        }
        ResponsesInput::Items(items) => {
            for (i, item) in items.iter().enumerate() {
                // An item of another type (a function call, a reasoning item) keeps its type as
                // the role, which the chat validator refuses by name.
                let role = match item.kind.as_deref() {
                    None | Some("message") => item.role.clone(),
                    Some(other) => other.to_owned(),
                };
                let content = match &item.content {
                    InputContent::Text(text) => MessageContent::Text(text.clone()),
                    InputContent::Parts(parts) => {
                        let output = parts.iter().any(|p| matches!(p, InputPart::OutputText(_)));
                        if output && role != "assistant" {
                            return Err(ApiError::InvalidRequest {
                                message: format!(
                                    "input[{i}]: `output_text` parts belong to assistant messages"
                                ),
                                param: Some(format!("input[{i}].content")),
                            });
                        }
                        MessageContent::Parts(parts.iter().map(content_part).collect())
                    }
                };
                messages.push(message(&role, content));
            }
        }
    }
    Ok(ChatCompletionRequest {
        model: req.model.clone(),
        messages,
        sampling: SamplingFields {
            stream: req.stream,
            max_completion_tokens: req.max_output_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            user: req.user.clone(),
            response_format: text_format(req).map(response_format::from_text_format),
            ..SamplingFields::default()
        },
        other: Map::new(),
    })
}

fn message(role: &str, content: MessageContent) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content: Some(content),
        name: None,
    }
}

fn content_part(part: &InputPart) -> ContentPart {
    match part {
        InputPart::Text(text) | InputPart::OutputText(text) => {
            ContentPart::Text { text: text.clone() }
        }
        InputPart::Image { url, detail } => ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: url.clone(),
                detail: detail.clone(),
            },
        },
    }
}

fn finish_status(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "completed",
        FinishReason::Length => "incomplete",
    }
}

/// An output message item; `text` `None` while it is still empty (streaming).
fn message_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content: Vec<Value> = text.map(output_text).into_iter().collect();
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// What every Response object of one request repeats.
struct ResponseMeta {
    id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: f64,
    top_p: f64,
    user: Option<String>,
    metadata: Map<String, Value>,
    /// `text.format` as asked, echoed in the response object.
    text_format: Value,
}

impl ResponseMeta {
    fn new(req: &ResponsesRequest) -> Self {
        Self {
            id: new_id("resp"),
            created_at: unix_now(),
            model: req.model.clone(),
            instructions: req.instructions.clone(),
            max_output_tokens: req.max_output_tokens,
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.unwrap_or(1.0),
            user: req.user.clone(),
            metadata: req.metadata.clone().unwrap_or_default(),
            text_format: text_format(req)
                .cloned()
                .unwrap_or_else(|| json!({"type": "text"})),
        }
    }

    fn object(&self, status: &str, output: Vec<Value>, usage: Option<&UsageWire>) -> Value {
        let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
        let usage = usage.map(|u| {
            json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens
            })
        });
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "usage": usage, "error": null,
            "incomplete_details": incomplete, "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "user": self.user, "metadata": self.metadata,
            "parallel_tool_calls": false, "tool_choice": "none", "tools": [],
            "text": {"format": self.text_format}, "truncation": "disabled", "store": false,
            "previous_response_id": null, "reasoning": null
        })
    }
}

/// The Responses event sequence, each event numbered.
struct Events<'a> {
    sink: &'a SseSink,
    sequence_number: u64,
}

impl Events<'_> {
    fn send(&mut self, kind: &str, mut event: Value) -> Result<(), StreamEnd> {
        event["type"] = json!(kind);
        event["sequence_number"] = json!(self.sequence_number);
        self.sequence_number += 1;
        self.sink.send_named(kind, &event)
    }
}

fn stream_response(
    state: SharedState,
    prepared: Prepared,
    meta: ResponseMeta,
    counts: TokenCounts,
) -> Result<Response, ApiError> {
    let params = prepared.params.clone();
    let (stream, in_flight, tokenizer, usage) = submit(&state, prepared)?;
    Ok(sse_response(move |sink: SseSink| async move {
        let _in_flight = in_flight;
        let item_id = new_id("msg");
        let mut events = Events {
            sink: &sink,
            sequence_number: 0,
        };
        let started = meta.object("in_progress", Vec::new(), None);
        events.send("response.created", json!({"response": started}))?;
        events.send("response.in_progress", json!({"response": started}))?;
        let at = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        let item = message_item(&item_id, "in_progress", None);
        events.send(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        )?;
        let mut added = at.clone();
        added["part"] = output_text("");
        events.send("response.content_part.added", added)?;
        let mut text = String::new();
        let choices = pump_events(stream, &sink, tokenizer, &params, |_, delta| {
            if delta.text.is_empty() {
                return Ok(());
            }
            text.push_str(&delta.text);
            let mut event = at.clone();
            event["delta"] = json!(delta.text);
            event["logprobs"] = json!([]);
            events.send("response.output_text.delta", event)
        })
        .await?;
        let usage = final_usage(usage, &choices);
        counts.record(usage.prompt_tokens, usage.completion_tokens);
        let finish = choices[0].finish.unwrap_or(FinishReason::Stop);
        let mut done = at.clone();
        done["text"] = json!(text);
        done["logprobs"] = json!([]);
        events.send("response.output_text.done", done)?;
        let mut part_done = at;
        part_done["part"] = output_text(&text);
        events.send("response.content_part.done", part_done)?;
        let item = message_item(&item_id, "completed", Some(&text));
        events.send(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        )?;
        let status = finish_status(finish);
        let last = match finish {
            FinishReason::Stop => "response.completed",
            FinishReason::Length => "response.incomplete",
        };
        let response = meta.object(status, vec![item], Some(&usage));
        events.send(last, json!({ "response": response }))
    }))
}
