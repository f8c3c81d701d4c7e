//! Continuous-batching scheduler and paged KV block manager, pure Rust (no candle, no tokio).
//! Arrives with the engine issue; until then `engine::generate` drives one sequence directly.
