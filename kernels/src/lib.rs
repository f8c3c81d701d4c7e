//! Fused kernels of llava-server, each a candle custom op: the CPU side is a plain reference loop (the
//! definition the CUDA side is checked against), the CUDA side (feature `cuda`) launches our kernels
//! from `src/cuda/*.cu`.
//!
//! - `add_rms_norm`: residual add + RMSNorm in one pass, returning both the normed rows and the sum;
//! - `silu_mul`: SiLU(gate) · up over the merged gate/up projection;
//! - `rotary_qk`: HF rotate-half rotary embedding of the q and k heads of the merged qkv projection at
//!   explicit positions (cos|sin table in f32);
//! - `write_kv`: new K/V rows (contiguous, or a column slice of the qkv rows) into their cache slots;
//! - `upload_u32`: host data into an existing tensor, so step metadata keeps its device address;
//! - `prefill_attention`: causal attention of a flattened batch over the paged cache, prompts in tiles of
//!   queries that share key/value loads;
//! - `decode_attention`: one query per sequence over the paged cache, long contexts split in partitions;
//! - `sample_rows`: a token per row of logits (Gumbel-max draw at temperature T, argmax at 0), so the
//!   logits never leave the device.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod ops;

pub use cpu::gumbel_argmax;
pub use ops::{
    add_rms_norm, decode_attention, prefill_attention, prefill_work, rotary_qk, sample_rows,
    sampling_params, silu_mul, upload_u32, write_kv, PagedLayout, PrefillWork, PREFILL_TILE,
};
