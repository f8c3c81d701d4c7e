//! `GET /v1/models`, `GET /health` and `GET /metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::state::SharedState;
use super::wire::{ErrorResponse, ModelCard, ModelList};

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 401, body = ErrorResponse)), security(("bearer" = [])), tag = "OpenAI")]
pub async fn models(State(state): State<SharedState>) -> Json<ModelList> {
    let max_model_len = state.model.get().map_or(0, |m| m.max_model_len);
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.config.served_model_name.clone(),
            object: "model",
            created: state.created,
            owned_by: "llava-server",
            max_model_len,
        }],
    })
}

/// 200 once the model is loaded and the server accepts requests; 503 before.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Ready"), (status = 503, description = "Loading or shutting down", body = ErrorResponse)), tag = "Server")]
pub async fn health(State(state): State<SharedState>) -> Result<StatusCode, ApiError> {
    state.served()?;
    Ok(StatusCode::OK)
}

/// Prometheus text format: request counts by status, latency histograms, engine gauges.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")), tag = "Server")]
pub async fn prometheus(State(state): State<SharedState>) -> Response {
    if let Some(model) = state.model.get() {
        let m = model.engine.metrics();
        let gauge = |name: &'static str, v: u64| metrics::gauge!(name).set(v as f64);
        gauge("llava_queue_length", m.waiting);
        gauge("llava_running_sequences", m.running);
        gauge("llava_kv_blocks_used", m.kv_blocks_used);
        gauge("llava_kv_blocks_total", m.kv_blocks_total);
        gauge("llava_prefix_cache_queried_tokens", m.prefix_queried_tokens);
        gauge("llava_prefix_cache_hit_tokens", m.prefix_hit_tokens);
        let rate = if m.prefix_queried_tokens == 0 {
            0.0
        } else {
            m.prefix_hit_tokens as f64 / m.prefix_queried_tokens as f64
        };
        metrics::gauge!("llava_prefix_cache_hit_rate").set(rate);
        gauge("llava_preemptions", m.preemptions);
        gauge("llava_images_encoded", m.images_encoded);
        gauge("llava_image_cache_hits", m.image_cache_hits);
        metrics::gauge!("llava_image_encode_seconds_total").set(m.image_encode_micros as f64 / 1e6);
        gauge("llava_generated_tokens", m.generated_tokens);
        gauge("llava_engine_steps", m.steps);
        gauge("llava_fixed_decode_steps", m.fixed_decode_steps);
        gauge("llava_tokens_chosen_in_place", m.tokens_chosen_in_place);
    }
    let text = super::metrics_recorder().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
