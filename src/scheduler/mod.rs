//! Continuous batching over a paged KV cache, in pure Rust (no candle, no tokio): sequences whose
//! `num_computed_tokens` catch up with their tokens, a block pool with prefix caching, and one
//! scheduling rule per step. The engine's runner alone turns its output into model inputs.

pub mod block_pool;
pub mod kv_manager;
pub mod policy;
pub mod sequence;

pub use block_pool::{BlockKey, BlockPool, KvBlock};
pub use policy::{ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput};
pub use sequence::{SeqId, SeqImage, SeqStatus, Sequence};

#[cfg(test)]
mod tests;
