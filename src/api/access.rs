//! Each response's request id and its access log line. The id is the client's `x-request-id` when
//! it sent a usable one (so its logs and ours join up), else a new one; the response carries it
//! back. The INFO line is written when the response body ends — for a stream, after its last
//! event, or when the client leaves — with the status, the whole latency and the request's tokens.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept; longer ones (or ones with other than visible ASCII) are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A request's prompt and completion tokens, filled in by the handler once known.
#[derive(Clone, Default)]
pub struct TokenCounts(Arc<Mutex<Option<(usize, usize)>>>);

impl TokenCounts {
    pub fn record(&self, prompt_tokens: usize, completion_tokens: usize) {
        if let Ok(mut counts) = self.0.lock() {
            *counts = Some((prompt_tokens, completion_tokens));
        }
    }
}

fn usable(id: &HeaderValue) -> Option<&str> {
    let id = id.to_str().ok()?;
    let visible = id.bytes().all(|b| b.is_ascii_graphic());
    (!id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && visible).then_some(id)
}

pub async fn request_id_and_access_log(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(usable)
        .map_or_else(|| super::state::new_id("req"), str::to_owned);
    let counts = TokenCounts::default();
    request.extensions_mut().insert(counts.clone());
    // Held across the handler: if the client leaves before the answer starts, this future is
    // dropped and the line goes out with status 0.
    let mut line = AccessLine {
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        status: 0,
        request_id: id.clone(),
        started,
        counts,
    };
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    line.status = response.status().as_u16();
    response.map(|inner| {
        Body::new(LoggedBody {
            inner,
            line: Some(line),
        })
    })
}

struct AccessLine {
    method: Method,
    path: String,
    status: u16,
    request_id: String,
    started: Instant,
    counts: TokenCounts,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let tokens = self.counts.0.lock().ok().and_then(|c| *c);
        tracing::info!(
            target: "llava_server::access",
            method = %self.method,
            path = %self.path,
            status = self.status,
            latency_ms = self.started.elapsed().as_millis() as u64,
            prompt_tokens = tokens.map(|t| t.0),
            completion_tokens = tokens.map(|t| t.1),
            request_id = %self.request_id,
            "request"
        );
    }
}

/// The response body, unchanged; the access line goes out when it is dropped (ended or abandoned).
struct LoggedBody {
    inner: Body,
    line: Option<AccessLine>,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.line.take();
    }
}
