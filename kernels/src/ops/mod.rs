//! The custom ops and the functions that apply them, one file per family: `elementwise` (the
//! decoder layer's fused pointwise ops), `kv` (writes into the cache and step-metadata uploads),
//! `attention` (paged prefill and decode) and `sampling`. Inputs must be contiguous unless an op says
//! otherwise; the CPU side converts to f32, runs `cpu`'s reference and rounds back to the storage dtype.
//! The helpers here read CPU storage for those reference sides.

mod attention;
mod elementwise;
mod kv;
mod sampling;

pub use attention::{
    decode_attention, prefill_attention, prefill_work, PagedLayout, PrefillWork, PREFILL_TILE,
};
#[cfg(feature = "cuda")]
pub(crate) use attention::{decode_split, PagedAttention, Queries};
pub use elementwise::{add_rms_norm, rotary_qk, silu_mul};
#[cfg(feature = "cuda")]
pub(crate) use elementwise::{AddRmsNorm, RotaryQk};
pub use kv::{upload_u32, write_kv};
pub use sampling::{sample_rows, sampling_params};

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

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

/// A `[rows, cols]` operand whose rows may lie `stride` elements apart: a column slice (`narrow` on
/// dim 1) of a merged projection, read in place instead of copied out first.
pub(crate) struct Rows {
    pub start: usize,
    pub rows: usize,
    pub stride: usize,
}

pub(crate) fn strided_rows(l: &Layout, cols: usize) -> Result<Rows> {
    if let Some((a, b)) = l.contiguous_offsets() {
        if cols > 0 && (b - a) % cols == 0 {
            return Ok(Rows {
                start: a,
                rows: (b - a) / cols,
                stride: cols,
            });
        }
    }
    match (l.dims(), l.stride()) {
        (&[rows, c], &[stride, 1]) if c == cols && stride >= cols => Ok(Rows {
            start: l.start_offset(),
            rows,
            stride,
        }),
        _ => candle_core::bail!("want rows of {cols} contiguous values, got {l:?}"),
    }
}

/// The rows of `r` as one contiguous f32 vector.
fn f32_rows(s: &CpuStorage, r: &Rows, cols: usize) -> Result<Vec<f32>> {
    fn gather<T: Copy>(v: &[T], r: &Rows, cols: usize, f: impl Fn(T) -> f32) -> Vec<f32> {
        (0..r.rows)
            .flat_map(|i| v[r.start + i * r.stride..][..cols].iter().map(|&x| f(x)))
            .collect()
    }
    Ok(match s {
        CpuStorage::F32(v) => gather(v, r, cols, |x| x),
        CpuStorage::F16(v) => gather(v, r, cols, |x| x.to_f32()),
        CpuStorage::BF16(v) => gather(v, r, cols, |x| x.to_f32()),
        _ => candle_core::bail!("kernels take f32, f16 or bf16"),
    })
}

/// A contiguous u32 operand of a CPU side, copied out; `what` names it in errors.
pub(crate) fn u32_values(s: &CpuStorage, l: &Layout, what: &str) -> Result<Vec<u32>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(v[a..b].to_vec()),
        (CpuStorage::U32(_), None) => candle_core::bail!("{what} must be contiguous"),
        _ => candle_core::bail!("{what} must be u32"),
    }
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
