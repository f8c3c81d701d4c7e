//! Bearer API keys (`--api-key`, any of several), compared in constant time. `/health`, `/metrics`
//! and the docs stay open.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::state::SharedState;

const OPEN_PATHS: &[&str] = &["/health", "/metrics", "/openapi.json"];

fn key_matches(given: &[u8], keys: &[String]) -> bool {
    // Every key is compared (no early exit), each comparison in constant time.
    keys.iter().fold(false, |ok, key| {
        ok | bool::from(key.as_bytes().ct_eq(given))
    })
}

pub async fn require_api_key(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = request.uri().path();
    let open = OPEN_PATHS.contains(&path) || path == "/docs" || path.starts_with("/docs/");
    if state.config.api_keys.is_empty() || open {
        return Ok(next.run(request).await);
    }
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(key) if key_matches(key.as_bytes(), &state.config.api_keys) => {
            Ok(next.run(request).await)
        }
        _ => Err(ApiError::Unauthorized),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_configured_key_matches_and_nothing_else() {
        let keys = vec!["alpha".to_string(), "beta".to_string()];
        assert!(super::key_matches(b"beta", &keys));
        assert!(!super::key_matches(b"bet", &keys));
        assert!(!super::key_matches(b"", &keys));
    }
}
