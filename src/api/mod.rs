//! The HTTP face of the server, and the only home of axum, utoipa and OpenAI's wire types: routes,
//! request parsing and validation, SSE framing, auth, the error → HTTP mapping, `/metrics`, the
//! OpenAPI document and `run-batch`. It orchestrates: frontend for inputs, engine for tokens.

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
pub mod server;
pub mod sse;
pub mod state;
pub mod validate;
pub mod wire;

use std::sync::OnceLock;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use state::SharedState;

/// The process-wide Prometheus recorder (installed once, on first use).
pub fn metrics_recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .expect("buckets are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); the handle still renders ours.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Every route, with auth and the body cap.
pub fn router(state: SharedState) -> Router {
    metrics_recorder();
    let max_body = state.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(misc::models))
        .route("/health", get(misc::health))
        .route("/metrics", get(misc::prometheus))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ))
        .with_state(state);
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::ApiDoc::openapi()))
}
