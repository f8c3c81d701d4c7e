//! JSON request bodies: the size cap becomes a 413 and a malformed field a 400 that names it.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::SharedState;
use super::wire::SamplingFields;

pub fn parse_json<T: DeserializeOwned>(
    state: &SharedState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(state.config.max_body_bytes)
        } else {
            ApiError::invalid(format!("cannot read the request body: {rejection}"), None)
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))?;
    serde_path_to_error::deserialize::<_, T>(&value).map_err(|e| {
        let (path, inner) = (e.path().to_string(), e.into_inner());
        if path.is_empty() || path == "." {
            // Flattened fields lose their path; the shared generation fields are re-read alone.
            if value.is_object() {
                if let Err(e) = serde_path_to_error::deserialize::<_, SamplingFields>(&value) {
                    return field_error(e.path().to_string(), e.into_inner());
                }
            }
            return ApiError::invalid(format!("invalid request: {inner}"), None);
        }
        field_error(path, inner)
    })
}

fn field_error(path: String, inner: serde_json::Error) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("invalid value for `{path}`: {inner}"),
        param: Some(path),
    }
}
