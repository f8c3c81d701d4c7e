//! Counters and gauges the engine keeps for the API's `/metrics` and for benchmarks. Plain atomics:
//! written by the engine thread, read from anywhere.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Tokens per KV-cache block (fixed at start).
    pub block_size: AtomicU64,
    /// Prompt tokens of every request admitted (each of `n` choices counted once per request).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub images_encoded: AtomicU64,
    pub image_cache_hits: AtomicU64,
    pub image_encode_micros: AtomicU64,
    pub steps: AtomicU64,
    /// Pure decode steps run through fixed-shape buffers (replayed CUDA graphs on a GPU).
    pub fixed_decode_steps: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Tokens chosen where the logits are (device argmax or draw): no logits copied to the host.
    pub tokens_chosen_in_place: AtomicU64,
    /// Whole step time, and the parts of it that are bookkeeping rather than model work.
    pub step_micros: AtomicU64,
    pub schedule_micros: AtomicU64,
    pub prepare_micros: AtomicU64,
    pub forward_micros: AtomicU64,
    pub sample_micros: AtomicU64,
    pub update_micros: AtomicU64,
}

/// A point-in-time copy, for tests and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub waiting: u64,
    pub running: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    pub block_size: u64,
    pub prompt_tokens: u64,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub images_encoded: u64,
    pub image_cache_hits: u64,
    pub image_encode_micros: u64,
    pub steps: u64,
    pub fixed_decode_steps: u64,
    pub generated_tokens: u64,
    pub tokens_chosen_in_place: u64,
    pub step_micros: u64,
    pub schedule_micros: u64,
    pub prepare_micros: u64,
    pub forward_micros: u64,
    pub sample_micros: u64,
    pub update_micros: u64,
}

impl EngineMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            waiting: r(&self.waiting),
            running: r(&self.running),
            kv_blocks_used: r(&self.kv_blocks_used),
            kv_blocks_total: r(&self.kv_blocks_total),
            block_size: r(&self.block_size),
            prompt_tokens: r(&self.prompt_tokens),
            prefix_queried_tokens: r(&self.prefix_queried_tokens),
            prefix_hit_tokens: r(&self.prefix_hit_tokens),
            preemptions: r(&self.preemptions),
            images_encoded: r(&self.images_encoded),
            image_cache_hits: r(&self.image_cache_hits),
            image_encode_micros: r(&self.image_encode_micros),
            steps: r(&self.steps),
            fixed_decode_steps: r(&self.fixed_decode_steps),
            generated_tokens: r(&self.generated_tokens),
            tokens_chosen_in_place: r(&self.tokens_chosen_in_place),
            step_micros: r(&self.step_micros),
            schedule_micros: r(&self.schedule_micros),
            prepare_micros: r(&self.prepare_micros),
            forward_micros: r(&self.forward_micros),
            sample_micros: r(&self.sample_micros),
            update_micros: r(&self.update_micros),
        }
    }
}

pub(crate) fn set(a: &AtomicU64, v: u64) {
    a.store(v, Ordering::Relaxed);
}

pub(crate) fn add(a: &AtomicU64, v: u64) {
    a.fetch_add(v, Ordering::Relaxed);
}
