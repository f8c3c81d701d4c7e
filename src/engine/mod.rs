//! The engine: continuous batching of many requests over one model. `handle` is the async edge
//! (`submit` → stream of token events, drop to abort); `core` is the step loop on its own thread;
//! `runner` turns scheduler output into model inputs; `batch_sampler` decides how each step's rows
//! get their tokens, and `sampler` picks one sequence's.

pub mod batch_sampler;
pub mod core;
pub mod fixed_decode;
pub mod handle;
pub mod inputs;
pub mod metrics;
pub mod runner;
pub mod sampler;
pub mod single_sequence;

pub use fixed_decode::DecodeGraphs;
pub use handle::{start, EngineConfig, EngineHandle, RequestStream};
pub use metrics::MetricsSnapshot;

/// Why the engine refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the engine has stopped")]
    Stopped,
    #[error("model failure: {0}")]
    Model(String),
}

/// Drains a stream synchronously: every event until the request ends.
pub fn collect_blocking(
    mut stream: RequestStream,
) -> Result<Vec<crate::types::TokenEvent>, EngineError> {
    let mut events = Vec::new();
    while let Some(event) = stream.blocking_next() {
        events.push(event?);
    }
    Ok(events)
}
