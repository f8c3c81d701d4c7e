//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes. Chat messages are rendered with the
//! checkpoint's template and each image is expanded to the tokens the model sees for it (576 for
//! LLaVA-1.5 at 336 px), so `count` is what a request with these messages takes of the context.
//! Image URLs are not fetched: a fixed-resolution model's image is the same number of tokens
//! whatever its size.

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;

use super::body::parse_json;
use super::error::ApiError;
use super::state::SharedState;
use super::validate::{validate_tokenize, TokenizeInput};
use super::wire::{
    DetokenizeRequest, DetokenizeResponse, ErrorResponse, TokenizeRequest, TokenizeResponse,
};
use crate::frontend::MessagePart;

#[utoipa::path(
    post,
    path = "/tokenize",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The prompt's token ids, images expanded", body = TokenizeResponse),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 503, description = "Loading or shutting down", body = ErrorResponse),
    ),
    security(("bearer" = [])),
    tag = "Server"
)]
pub async fn tokenize(
    State(state): State<SharedState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req: TokenizeRequest = parse_json(&state, body)?;
    if let Some(model) = &req.model {
        state.check_model(model)?;
    }
    let model = state.served()?;
    let input = validate_tokenize(&req, &state.limits(model))?;
    let builder = model.builder.clone();
    if let TokenizeInput::Chat { messages, .. } = &input {
        let has_images = messages
            .iter()
            .any(|m| m.parts.iter().any(|p| matches!(p, MessagePart::Image)));
        if has_images && builder.image_counts_vary() {
            return Err(ApiError::invalid(
                "this model's images become as many tokens as their size gives (LLaVA-NeXT), and /tokenize does not fetch images: send the request to /v1/chat/completions, whose usage counts them",
                "messages",
            ));
        }
    }
    let strs = req.return_token_strs.unwrap_or(false);
    // Tokenizing is CPU work: off the async runtime, and within the preparation stage's width.
    let _place = state
        .preparing
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
    let (tokens, token_strs) = tokio::task::spawn_blocking(move || {
        let (text, add_special) = match input {
            TokenizeInput::Prompt {
                text,
                add_special_tokens,
            } => (text, add_special_tokens),
            TokenizeInput::Chat {
                messages,
                add_generation_prompt,
                add_special_tokens,
            } => {
                let text = builder.render_with(&messages, add_generation_prompt)?;
                let add = add_special_tokens.unwrap_or_else(|| builder.adds_bos(&text));
                (text, add)
            }
        };
        let (ids, _) = builder.expanded_ids(&text, add_special)?;
        let tokenizer = builder.tokenizer();
        let token_strs = strs.then(|| {
            ids.iter()
                .map(|&id| tokenizer.id_to_token(id).unwrap_or_default())
                .collect()
        });
        Ok::<_, ApiError>((ids, token_strs))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer worker failed: {e}")))??;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.max_model_len,
        tokens,
        token_strs,
    }))
}

#[utoipa::path(
    post,
    path = "/detokenize",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The ids' text, special tokens included", body = DetokenizeResponse),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 503, description = "Loading or shutting down", body = ErrorResponse),
    ),
    security(("bearer" = [])),
    tag = "Server"
)]
pub async fn detokenize(
    State(state): State<SharedState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let req: DetokenizeRequest = parse_json(&state, body)?;
    if let Some(model) = &req.model {
        state.check_model(model)?;
    }
    let model = state.served()?;
    if let Some(&id) = req
        .tokens
        .iter()
        .find(|&&id| id as usize >= model.vocab_size)
    {
        return Err(ApiError::invalid(
            format!(
                "token id {id} is not below the vocabulary size {}",
                model.vocab_size
            ),
            "tokens",
        ));
    }
    let tokenizer = model.builder.tokenizer().clone();
    let _place = state
        .preparing
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
    // As vLLM's: special tokens are kept, so the text shows what the model was given.
    let prompt = tokio::task::spawn_blocking(move || tokenizer.decode(&req.tokens, false))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer worker failed: {e}")))?
        .map_err(|e| ApiError::invalid(format!("cannot decode: {e}"), "tokens"))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
