//! `x Wᵀ` on the CPU for the few rows of a decode step, streaming each weight row once.
//!
//! A decode step multiplies 1–32 activation rows by every weight matrix: the work is reading the
//! weights, about 0.75 GB per step on issue 14's mid checkpoint. Candle's matmul hands these shapes to
//! the `gemm` crate, which packs the (transposed) weight matrix into its panel layout on every call and
//! so reads and writes the whole matrix before multiplying. Here each task takes a run of weight rows
//! (`[out, in]`, PyTorch's layout, already contiguous along `in`) and computes the dot product of every
//! activation row with each of them while the weight row sits in L1: one pass over the weights, no
//! packing, no allocation beyond the output.
//!
//! The dot products use eight partial sums (fused multiply-add where the CPU has AVX2 + FMA), so their
//! order of additions differs from the GEMM's: results agree to f32 rounding, which the HF parity
//! tests' tolerances cover. Tiles of 2 weight rows × 4 activation rows keep eight accumulators in
//! registers on AVX2; on AVX-512, one row takes 8 weight rows per pass and more rows tiles of 6 weight
//! rows × 4 activation rows (24 accumulators) over L1-sized blocks of k, the next block prefetched
//! while this one is multiplied; other CPUs get a portable loop.
//!
//! Where `packed_gemm` runs (AVX-512), an f32 model's layers are packed at load and never come here;
//! this serves AVX2 CPUs, and its AVX-512 tiles stay as the baseline `cpu_gemm` compares the panels with.

use candle_core::{CpuStorage, Storage, Tensor};

use super::cpu_kernels::{cpu_kernels_enabled, f32_slice, has_avx2_fma, has_avx512};
use rayon::prelude::*;

/// Largest row count sent here: where this kernel is ahead of candle's matmul, measured with
/// `cargo bench --bench cpu_gemm` on the 2-core development machine (AVX-512). With AVX-512 the `gemm`
/// crate runs its x86-v4 kernels, 2× faster than its AVX2 ones at prefill sizes but slow for a few rows
/// (2–5 ms where this kernel takes 0.5–1.8 ms at 8–16 rows); this kernel is still 1.1–1.9× ahead at
/// 32. With AVX2 only, the GEMM draws level at about 16 rows.
pub fn max_rows() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            return 32;
        }
        12
    })
}

/// Weight rows per parallel task: enough work to amortise scheduling, enough tasks to balance; a
/// multiple of the AVX-512 tile (6) and of the one-row pass (8).
const ROWS_PER_TASK: usize = 48;

/// `x Wᵀ` for a 2-D f32 CPU `x` of at most `max_rows()` rows and a contiguous f32 or f16 `w`
/// (`[out, in]`); `None` for anything else, which the caller sends to candle's matmul.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let n = w.dim(0)?;
    if m > max_rows() || !x.device().is_cpu() || w.dims2()? != (n, k) || !cpu_kernels_enabled() {
        return Ok(None);
    }
    let out = {
        let (x_guard, x_layout) = x.storage_and_layout();
        let (w_guard, w_layout) = w.storage_and_layout();
        let Some(xs) = f32_slice(&x_guard, x_layout) else {
            return Ok(None);
        };
        match (&*w_guard, w_layout.is_contiguous()) {
            (Storage::Cpu(CpuStorage::F32(data)), true) => {
                matmul_transposed(xs, &data[w_layout.start_offset()..][..n * k], m, n, k)
            }
            (Storage::Cpu(CpuStorage::F16(data)), true) => {
                matmul_transposed(xs, &data[w_layout.start_offset()..][..n * k], m, n, k)
            }
            _ => return Ok(None),
        }
    };
    Tensor::from_vec(out, (m, n), x.device()).map(Some)
}

/// A weight element: f32, or f16 widened to f32 on load (products and sums are always f32).
pub trait Weight: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight consecutive weights as f32 lanes.
    ///
    /// # Safety
    /// `p` must point at eight readable weights, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive weights as f32 lanes.
    ///
    /// # Safety
    /// `p` must point at sixteen readable weights, and the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Weight for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// `out[m][n] = Σ_k x[m][k] · w[n][k]` for `x` of `m × k` and `w` of `n × k`, row-major.
pub fn matmul_transposed<W: Weight>(x: &[f32], w: &[W], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not m × k");
    assert_eq!(w.len(), n * k, "w is not n × k");
    // Computed as outᵀ (`n × m`, a task's rows contiguous), transposed at the end (m·n values).
    let mut out_t = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return out_t;
    }
    let fma = has_avx2_fma();
    let avx512 = fma && has_avx512();
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK;
            let rows = chunk.len() / m;
            let w_rows = &w[first * k..(first + rows) * k];
            if avx512 && m <= 32 {
                // SAFETY: the CPU supports AVX-512F (checked at run time just above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    rows_avx512(x, w_rows, chunk, m, k)
                };
            } else if fma {
                // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time just above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    rows_fma(x, w_rows, chunk, m, k)
                };
            } else {
                rows_kernel(x, w_rows, chunk, m, k);
            }
        });
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// For each weight row of `w_rows`, its dot product with every row of `x`, into `out_t[row][i]`:
/// tiles of 2 weight rows × 4 activation rows, eight 8-lane accumulators (6 loads per 8 FMAs); a
/// single activation row takes 4 weight rows at a time instead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_fma<W: Weight>(x: &[f32], w_rows: &[W], out_t: &mut [f32], m: usize, k: usize) {
    use std::arch::x86_64::*;
    let body = k / 8 * 8;
    let rows = w_rows.len() / k;
    let (xp, wp) = (x.as_ptr(), w_rows.as_ptr());
    // Sum of the 8 lanes, plus the products past the 8-wide body.
    let finish = |acc: __m256, xi: usize, wj: usize| -> f32 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let tail: f32 = (body..k)
            .map(|c| x[xi * k + c] * w_rows[wj * k + c].to_f32())
            .sum();
        lanes.iter().sum::<f32>() + tail
    };
    if m == 1 {
        // One activation row (single-stream decode): 4 weight rows per pass, one FMA per weight
        // vector, four independent accumulator chains.
        let mut j = 0;
        while j < rows {
            let n4 = (rows - j).min(4);
            let wr = [0, 1, 2, 3].map(|r| wp.add((j + r.min(n4 - 1)) * k));
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < body {
                let xv = _mm256_loadu_ps(xp.add(c));
                for r in 0..4 {
                    a[r] = _mm256_fmadd_ps(xv, W::load8(wr[r].add(c)), a[r]);
                }
                c += 8;
            }
            for r in 0..n4 {
                out_t[j + r] = finish(a[r], 0, j + r);
            }
            j += n4;
        }
        return;
    }
    let mut j = 0;
    while j < rows {
        let pair = (rows - j).min(2);
        let w0 = wp.add(j * k);
        let w1 = wp.add((j + pair - 1) * k); // a lone last row is computed twice, stored once
        let mut i = 0;
        while i < m {
            let quad = (m - i).min(4);
            let xr = [0, 1, 2, 3].map(|r| xp.add((i + r.min(quad - 1)) * k));
            let mut a = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < body {
                let (v0, v1) = (W::load8(w0.add(c)), W::load8(w1.add(c)));
                for r in 0..4 {
                    let xv = _mm256_loadu_ps(xr[r].add(c));
                    a[r] = _mm256_fmadd_ps(xv, v0, a[r]);
                    a[4 + r] = _mm256_fmadd_ps(xv, v1, a[4 + r]);
                }
                c += 8;
            }
            for r in 0..quad {
                out_t[j * m + i + r] = finish(a[r], i + r, j);
                if pair == 2 {
                    out_t[(j + 1) * m + i + r] = finish(a[4 + r], i + r, j + 1);
                }
            }
            i += quad;
        }
        j += pair;
    }
}

/// `rows_fma` on AVX-512. Several activation rows: tiles of 6 weight rows × 4 activation rows,
/// twenty-four 16-lane accumulators, 10 loads per 24 FMAs (the AVX2 tiles issue 6 loads per 8 and were
/// compute-bound at 16 rows: 87 GFLOP/s on the mid checkpoint's qkv shape; 4 × 4 tiles, 8 loads per 16,
/// took 57–58 ms for the 16-sequence step of `cpu_phases` where these take 51–52). One row: eight weight
/// rows per pass (batch-1 f16 decode 30 → 26-30 ms per step beside the AVX2 loop, noisy).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_avx512<W: Weight>(x: &[f32], w_rows: &[W], out_t: &mut [f32], m: usize, k: usize) {
    use std::arch::x86_64::*;
    let body = k / 16 * 16;
    let rows = w_rows.len() / k;
    let (xp, wp) = (x.as_ptr(), w_rows.as_ptr());
    let finish = |acc: __m512, xi: usize, wj: usize| -> f32 {
        let tail: f32 = (body..k)
            .map(|c| x[xi * k + c] * w_rows[wj * k + c].to_f32())
            .sum();
        _mm512_reduce_add_ps(acc) + tail
    };
    if m == 1 {
        // One activation row: 8 weight rows per pass, eight independent accumulator chains.
        let mut j = 0;
        while j < rows {
            let n8 = (rows - j).min(8);
            let wr = [0, 1, 2, 3, 4, 5, 6, 7].map(|r| wp.add((j + r.min(n8 - 1)) * k));
            let mut a = [_mm512_setzero_ps(); 8];
            let mut c = 0;
            while c < body {
                let xv = _mm512_loadu_ps(xp.add(c));
                for r in 0..8 {
                    a[r] = _mm512_fmadd_ps(xv, W::load16(wr[r].add(c)), a[r]);
                }
                c += 16;
            }
            for r in 0..n8 {
                out_t[j + r] = finish(a[r], 0, j + r);
            }
            j += n8;
        }
        return;
    }
    // Quads of activation rows: at most 8 (`max_rows()` is 32).
    let quads = m.div_ceil(4);
    assert!(quads <= 8, "rows_avx512 takes at most 32 rows");
    let mut sums = [[_mm512_setzero_ps(); 4 * TILE]; 8];
    let mut j = 0;
    while j < rows {
        let nt = (rows - j).min(TILE);
        // A short last tile repeats its last weight row; the repeats are computed, not stored.
        let wr: [*const W; TILE] = std::array::from_fn(|r| wp.add((j + r.min(nt - 1)) * k));
        sums[..quads]
            .iter_mut()
            .for_each(|s| *s = [_mm512_setzero_ps(); 4 * TILE]);
        // k in blocks: every quad of activation rows uses a block of the tile's weight rows while it
        // sits in L1, so each weight row comes from memory once (whole rows per quad made the first
        // quad wait on memory and the others re-read L2).
        let mut start = 0;
        while start < body {
            let end = (start + K_BLOCK).min(body);
            // The block after this one (the next tile's first block after the last), fetched while
            // this one is multiplied: without it each block's first quad waited on memory and the
            // products did not overlap the reads (at 16 rows the time was their sum).
            let next: [*const W; TILE] = match (end < body, j + TILE < rows) {
                (true, _) => wr.map(|p| p.add(end)),
                (false, true) => {
                    std::array::from_fn(|r| wp.add((j + TILE + r.min(rows - j - TILE - 1)) * k))
                }
                (false, false) => wr,
            };
            // The next block's 16-weight pieces, spread over all the block's iterations (a burst in
            // the first quad left the later ones nothing to overlap).
            let per_iteration = TILE.div_ceil(quads);
            let mut piece = 0;
            for (qi, sum) in sums[..quads].iter_mut().enumerate() {
                let i = qi * 4;
                let quad = (m - i).min(4);
                let xr = [0, 1, 2, 3].map(|r| xp.add((i + r.min(quad - 1)) * k));
                let mut a = *sum;
                let mut c = start;
                while c < end {
                    for _ in 0..per_iteration {
                        let (r, at) = (piece / (K_BLOCK / 16), piece % (K_BLOCK / 16) * 16);
                        if r < TILE {
                            // `wrapping_add`: past a matrix's last row the address is only a hint.
                            _mm_prefetch::<PREFETCH_HINT>(next[r].wrapping_add(at) as *const i8);
                        }
                        piece += 1;
                    }
                    let w: [__m512; TILE] = std::array::from_fn(|r| W::load16(wr[r].add(c)));
                    for (q, row) in xr.iter().enumerate() {
                        let xv = _mm512_loadu_ps(row.add(c));
                        for r in 0..TILE {
                            a[4 * r + q] = _mm512_fmadd_ps(xv, w[r], a[4 * r + q]);
                        }
                    }
                    c += 16;
                }
                *sum = a;
            }
            start = end;
        }
        for (qi, sum) in sums[..quads].iter().enumerate() {
            let i = qi * 4;
            for r in 0..nt {
                for q in 0..(m - i).min(4) {
                    out_t[(j + r) * m + i + q] = finish(sum[4 * r + q], i + q, j + r);
                }
            }
        }
        j += nt;
    }
}

const PREFETCH_HINT: i32 = std::arch::x86_64::_MM_HINT_T0;

/// Weight rows per tile of `rows_avx512` (× 4 activation rows: `4 × TILE` accumulators).
const TILE: usize = 6;

/// Weight elements per block of `rows_avx512`: four rows of it (4 KB in f32) stay in L1 while every
/// quad of activation rows passes over them.
const K_BLOCK: usize = 256;

/// The portable kernel (no AVX2/FMA): one dot product at a time, eight partial sums.
fn rows_kernel<W: Weight>(x: &[f32], w_rows: &[W], out_t: &mut [f32], m: usize, k: usize) {
    for (w_row, out_row) in w_rows.chunks_exact(k).zip(out_t.chunks_exact_mut(m)) {
        for (i, out) in out_row.iter_mut().enumerate() {
            *out = dot(w_row, &x[i * k..(i + 1) * k]);
        }
    }
}

/// Eight independent partial sums, so the compiler can keep them in vector registers (inlined, so
/// callers compiled for AVX2 get it eight lanes wide).
#[inline(always)]
pub(crate) fn dot<W: Weight>(a: &[W], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x.to_f32() * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l].to_f32() * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.618_034 + seed).sin())
            .collect()
    }

    #[test]
    fn equals_the_definition_for_every_row_count_and_ragged_shapes() {
        // k = 37: a tail after the 8- and 16-wide bodies; k = 601: three blocks of `K_BLOCK`, the
        // last one short; n = 70: a last task shorter than ROWS_PER_TASK; m up to 32: quads of
        // activation rows and the remainder.
        let n = 70;
        let cases = [1, 2, 3, 4, 5, 8, 9].map(|m| (m, 37)).into_iter();
        for (m, k) in cases.chain([(1, 601), (7, 601), (16, 601), (32, 601)]) {
            let w = values(n * k, 0.5);
            let x = values(m * k, 1.5 + m as f32);
            let got = matmul_transposed(&x, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum();
                    let g = got[i * n + j] as f64;
                    // f32 sums of k products of magnitude ≤ 1.
                    let tol = if k < 100 { 1e-5 } else { 1e-4 };
                    assert!(
                        (g - want).abs() < tol,
                        "m={m} k={k} [{i}][{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn f16_weights_are_widened_and_summed_in_f32() {
        let (m, n, k) = (5, 33, 29);
        let x = values(m * k, 0.3);
        let w: Vec<half::f16> = values(n * k, 0.9)
            .into_iter()
            .map(half::f16::from_f32)
            .collect();
        let got = matmul_transposed(&x, &w, m, n, k);
        let mut portable = vec![0f32; n * m];
        rows_kernel(&x, &w, &mut portable, m, k);
        for i in 0..m {
            for j in 0..n {
                // The definition over the f16 values themselves: only the weights were rounded.
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c].to_f64())
                    .sum();
                assert!((got[i * n + j] as f64 - want).abs() < 1e-5, "[{i}][{j}]");
                assert!(
                    (portable[j * m + i] as f64 - want).abs() < 1e-5,
                    "[{i}][{j}]"
                );
            }
        }
    }

    #[test]
    fn both_kernels_agree() {
        let (m, n, k) = (6, 40, 64);
        let (x, w) = (values(m * k, 0.1), values(n * k, 0.2));
        let mut plain = vec![0f32; n * m];
        rows_kernel(&x, &w, &mut plain, m, k);
        let fused = matmul_transposed(&x, &w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                assert!((plain[j * m + i] - fused[i * n + j]).abs() < 1e-5);
            }
        }
    }
}
