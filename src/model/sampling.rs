//! Choosing tokens where the logits are: the Gumbel-max draw of `llava_kernels::sample_rows` (argmax
//! at temperature 0), and its host twin `gumbel_argmax`, which the engine's sampler uses so that a
//! seed gives the same tokens on either side.

use candle_core::Tensor;

pub use llava_kernels::{gumbel_argmax, sampling_params};

use super::ModelError;

/// One token per row of f32 `logits` (`[rows, vocab]`) for (temperature, seed) per row; only the
/// tokens come back to the host.
pub fn sample_rows(logits: &Tensor, rows: &[(f32, u64)]) -> Result<Vec<u32>, ModelError> {
    let params = Tensor::new(sampling_params(rows), logits.device())?;
    Ok(llava_kernels::sample_rows(logits, &params)?.to_vec1::<u32>()?)
}
