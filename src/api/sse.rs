//! Server-sent events: a task produces frames into a channel that axum streams out. When the client
//! goes away the channel closes, the producer stops, and dropping its engine stream aborts the request.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;

use super::error::ApiError;

/// The client is gone (or the stream already ended): stop producing.
#[derive(Debug)]
pub struct StreamEnd;

#[derive(Clone)]
pub struct SseSink {
    tx: mpsc::Sender<Event>,
}

impl SseSink {
    pub fn send_json<T: Serialize>(&self, value: &T) -> Result<(), StreamEnd> {
        let data = serde_json::to_string(value).expect("wire types serialise");
        self.send(Event::default().data(data))
    }

    fn send(&self, event: Event) -> Result<(), StreamEnd> {
        // The channel is large enough for a whole answer; a full one means a client not reading.
        self.tx.try_send(event).map_err(|_| StreamEnd)
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
        self.send(Event::default().data("[DONE]"))
    }

    /// Resolves when the client has disconnected.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Most frames buffered for a slow client before the stream is cut.
const BUFFERED_FRAMES: usize = 8192;

/// Spawns `produce` and streams what it sends as `text/event-stream`.
pub fn sse_response<F, Fut>(produce: F) -> Response
where
    F: FnOnce(SseSink) -> Fut,
    Fut: Future<Output = Result<(), StreamEnd>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(BUFFERED_FRAMES);
    let task = produce(SseSink { tx });
    tokio::spawn(async move {
        let _ = task.await;
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), rx))
    });
    Sse::new(frames)
        .keep_alive(KeepAlive::default())
        .into_response()
}
