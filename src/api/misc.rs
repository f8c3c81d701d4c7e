//! `GET /v1/models`, `GET /health` and `GET /metrics`.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::state::SharedState;
use super::wire::{ErrorResponse, ModelCard, ModelList};

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 401, body = ErrorResponse)), security(("bearer" = [])), tag = "OpenAI")]
pub async fn models(State(state): State<SharedState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![model_card(&state)],
    })
}

/// The served model (its name may contain `/`, as hub ids do: the path takes the rest).
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    params(("model" = String, Path, description = "The served model's name")),
    responses((status = 200, body = ModelCard), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])),
    tag = "OpenAI"
)]
pub async fn model(
    State(state): State<SharedState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    state.check_model(&model)?;
    Ok(Json(model_card(&state)))
}

fn model_card(state: &SharedState) -> ModelCard {
    ModelCard {
        id: state.config.served_model_name.clone(),
        object: "model",
        created: state.created,
        owned_by: "llava-server",
        max_model_len: state.model.get().map_or(0, |m| m.max_model_len),
    }
}

/// Any path no route serves: OpenAI's error object, not an empty 404.
pub async fn unknown_route(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// 200 once the model is loaded and the server accepts requests; 503 before.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Ready"), (status = 503, description = "Loading or shutting down", body = ErrorResponse)), tag = "Server")]
pub async fn health(State(state): State<SharedState>) -> Result<StatusCode, ApiError> {
    state.served()?;
    Ok(StatusCode::OK)
}

/// Prometheus text format: request counts by status, latency and phase histograms, engine counters and
/// gauges (see `telemetry`).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")), tag = "Server")]
pub async fn prometheus(State(state): State<SharedState>) -> Response {
    let text = super::telemetry::render(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// A route served with another method: OpenAI's error object (axum adds the `Allow` header).
pub async fn wrong_method(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
