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

/// The API key a request was admitted with, for handlers that key per-tenant state on it.
#[derive(Debug, Clone)]
pub struct ClientKey(pub String);

pub async fn require_api_key(
    State(state): State<SharedState>,
    mut request: Request,
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
        .and_then(bearer_token)
        .map(str::to_owned);
    match given {
        Some(key) if key_matches(key.as_bytes(), &state.config.api_keys) => {
            request.extensions_mut().insert(ClientKey(key));
            Ok(next.run(request).await)
        }
        _ => Err(ApiError::Unauthorized),
    }
}

/// The credentials of `Bearer <token>`: the scheme name is case-insensitive (RFC 9110 §11.1).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_is_not() {
        assert_eq!(super::bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(super::bearer_token("bearer abc"), Some("abc"));
        assert_eq!(super::bearer_token("BEARER  Abc "), Some("Abc"));
        assert_eq!(super::bearer_token("Basic abc"), None);
        assert_eq!(super::bearer_token("Bearer"), None);
    }

    #[test]
    fn any_configured_key_matches_and_nothing_else() {
        let keys = vec!["alpha".to_string(), "beta".to_string()];
        assert!(super::key_matches(b"beta", &keys));
        assert!(!super::key_matches(b"bet", &keys));
        assert!(!super::key_matches(b"", &keys));
    }
}
