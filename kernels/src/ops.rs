//! The custom ops and the functions that apply them. Inputs must be contiguous; the CPU side converts
//! to f32, runs `cpu`'s reference and rounds back to the storage dtype.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp1, InplaceOp3, Layout, Result,
    Shape, Tensor,
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
        let params = match s2 {
            CpuStorage::U32(v) => {
                let (a, b) = l2
                    .contiguous_offsets()
                    .ok_or_else(|| candle_core::Error::Msg("params must be contiguous".into()))?;
                v[a..b].to_vec()
            }
            _ => candle_core::bail!("sample_rows parameters must be u32"),
        };
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

/// Queries of one sequence this step, at most this many per prefill tile (`TILE_Q` in attention.cu).
pub const PREFILL_TILE: usize = 16;

/// How the prefill kernels split a flattened batch: `tiles` (`[k]` u32) are the first tokens of runs of
/// up to `PREFILL_TILE` queries of one sequence, which share key/value loads; `singles` (`[m]` u32) are
/// the tokens that are their sequence's only query this step (decodes beside prefills).
#[derive(Debug, Clone)]
pub struct PrefillWork {
    pub tiles: Tensor,
    pub singles: Tensor,
}

/// `(tiles, singles)` for sequences whose `query_lens` queries lie one after another in the batch.
pub fn prefill_work(query_lens: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let (mut tiles, mut singles) = (Vec::new(), Vec::new());
    let mut start = 0u32;
    for &len in query_lens {
        if len == 1 {
            singles.push(start);
        } else {
            tiles.extend((0..len).step_by(PREFILL_TILE).map(|j| start + j as u32));
        }
        start += len as u32;
    }
    (tiles, singles)
}

/// How decode attention splits each (sequence, head)'s context across blocks: `(parts, part_len)`.
/// Small batches get many partitions (about 1024 blocks in all, so a lone query is not left to a few
/// SMs), never shorter than 256 positions; a batch that fills the GPU by itself gets one. Graph
/// replays pass the longest context the model allows, so the split depends on the batch size only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn decode_split(max_context: usize, rows: usize) -> (usize, usize) {
    let by_length = max_context.div_ceil(256).max(1);
    let by_occupancy = 1024usize.div_ceil(rows.max(1));
    let parts = by_length.min(by_occupancy).max(1);
    let part_len = max_context.div_ceil(parts).next_multiple_of(32).max(32);
    (max_context.div_ceil(part_len).max(1), part_len)
}

/// Which query attends to what: prefill (causal, per-token positions) or decode (one query per sequence).
pub(crate) enum Queries {
    Prefill {
        positions: Tensor,
        token_seq: Tensor,
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        work: PrefillWork,
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
                ..
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

/// One token per row of f32 `logits` (`[rows, vocab]`) without copying them to the host: a draw from
/// softmax(logits / T) by the Gumbel-max trick, or the argmax where T is 0. `params` is `[3·rows]` u32
/// as `sampling_params` lays them out; the same seed gives the same token as `gumbel_argmax`.
pub fn sample_rows(logits: &Tensor, params: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2_no_bwd(&params.contiguous()?, &SampleRows)
}

/// Overwrites the contiguous u32 tensor `dst` with `data` (same length), in place.
pub fn upload_u32(dst: &Tensor, data: &[u32]) -> Result<()> {
    dst.inplace_op1(&UploadU32(data))
}

/// Causal attention of flattened queries `[tokens, heads, dim]` over the paged cache (`[slots, kv_heads·dim]`);
/// `work` (from `prefill_work`) must cover every token.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    positions: &Tensor,
    token_seq: &Tensor,
    work: &PrefillWork,
    paged: &PagedLayout,
    scale: f32,
) -> Result<Tensor> {
    let op = PagedAttention {
        queries: Queries::Prefill {
            positions: positions.clone(),
            token_seq: token_seq.clone(),
            work: work.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_cover_the_context_and_shrink_as_batches_grow() {
        for max_context in [1, 31, 300, 1100, 4096] {
            let mut last_parts = usize::MAX;
            for rows in [32, 64, 256, 1024, 8192] {
                let (parts, len) = decode_split(max_context, rows);
                assert!(parts * len >= max_context && (parts - 1) * len < max_context.max(1));
                assert!(parts <= last_parts, "{max_context} {rows}");
                last_parts = parts;
            }
        }
        // One query of 32 heads over 4096 positions: 16 partitions of 256; a batch of 32 × 32 heads: 1.
        assert_eq!(decode_split(4096, 32), (16, 256));
        assert_eq!(decode_split(4096, 1024), (1, 4096));
        assert_eq!(decode_split(1100, 64), (5, 224));
    }

    #[test]
    fn prefill_work_covers_every_token_once_in_tiles_of_one_sequence() {
        let lens = [1usize, 40, 16, 1, 17, 2];
        let (tiles, singles) = prefill_work(&lens);
        let seq_of: Vec<usize> = lens
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| std::iter::repeat_n(s, n))
            .collect();
        let mut covered = vec![0; seq_of.len()];
        for &t in &tiles {
            let t = t as usize;
            let run = (t..seq_of.len())
                .take(PREFILL_TILE)
                .take_while(|&u| seq_of[u] == seq_of[t])
                .count();
            assert!(run >= 2 || lens[seq_of[t]] > 1, "tile at {t}");
            for c in &mut covered[t..t + run] {
                *c += 1;
            }
        }
        for &t in &singles {
            assert_eq!(lens[seq_of[t as usize]], 1);
            covered[t as usize] += 1;
        }
        assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
        assert_eq!(singles, vec![0, 57]);
        assert_eq!(tiles, vec![1, 17, 33, 41, 58, 74, 75]);
    }
}
