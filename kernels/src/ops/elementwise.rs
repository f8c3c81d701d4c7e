//! Residual add + RMSNorm, SiLU·mul over merged gate/up rows, rotary of q and k in merged qkv rows.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32s, rounding, storage, u32s};
use crate::cpu;

pub(crate) struct AddRmsNorm {
    pub eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, dim) = l1.shape().dims2()?;
        let round = rounding(s1.dtype());
        let (normed, summed) = cpu::add_rms_norm(
            &f32s(s1, l1)?,
            &f32s(s2, l2)?,
            &f32s(s3, l3)?,
            dim,
            self.eps,
            round,
        );
        let mut both = normed;
        both.extend(summed);
        Ok((storage(both, s1.dtype())?, Shape::from((2 * rows, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::add_rms_norm(self, s1, l1, s2, l2, s3, l3)
    }
}

/// SiLU(gate) · up over `[rows, 2·cols]` rows holding the gate then the up projection.
pub(crate) struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = merged_halves(l1)?;
        let x = f32s(s1, l1)?;
        let (gate, up): (Vec<f32>, Vec<f32>) = x
            .chunks(2 * cols)
            .flat_map(|r| r[..cols].iter().copied().zip(r[cols..].iter().copied()))
            .unzip();
        let out = cpu::silu_mul(&gate, &up);
        Ok((storage(out, s1.dtype())?, Shape::from((rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = merged_halves(l1)?;
        crate::cuda::silu_mul(s1, l1, rows, cols)
    }
}

/// `(rows, cols)` of a `[.., 2·cols]` operand.
fn merged_halves(l: &Layout) -> Result<(usize, usize)> {
    let width = *l.dims().last().unwrap_or(&0);
    if width == 0 || !width.is_multiple_of(2) {
        candle_core::bail!("silu_mul wants rows of gate then up, got {:?}", l.dims());
    }
    Ok((l.shape().elem_count() / width, width / 2))
}

/// Rotates the q and k heads of merged `[tokens, (q_heads + 2·kv_heads)·dim]` rows; the output is q
/// `[tokens, q_heads, dim]` followed by k `[tokens, kv_heads, dim]`, flat.
pub(crate) struct RotaryQk {
    pub positions: Tensor,
    pub q_heads: usize,
    pub kv_heads: usize,
}

impl RotaryQk {
    fn dims(&self, l: &Layout, table: &Layout) -> Result<(usize, usize)> {
        let dim = table.shape().dims2()?.1;
        let width = (self.q_heads + 2 * self.kv_heads) * dim;
        let (tokens, w) = l.shape().dims2()?;
        if w != width {
            candle_core::bail!("rotary_qk wants rows of {width} (q, k and v heads), got {w}");
        }
        Ok((tokens, dim))
    }
}

impl CustomOp2 for RotaryQk {
    fn name(&self) -> &'static str {
        "rotary-qk"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, dim) = self.dims(l1, l2)?;
        let (q_width, k_width) = (self.q_heads * dim, self.kv_heads * dim);
        let qkv = f32s(s1, l1)?;
        let rows = |offset: usize, width: usize| -> Vec<f32> {
            qkv.chunks(q_width + 2 * k_width)
                .flat_map(|r| r[offset..offset + width].iter().copied())
                .collect()
        };
        let (table, positions) = (f32s(s2, l2)?, u32s(&self.positions)?);
        let mut out = cpu::rotary(&rows(0, q_width), &table, &positions, self.q_heads, dim);
        out.extend(cpu::rotary(
            &rows(q_width, k_width),
            &table,
            &positions,
            self.kv_heads,
            dim,
        ));
        let len = out.len();
        debug_assert_eq!(len, tokens * (q_width + k_width));
        Ok((storage(out, s1.dtype())?, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tokens, dim) = self.dims(l1, l2)?;
        crate::cuda::rotary_qk(self, s1, l1, s2, l2, tokens, dim)
    }
}

/// `(rmsnorm(x + residual) · weight, x + residual)` for `[rows, dim]` inputs.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let rows = x.dim(0)?;
    let both = x.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &weight.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((both.narrow(0, 0, rows)?, both.narrow(0, rows, rows)?))
}

/// SiLU(gate) · up for rows holding the gate then the up projection (`[rows, 2·cols]` → `[rows, cols]`).
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

/// Rotates the q and k heads of merged qkv rows (`[tokens, (q_heads + 2·kv_heads)·dim]`) at `positions`
/// (`[tokens]` u32) with a `[max_pos, dim]` f32 cos|sin table: q `[tokens, q_heads, dim]` and
/// k `[tokens, kv_heads, dim]`, both contiguous.
pub fn rotary_qk(
    qkv: &Tensor,
    table: &Tensor,
    positions: &Tensor,
    q_heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (tokens, width) = qkv.dims2()?;
    let dim = width / (q_heads + 2 * kv_heads);
    let both = qkv.contiguous()?.apply_op2_no_bwd(
        table,
        &RotaryQk {
            positions: positions.clone(),
            q_heads,
            kv_heads,
        },
    )?;
    let q_len = tokens * q_heads * dim;
    Ok((
        both.narrow(0, 0, q_len)?.reshape((tokens, q_heads, dim))?,
        both.narrow(0, q_len, tokens * kv_heads * dim)?
            .reshape((tokens, kv_heads, dim))?,
    ))
}
