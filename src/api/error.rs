//! The one mapping from every layer's errors to an HTTP status and OpenAI's error object.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::wire::{ErrorObject, ErrorResponse};
use crate::engine::EngineError;
use crate::frontend::media::MediaError;
use crate::frontend::FrontendError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("too many requests are queued; retry later")]
    QueueFull,
    #[error("{0}")]
    Unavailable(String),
    /// A server fault. Clients see only this generic text and the id; the details were logged under
    /// the same id when the error was made (`ApiError::internal`), so nothing internal leaks.
    #[error("the server could not complete this request (error id {0}); the details are in the server log")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into().map(str::to_owned),
        }
    }

    /// A server fault: `detail` goes to the log only, with an id the client also gets.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = format!("{started:x}-{n}");
        tracing::error!(error_id = %id, "request failed: {detail}");
        ApiError::Internal(id)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error object for this error.
    pub fn body(&self) -> ErrorResponse {
        let (kind, code) = match self {
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            ApiError::ModelNotFound(_) => ("not_found_error", Some("model_not_found")),
            ApiError::NotFound(_) => ("not_found_error", None),
            ApiError::MethodNotAllowed(_) => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", Some("payload_too_large")),
            ApiError::QueueFull => ("rate_limit_error", Some("queue_full")),
            ApiError::Unavailable(_) => ("service_unavailable_error", None),
            ApiError::Internal(_) => ("server_error", None),
        };
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        ErrorResponse {
            error: ErrorObject {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        metrics::counter!(super::telemetry::REQUESTS, "status" => status.as_u16().to_string())
            .increment(1);
        let mut response = (status, Json(self.body())).into_response();
        if matches!(self, ApiError::QueueFull) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<FrontendError> for ApiError {
    fn from(e: FrontendError) -> Self {
        match e {
            FrontendError::Config(_) => ApiError::internal(e),
            _ => ApiError::invalid(e.to_string(), "messages"),
        }
    }
}

impl From<MediaError> for ApiError {
    fn from(e: MediaError) -> Self {
        ApiError::invalid(e.to_string(), "messages")
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) => ApiError::invalid(m, None),
            EngineError::ShuttingDown => ApiError::Unavailable(e.to_string()),
            EngineError::Stopped | EngineError::Model(_) => ApiError::internal(e),
        }
    }
}
