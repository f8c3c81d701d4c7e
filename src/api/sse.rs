//! Server-sent events: a task produces frames into a channel that axum streams out. When the client
//! goes away the channel closes, the producer stops, and dropping its engine stream aborts the request.
//! What waits in the channel is bounded in bytes, per stream and over all streams: a client that stops
//! reading has its stream cut (and its request aborted) instead of growing the server's memory.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;

use super::error::ApiError;

/// The client is gone (or the stream already ended): stop producing.
#[derive(Debug)]
pub struct StreamEnd;

/// Most bytes of frames one stream may have waiting for its client.
pub const MAX_STREAM_BACKLOG: usize = 1 << 20;
/// Most bytes of frames all streams together may have waiting.
pub const MAX_TOTAL_BACKLOG: usize = 64 << 20;

/// Frame bytes waiting in every stream's channel.
static TOTAL_BACKLOG: AtomicUsize = AtomicUsize::new(0);

/// Bytes of frames waiting in all streams now.
pub fn total_backlog() -> usize {
    TOTAL_BACKLOG.load(Ordering::Acquire)
}

/// One frame and the bytes it holds against the backlogs until it is sent or dropped.
struct Frame {
    event: Event,
    bytes: usize,
    backlog: Arc<AtomicUsize>,
}

impl Drop for Frame {
    fn drop(&mut self) {
        self.backlog.fetch_sub(self.bytes, Ordering::AcqRel);
        TOTAL_BACKLOG.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[derive(Clone)]
pub struct SseSink {
    tx: mpsc::UnboundedSender<Frame>,
    backlog: Arc<AtomicUsize>,
}

impl SseSink {
    pub fn send_json<T: Serialize>(&self, value: &T) -> Result<(), StreamEnd> {
        let data = serde_json::to_string(value).expect("wire types serialise");
        self.send(data)
    }

    /// A named event (`event:` line and JSON data), as the Responses API streams them.
    pub fn send_named<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StreamEnd> {
        let data = serde_json::to_string(value).expect("wire types serialise");
        self.send_event(Some(name), data)
    }

    fn send(&self, data: String) -> Result<(), StreamEnd> {
        self.send_event(None, data)
    }

    fn send_event(&self, name: Option<&str>, data: String) -> Result<(), StreamEnd> {
        let bytes = data.len();
        let stream = self.backlog.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let total = TOTAL_BACKLOG.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let event = match name {
            Some(name) => Event::default().event(name).data(data),
            None => Event::default().data(data),
        };
        let frame = Frame {
            event,
            bytes,
            backlog: self.backlog.clone(),
        };
        // A backlog over either cap means a client that is not reading: end its stream.
        if stream > MAX_STREAM_BACKLOG || total > MAX_TOTAL_BACKLOG {
            tracing::info!(
                stream,
                total,
                "a client is not reading its stream; cutting it"
            );
            return Err(StreamEnd);
        }
        self.tx.send(frame).map_err(|_| StreamEnd)
    }

    /// An error after streaming began: an error frame, then the end of the stream.
    pub fn send_error(&self, error: &ApiError) -> Result<(), StreamEnd> {
        self.send_json(&error.body())?;
        self.send_done()
    }

    /// Sends the error frame and returns the end marker, for `?` on fallible steps mid-stream.
    pub fn fail(&self, error: &ApiError) -> StreamEnd {
        let _ = self.send_error(error);
        StreamEnd
    }

    pub fn send_done(&self) -> Result<(), StreamEnd> {
        self.send("[DONE]".to_owned())
    }

    /// Resolves when the client has disconnected.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Spawns `produce` and streams what it sends as `text/event-stream`.
pub fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(SseSink) -> Fut,
    Fut: Future<Output = Result<(), StreamEnd>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = produce(SseSink {
        tx,
        backlog: Arc::new(AtomicUsize::new(0)),
    });
    tokio::spawn(async move {
        let _ = task.await;
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|mut frame| {
            // Handed to hyper, the frame no longer counts against the backlog.
            let event = std::mem::take(&mut frame.event);
            (Ok::<_, Infallible>(event), rx)
        })
    });
    Sse::new(frames)
        .keep_alive(KeepAlive::default())
        .into_response()
}
