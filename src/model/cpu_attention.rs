//! Multi-token attention on the CPU (prefill chunks and the vision tower) without materialising
//! per-head copies or the whole score tensor.
//!
//! Through candle ops, the attention of a 600-token prefill made a contiguous copy of every head's
//! queries, keys and values, a `heads × q × k` score tensor, then three more full passes over it
//! (scale, mask, softmax) before the second product: 0.65 s of a 1.8 s prefill on issue 14's mid
//! checkpoint, against 0.7 s for all its projections. Here each task is one (head, run of up to
//! `QUERY_CHUNK` queries): the `gemm` crate multiplies the strided head views where they lie (the
//! scale folded into the product), the causal softmax runs in place on the chunk's scores, which stay
//! in cache, and the second product writes the head's output columns directly. A causal chunk only
//! multiplies the keys its last query can see, so the masked half of the scores is never computed.
//!
//! The arithmetic is HF's eager attention: scores `q·k × scale` in f32, max-subtracted softmax over the
//! visible keys, then `probs @ V`; only the order of additions inside the products differs, which the
//! HF parity tests' tolerances cover.

use candle_core::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu_kernels::{cpu_kernels_enabled, f32_slice, with_f32_slices};
use super::cpu_math::softmax_in_place;

/// Queries per task: enough rows for the GEMM kernels to run at full speed, few enough that a
/// chunk's scores (`QUERY_CHUNK × keys` f32) stay in L2.
const QUERY_CHUNK: usize = 64;

/// A `[rows, heads × head_dim]` matrix inside a larger f32 buffer: head `h`'s element `(r, c)` is at
/// `first + r × row_stride + h × head_dim + c`. Views of q, k and v inside one merged projection output
/// differ only in `first`.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub data: &'a [f32],
    pub first: usize,
    pub row_stride: usize,
    pub rows: usize,
}

impl HeadRows<'_> {
    /// Whether every element of `heads` heads of `head_dim` lies inside `data`.
    fn fits(&self, heads: usize, head_dim: usize) -> bool {
        let width = heads.checked_mul(head_dim);
        let end = (self.rows.saturating_sub(1))
            .checked_mul(self.row_stride)
            .and_then(|last| last.checked_add(self.first))
            .zip(width)
            .and_then(|(start, width)| start.checked_add(width));
        match (end, width) {
            (Some(end), Some(width)) => {
                self.rows == 0 || (end <= self.data.len() && width <= self.row_stride)
            }
            _ => false,
        }
    }
}

/// The heads' shape and which keys each query sees.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `Some(n)`: causal, query `i` sits at position `n + i` and sees keys `0..=n + i`.
    /// `None`: every query sees every key (the vision tower).
    pub causal_offset: Option<usize>,
    pub scale: f32,
}

/// The output pointer, shared by tasks that write disjoint (row run, head) blocks of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a distinct (query run, head) block, so no element is written twice and
// nothing reads the output while the tasks run.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Attention of `q`'s rows over `k`/`v`'s rows; the result is `[q.rows, heads × head_dim]`.
/// Query head `h` reads kv head `h / (heads / kv_heads)`, as HF's `repeat_kv`.
pub fn attention(
    q: HeadRows<'_>,
    k: HeadRows<'_>,
    v: HeadRows<'_>,
    shape: AttentionShape,
) -> candle_core::Result<Vec<f32>> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        causal_offset,
        scale,
    } = shape;
    if kv_heads == 0 || heads % kv_heads != 0 || d == 0 {
        candle_core::bail!("attention over {heads} heads and {kv_heads} kv heads of {d}");
    }
    if !q.fits(heads, d) || !k.fits(kv_heads, d) || !v.fits(kv_heads, d) || k.rows != v.rows {
        candle_core::bail!("attention views do not fit their buffers");
    }
    if k.rows == 0 && q.rows > 0 {
        candle_core::bail!("{} queries over no keys", q.rows);
    }
    if let Some(offset) = causal_offset {
        if offset + q.rows > k.rows {
            candle_core::bail!(
                "{} queries after {offset} cached need {} keys, have {}",
                q.rows,
                offset + q.rows,
                k.rows
            );
        }
    }
    let width = heads * d;
    let mut out = vec![0f32; q.rows * width];
    let out_ptr = OutPtr(out.as_mut_ptr());
    let chunks = q.rows.div_ceil(QUERY_CHUNK);
    let groups = heads / kv_heads;
    (0..heads * chunks)
        .into_par_iter()
        .for_each_init(Vec::new, |scores, task| {
            let (head, chunk) = (task / chunks, task % chunks);
            let first = chunk * QUERY_CHUNK;
            let rows = QUERY_CHUNK.min(q.rows - first);
            // Keys the chunk's last query sees.
            let keys = causal_offset.map_or(k.rows, |offset| offset + first + rows);
            scores.clear();
            scores.resize(rows * keys, 0f32);
            let kv_head = head / groups;
            let out = out_ptr;
            // SAFETY: `fits` bounds every view read here (rows < q.rows, keys ≤ k.rows, columns of
            // one head inside the row), `scores` holds `rows × keys`, and the output block of
            // (first..first + rows, head) is this task's alone.
            unsafe {
                gemm::gemm(
                    rows,
                    keys,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    q.data
                        .as_ptr()
                        .add(q.first + first * q.row_stride + head * d),
                    1,
                    q.row_stride as isize,
                    // kᵀ: element (c, j) is key j's component c.
                    k.data.as_ptr().add(k.first + kv_head * d),
                    k.row_stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                let visible = causal_offset.map_or(keys, |offset| offset + first + r + 1);
                softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    keys,
                    out.0.add(first * width + head * d),
                    1,
                    width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    keys as isize,
                    v.data.as_ptr().add(v.first + kv_head * d),
                    1,
                    v.row_stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    Ok(out)
}

/// One prefill sequence's attention over its paged context: `[query_len, heads × head_dim]`, or
/// `None` where a tensor is not a contiguous f32 CPU tensor or the CPU kernels are off (the caller then
/// takes the reference path). The context's keys and values are gathered into two contiguous buffers
/// first (two row copies per layer, small beside the products) so that each head is one strided view.
pub fn paged_prefill(
    queries: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    query_start: usize,
    query_len: usize,
    slots: &[u32],
    shape: AttentionShape,
) -> candle_core::Result<Option<Tensor>> {
    if !cpu_kernels_enabled() {
        return Ok(None);
    }
    let out = with_f32_slices([queries, key_cache, value_cache], |q, keys, values| {
        let row = shape.kv_heads * shape.head_dim;
        let width = shape.heads * shape.head_dim;
        let gather = |pool: &[f32]| -> candle_core::Result<Vec<f32>> {
            let mut rows = Vec::with_capacity(slots.len() * row);
            for &slot in slots {
                let Some(src) = pool.get(slot as usize * row..(slot as usize + 1) * row) else {
                    candle_core::bail!("cache slot {slot} is outside the pool");
                };
                rows.extend_from_slice(src);
            }
            Ok(rows)
        };
        let (k, v) = (gather(keys)?, gather(values)?);
        let view = |data, first, row_stride, rows| HeadRows {
            data,
            first,
            row_stride,
            rows,
        };
        attention(
            view(q, query_start * width, width, query_len),
            view(&k, 0, row, slots.len()),
            view(&v, 0, row, slots.len()),
            shape,
        )
    })?;
    let Some(out) = out else {
        return Ok(None);
    };
    Tensor::from_vec(
        out,
        (query_len, shape.heads * shape.head_dim),
        queries.device(),
    )
    .map(Some)
}

/// Bidirectional attention straight from a merged projection `[batch, tokens, 3 × hidden]` (q, k, v
/// side by side, as the vision tower's `qkv_proj` writes them): `[batch, tokens, hidden]`, or `None`
/// where `qkv` is not a contiguous f32 CPU tensor or the CPU kernels are off.
pub fn merged_qkv_attention(
    qkv: &Tensor,
    heads: usize,
    scale: f32,
) -> candle_core::Result<Option<Tensor>> {
    if !cpu_kernels_enabled() {
        return Ok(None);
    }
    merged_qkv(qkv, heads, scale)
}

/// The path itself, whatever `cpu_kernels_enabled` says (its test calls it directly).
fn merged_qkv(qkv: &Tensor, heads: usize, scale: f32) -> candle_core::Result<Option<Tensor>> {
    let (batch, tokens, width3) = qkv.dims3()?;
    let hidden = width3 / 3;
    if hidden * 3 != width3 || heads == 0 || hidden % heads != 0 {
        candle_core::bail!("merged q/k/v rows of {width3} do not split into {heads} heads");
    }
    let shape = AttentionShape {
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        causal_offset: None,
        scale,
    };
    let mut out = Vec::with_capacity(batch * tokens * hidden);
    {
        let (guard, layout) = qkv.storage_and_layout();
        let Some(data) = f32_slice(&guard, layout) else {
            return Ok(None);
        };
        for image in 0..batch {
            let base = image * tokens * width3;
            let view = |part: usize| HeadRows {
                data,
                first: base + part * hidden,
                row_stride: width3,
                rows: tokens,
            };
            out.extend(attention(view(0), view(1), view(2), shape)?);
        }
    }
    Tensor::from_vec(out, (batch, tokens, hidden), qkv.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention written out from its definition in f64: query `i` of head `h` over keys
    /// `0..=offset + i` (or all keys), kv head `h / groups`.
    fn by_definition(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (rows, keys): (usize, usize),
        shape: AttentionShape,
    ) -> Vec<f64> {
        let (h, kvh, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let mut out = vec![0f64; rows * h * d];
        for i in 0..rows {
            for head in 0..h {
                let g = head / (h / kvh);
                let visible = shape.causal_offset.map_or(keys, |o| o + i + 1);
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|c| {
                                q[i * h * d + head * d + c] as f64
                                    * k[j * kvh * d + g * d + c] as f64
                            })
                            .sum::<f64>()
                            * shape.scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = w.iter().sum();
                for (j, wj) in w.iter().enumerate() {
                    for c in 0..d {
                        out[i * h * d + head * d + c] +=
                            wj / total * v[j * kvh * d + g * d + c] as f64;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn causal_chunks_with_cached_prefix_and_grouped_heads_match_the_definition() {
        // 150 new queries (three chunks, the last partial) after 37 cached keys; 4 heads over 2 kv heads.
        let (rows, cached, d) = (150, 37, 8);
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: d,
            causal_offset: Some(cached),
            scale: 0.35,
        };
        let keys = cached + rows;
        let (q, k, v) = (
            values(rows * 4 * d, 1),
            values(keys * 2 * d, 2),
            values(keys * 2 * d, 3),
        );
        let view = |data, row_stride, rows| HeadRows {
            data,
            first: 0,
            row_stride,
            rows,
        };
        let got = attention(
            view(&q, 4 * d, rows),
            view(&k, 2 * d, keys),
            view(&v, 2 * d, keys),
            shape,
        )
        .unwrap();
        assert_close(&got, &by_definition(&q, &k, &v, (rows, keys), shape));
    }

    #[test]
    fn merged_qkv_rows_attend_bidirectionally_per_image() {
        // Two images of 70 tokens, 3 heads of 4: q | k | v side by side in each row.
        let (b, t, heads, d) = (2, 70, 3, 4);
        let hidden = heads * d;
        let qkv = values(b * t * 3 * hidden, 4);
        let tensor =
            Tensor::from_vec(qkv.clone(), (b, t, 3 * hidden), &candle_core::Device::Cpu).unwrap();
        let got = merged_qkv(&tensor, heads, 0.5)
            .unwrap()
            .expect("an f32 CPU tensor");
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let shape = AttentionShape {
            heads,
            kv_heads: heads,
            head_dim: d,
            causal_offset: None,
            scale: 0.5,
        };
        for image in 0..b {
            let part = |p: usize| -> Vec<f32> {
                (0..t)
                    .flat_map(|r| {
                        let row = &qkv[(image * t + r) * 3 * hidden..][..3 * hidden];
                        row[p * hidden..(p + 1) * hidden].to_vec()
                    })
                    .collect()
            };
            let want = by_definition(&part(0), &part(1), &part(2), (t, t), shape);
            assert_close(&got[image * t * hidden..(image + 1) * t * hidden], &want);
        }
    }

    #[test]
    fn views_outside_their_buffers_are_refused() {
        let data = vec![0f32; 64];
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 2,
            head_dim: 4,
            causal_offset: Some(0),
            scale: 1.0,
        };
        let ok = HeadRows {
            data: &data,
            first: 0,
            row_stride: 8,
            rows: 8,
        };
        let past_end = HeadRows { first: 1, ..ok };
        assert!(attention(ok, ok, ok, shape).is_ok());
        assert!(attention(past_end, ok, ok, shape).is_err());
        // Causal queries after 4 cached keys need 12 keys; there are 8.
        let shape = AttentionShape {
            causal_offset: Some(4),
            ..shape
        };
        assert!(attention(ok, ok, ok, shape).is_err());
    }
}
