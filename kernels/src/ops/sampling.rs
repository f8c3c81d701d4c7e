//! A token per row of logits where the logits are (Gumbel-max draw, or argmax at temperature 0).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{f32s, u32_values};
use crate::cpu;

/// One token per row of f32 logits `[rows, vocab]`, with `[3·rows]` u32 parameters: temperatures (f32
/// bits), then the low and the high words of each row's noise seed.
pub(crate) struct SampleRows;

impl SampleRows {
    fn rows(logits: &Layout, params: &Layout) -> Result<(usize, usize)> {
        let (rows, vocab) = logits.shape().dims2()?;
        if params.shape().elem_count() != 3 * rows {
            candle_core::bail!("sample_rows wants 3 parameters per row");
        }
        Ok((rows, vocab))
    }
}

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = Self::rows(l1, l2)?;
        let logits = f32s(s1, l1)?;
        let params = u32_values(s2, l2, "sample_rows parameters")?;
        let out = (0..rows)
            .map(|r| {
                let seed = params[rows + r] as u64 | (params[2 * rows + r] as u64) << 32;
                let row = &logits[r * vocab..(r + 1) * vocab];
                cpu::gumbel_argmax(row, f32::from_bits(params[r]), seed)
            })
            .collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = Self::rows(l1, l2)?;
        crate::cuda::sample_rows(s1, l1, s2, l2, rows, vocab)
    }
}

/// The `[3·rows]` u32 parameters `sample_rows` reads, from (temperature, seed) per row.
pub fn sampling_params(rows: &[(f32, u64)]) -> Vec<u32> {
    let mut packed: Vec<u32> = rows.iter().map(|&(t, _)| t.to_bits()).collect();
    packed.extend(rows.iter().map(|&(_, seed)| seed as u32));
    packed.extend(rows.iter().map(|&(_, seed)| (seed >> 32) as u32));
    packed
}

/// One token per row of f32 `logits` (`[rows, vocab]`) without copying them to the host: a draw from
/// softmax(logits / T) by the Gumbel-max trick, or the argmax where T is 0. `params` is `[3·rows]` u32
/// as `sampling_params` lays them out; the same seed gives the same token as `gumbel_argmax`.
pub fn sample_rows(logits: &Tensor, params: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2_no_bwd(&params.contiguous()?, &SampleRows)
}
