//! The decode attention's two products with eight-lane fused multiply-adds (AVX2 + FMA; `d` a
//! multiple of 8), each shaped so no lane is summed one at a time.
//!
//! Scores: eight slots at once per query head, eight accumulators, then one transposing reduction
//! (`hadd` tree) that leaves the eight dot products in one register. A dot product per slot with its
//! own horizontal sum spent more on the sum than on the products (d = 64 is eight multiply-adds).
//! Weighted values: each output head's accumulators stay in registers across a chunk of slots instead
//! of being loaded and stored back for every slot.
//! Both take a chunk of slots at a time, so every cached row is read front to back (its kv heads in
//! order) while the chunk is in L1.

use std::arch::x86_64::*;

use super::{Kernel, Part};

/// Slots per chunk of the weighted sum: their value rows (a block of kv heads each) stay in L1 while
/// every query head of the block passes over them. One layer for 16 sequences took 2.5–2.7 ms with 8,
/// 2.6–2.9 with 32 and 3.0 with 64 (`cpu_phases -- --decode-only`): each row of a chunk is a stream
/// the prefetchers follow, and 64 were more than they do.
const SLOT_CHUNK: usize = 8;

/// `[a₀ … a₇]` → the register whose lane `s` is the sum of `a_s`'s lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_each(a: [__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // Lane s (< 4) of u0 / u1 holds a_s / a_(s+4) summed over lanes 0–3, lane s + 4 over lanes 4–7.
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps(u0, u1, 0x20),
        _mm256_permute2f128_ps(u0, u1, 0x31),
    )
}

/// `scores[i][j] = q_i · k_j × scale` for every query head `i` and slot `j` of the part.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn scores(kernel: &Kernel<'_>, part: &Part<'_>, scores: &mut [f32]) {
    let (d, ctx) = (kernel.shape.head_dim, part.slots.len());
    let scale = _mm256_set1_ps(kernel.scale);
    let base = kernel.keys.as_ptr().add(part.column);
    for (chunk, slots) in part.slots.chunks(8).enumerate() {
        // A short last chunk repeats its last slot; the repeats are computed, not stored.
        let rows = [0, 1, 2, 3, 4, 5, 6, 7]
            .map(|s| base.add(slots[s.min(slots.len() - 1)] as usize * kernel.shape.row()));
        for (i, q) in part.queries.chunks_exact(d).enumerate() {
            let column = kernel.kv_column(part, i);
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..d).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (a, row) in acc.iter_mut().zip(rows) {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(column + c)), *a);
                }
            }
            let dots = _mm256_mul_ps(sum_each(acc), scale);
            let at = &mut scores[i * ctx + chunk * 8..][..slots.len()];
            match slots.len() {
                8 => _mm256_storeu_ps(at.as_mut_ptr(), dots),
                n => {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), dots);
                    at.copy_from_slice(&lanes[..n]);
                }
            }
        }
    }
}

/// `out_i += Σ_j probs[i][j] v_j` for every query head `i`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_values(
    kernel: &Kernel<'_>,
    part: &Part<'_>,
    probs: &[f32],
    out: &mut [f32],
) {
    let (d, ctx) = (kernel.shape.head_dim, part.slots.len());
    let base = kernel.values.as_ptr().add(part.column);
    for (chunk, slots) in part.slots.chunks(SLOT_CHUNK).enumerate() {
        let first = chunk * SLOT_CHUNK;
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let column = kernel.kv_column(part, i);
            let p = &probs[i * ctx + first..][..slots.len()];
            // Up to 64 columns of the head at a time: eight accumulators.
            for c0 in (0..d).step_by(64) {
                let lanes = (d - c0).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                for (v, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_loadu_ps(o.as_ptr().add(c0 + 8 * v));
                }
                for (&s, &pj) in slots.iter().zip(p) {
                    let row = base.add(s as usize * kernel.shape.row() + column + c0);
                    let pv = _mm256_set1_ps(pj);
                    for (v, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * v)), *a);
                    }
                }
                for (v, a) in acc.iter().enumerate().take(lanes) {
                    _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * v), *a);
                }
            }
        }
    }
}
