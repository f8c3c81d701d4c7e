//! Writes into memory that already exists: new K/V rows into their cache slots, and step metadata
//! into the buffers a captured CUDA graph reads.

use candle_core::{CpuStorage, InplaceOp1, InplaceOp3, Layout, Result, Tensor};

use super::{f32_rows, strided_rows, u32_values};

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
        let src = f32_rows(s2, &strided_rows(l2, row)?, row)?;
        let slots = u32_values(s3, l3, "the slot mapping")?;
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

/// Writes `src` rows (`[tokens, row]`, contiguous or a column slice of a wider matrix) into `cache`
/// (`[slots, row]`) at `slots` (`[tokens]` u32), in place.
pub fn write_kv(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<()> {
    let src = match strided_rows(src.layout(), cache.dim(1)?) {
        Ok(_) => src.clone(),
        Err(_) => src.contiguous()?,
    };
    let rows = src.elem_count() / cache.dim(1)?.max(1);
    if slots.elem_count() != rows {
        candle_core::bail!("write_kv: {} slots for {rows} rows", slots.elem_count());
    }
    cache.inplace_op3(&src, &slots.contiguous()?, &WriteKv)
}

/// Overwrites the contiguous u32 tensor `dst` with `data` (same length), in place.
pub fn upload_u32(dst: &Tensor, data: &[u32]) -> Result<()> {
    dst.inplace_op1(&UploadU32(data))
}
