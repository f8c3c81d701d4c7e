//! The custom ops and the functions that apply them. Inputs must be contiguous; the CPU side converts
//! to f32, runs `cpu`'s reference and rounds back to the storage dtype.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp1, InplaceOp3, Layout, Result, Shape, Tensor,
};

use crate::cpu;

pub(crate) fn f32s(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel inputs must be contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        _ => candle_core::bail!("kernels take f32, f16 or bf16"),
    })
}

pub(crate) fn u32s(t: &Tensor) -> Result<Vec<u32>> {
    t.flatten_all()?.to_vec1::<u32>()
}

fn storage(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        other => candle_core::bail!("kernels take f32, f16 or bf16, not {other:?}"),
    })
}

fn rounding(dtype: DType) -> fn(f32) -> f32 {
    match dtype {
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}

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

pub(crate) struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu::silu_mul(&f32s(s1, l1)?, &f32s(s2, l2)?);
        Ok((storage(out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::silu_mul(s1, l1, s2, l2)
    }
}

pub(crate) struct Rotary {
    pub positions: Tensor,
}

impl CustomOp2 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, heads, dim) = l1.shape().dims3()?;
        let out = cpu::rotary(
            &f32s(s1, l1)?,
            &f32s(s2, l2)?,
            &u32s(&self.positions)?,
            heads,
            dim,
        );
        Ok((storage(out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rotary(self, s1, l1, s2, l2)
    }
}

pub(crate) struct WriteKv;

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "write-kv"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let row = l1.shape().dims2()?.1;
        let src = f32s(s2, l2)?;
        let slots = match s3 {
            CpuStorage::U32(v) => {
                let (a, b) = l3
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("slots must be contiguous".into()))?;
                v[a..b].to_vec()
            }
            _ => candle_core::bail!("slot mapping must be u32"),
        };
        let start = l1.start_offset();
        macro_rules! write {
            ($v:expr, $conv:expr) => {
                for (t, &slot) in slots.iter().enumerate() {
                    for c in 0..row {
                        $v[start + slot as usize * row + c] = $conv(src[t * row + c]);
                    }
                }
            };
        }
        match s1 {
            CpuStorage::F32(v) => write!(v, |x| x),
            CpuStorage::F16(v) => write!(v, half::f16::from_f32),
            CpuStorage::BF16(v) => write!(v, half::bf16::from_f32),
            _ => candle_core::bail!("kernels take f32, f16 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::write_kv(s1, l1, s2, l2, s3, l3)
    }
}

/// Host data copied into an existing u32 tensor: the device memory, and so every pointer a captured
/// CUDA graph recorded, stays the same from step to step.
pub(crate) struct UploadU32<'a>(pub &'a [u32]);

impl InplaceOp1 for UploadU32<'_> {
    fn name(&self) -> &'static str {
        "upload-u32"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (a, b) = upload_range(l, self.0.len())?;
        match s {
            CpuStorage::U32(v) => v[a..b].copy_from_slice(self.0),
            _ => candle_core::bail!("upload target must be u32"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let (a, b) = upload_range(l, self.0.len())?;
        crate::cuda::upload_u32(s, a..b, self.0)
    }
}

fn upload_range(l: &Layout, len: usize) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == len => Ok((a, b)),
        Some((a, b)) => candle_core::bail!("upload of {len} values into a tensor of {}", b - a),
        None => candle_core::bail!("upload target must be contiguous"),
    }
}

/// Where a batch's K/V live: `[seqs, max_blocks]` u32 block tables, the block size and the kv heads.
#[derive(Debug, Clone)]
pub struct PagedLayout {
    pub block_tables: Tensor,
    pub block_size: usize,
    pub num_kv_heads: usize,
}

/// Which query attends to what: prefill (causal, per-token positions) or decode (one query per sequence).
pub(crate) enum Queries {
    Prefill {
        positions: Tensor,
        token_seq: Tensor,
    },
    /// `max_context`: the longest context, known on the host (it sizes the partition grid).
    Decode {
        context_lens: Tensor,
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        max_context: usize,
    },
}

pub(crate) struct PagedAttention {
    pub queries: Queries,
    pub paged: PagedLayout,
    pub scale: f32,
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
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
        let (n, heads, dim) = l1.shape().dims3()?;
        let (keys, values) = (f32s(s2, l2)?, f32s(s3, l3)?);
        let tables = u32s(&self.paged.block_tables)?;
        let max_blocks = self.paged.block_tables.dim(1)?;
        let cache = cpu::PagedCache {
            keys: &keys,
            values: &values,
            block_tables: &tables,
            max_blocks,
            block_size: self.paged.block_size,
            kv_heads: self.paged.num_kv_heads,
        };
        let (seqs, ends): (Vec<u32>, Vec<u32>) = match &self.queries {
            Queries::Prefill {
                positions,
                token_seq,
            } => (
                u32s(token_seq)?,
                u32s(positions)?.iter().map(|p| p + 1).collect(),
            ),
            Queries::Decode { context_lens, .. } => ((0..n as u32).collect(), u32s(context_lens)?),
        };
        let out =
            cpu::paged_attention(&f32s(s1, l1)?, &cache, &seqs, &ends, heads, dim, self.scale);
        Ok((storage(out, s1.dtype())?, l1.shape().clone()))
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
        crate::cuda::paged_attention(self, s1, l1, s2, l2, s3, l3)
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

/// SiLU(gate) · up, elementwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

/// Rotates `[tokens, heads, dim]` at `positions` (`[tokens]` u32) with a `[max_pos, dim]` f32 cos|sin table.
pub fn rotary(x: &Tensor, table: &Tensor, positions: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        table,
        &Rotary {
            positions: positions.clone(),
        },
    )
}

/// Writes `src` rows (`[tokens, row]`) into `cache` (`[slots, row]`) at `slots` (`[tokens]` u32), in place.
pub fn write_kv(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<()> {
    cache.inplace_op3(&src.contiguous()?, &slots.contiguous()?, &WriteKv)
}

/// Overwrites the contiguous u32 tensor `dst` with `data` (same length), in place.
pub fn upload_u32(dst: &Tensor, data: &[u32]) -> Result<()> {
    dst.inplace_op1(&UploadU32(data))
}

/// Causal attention of flattened queries `[tokens, heads, dim]` over the paged cache (`[slots, kv_heads·dim]`).
pub fn prefill_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    positions: &Tensor,
    token_seq: &Tensor,
    paged: &PagedLayout,
    scale: f32,
) -> Result<Tensor> {
    let op = PagedAttention {
        queries: Queries::Prefill {
            positions: positions.clone(),
            token_seq: token_seq.clone(),
        },
        paged: paged.clone(),
        scale,
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// One query per sequence (`[seqs, heads, dim]`) over its first `context_lens[s]` cached positions
/// (`max_context` is the largest of them).
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    context_lens: &Tensor,
    max_context: usize,
    paged: &PagedLayout,
    scale: f32,
) -> Result<Tensor> {
    let op = PagedAttention {
        queries: Queries::Decode {
            context_lens: context_lens.clone(),
            max_context,
        },
        paged: paged.clone(),
        scale,
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}
