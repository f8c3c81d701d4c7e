//! The HTTP face of the server, and the only home of axum, utoipa and OpenAI's wire types: routes,
//! request parsing and validation, SSE framing, auth, the error → HTTP mapping, `/metrics`, the
//! OpenAPI document and `run-batch`. It orchestrates: frontend for inputs, engine for tokens.

pub mod access;
pub mod auth;
pub mod batch;
pub mod body;
pub mod chat;
pub mod completions;
pub mod error;
pub mod generation;
pub mod listener;
pub mod misc;
pub mod openapi;
pub mod request_schemas;
pub mod responses;
pub mod server;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod tokenize;
pub mod validate;
pub mod wire;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use utoipa_swagger_ui::SwaggerUi;

use state::SharedState;

/// Every route, with auth and the body cap.
pub fn router(state: SharedState) -> Router {
    telemetry::recorder(&state.config.served_model_name);
    let max_body = state.config.max_body_bytes;
    let served_model_name = state.config.served_model_name.clone();
    let allowed_origins = state.config.allowed_origins.clone();
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::create_response))
        .route("/v1/models", get(misc::models))
        .route("/v1/models/{*model}", get(misc::model))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(misc::health))
        .route("/metrics", get(misc::prometheus))
        .fallback(misc::unknown_route)
        .method_not_allowed_fallback(misc::wrong_method)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ))
        .with_state(state);
    let document = openapi::served_document(&served_model_name);
    api.merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", document))
        .layer(axum::middleware::from_fn(access::request_id_and_access_log))
        // Outermost, so a browser's preflight is answered before auth asks for a key.
        .layer(cors(&allowed_origins))
}

/// CORS as vLLM's `--allowed-origins` sets it: `*` (the default) or a list of origins; any method
/// and header.
fn cors(allowed_origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let origin = if allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            allowed_origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods(Any)
        .allow_headers(Any)
        .expose_headers([access::REQUEST_ID])
}
