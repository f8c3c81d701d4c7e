//! Vectorised `exp` for the CPU kernels, and the fused elementwise passes built on it.
//!
//! Candle's CPU ops call the scalar `expf` once per element and make one pass (and one new tensor) per
//! operation: SiLU·up was a strided copy of each half of the merged gate/up output, a sigmoid and two
//! products; CLIP's quick GELU three passes. On issue 14's mid checkpoint `expf` alone was 6–7% of a
//! cold request. Here `exp` runs eight lanes at a time (AVX2 + FMA; the scalar `f32::exp` elsewhere)
//! and each activation is one pass over its input, as is RMSNorm (seven candle ops before).
//!
//! `exp8` is the Cephes single-precision exponential: `x = n ln 2 + r` with `ln 2` split in two for
//! an exact reduction, a degree-6 polynomial for `eʳ` on `|r| ≤ ln 2 / 2`, and `2ⁿ` built in the
//! exponent bits. Its error is within 2 ulp of the true value over the clamped range, the same order
//! as glibc's `expf` (≤ 1 ulp) and far below the HF parity tests' tolerances; the tests below check it
//! against f64 over the whole range. Inputs below −87.3 give ≈ 1.2e-38 (glibc: a denormal or 0), which
//! no softmax sum or activation can tell from 0.

use rayon::prelude::*;

use super::cpu_kernels::has_avx2_fma;
use super::small_gemm::dot;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// e^x on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        // The bound first: min/max return their second operand when either is NaN, so NaN passes
        // through (a NaN or +inf score makes a NaN softmax row, as torch's does).
        let x = _mm256_min_ps(_mm256_set1_ps(88.376_26), x);
        // Below ln(2⁻¹²⁶) the exponent bits would underflow: such inputs give ≈ 1.2e-38.
        let x = _mm256_max_ps(_mm256_set1_ps(-87.336_5), x);
        // n = round(x / ln 2), then r = x − n ln 2 in two steps (ln 2 = C1 + C2, C1 exact in 9 bits).
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    /// `e^(s − max)` of one row in place; returns the row's max and the sum of the exponentials.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
        let body = row.len() / 8 * 8;
        let p = row.as_mut_ptr();
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(8) {
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let max = lanes
            .iter()
            .chain(&row[body..])
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let (vm, mut vsum) = (_mm256_set1_ps(max), _mm256_setzero_ps());
        for i in (0..body).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), e);
            vsum = _mm256_add_ps(vsum, e);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), vsum);
        let mut total: f32 = lanes.iter().sum();
        for s in &mut row[body..] {
            *s = (*s - max).exp();
            total += *s;
        }
        (max, total)
    }

    /// `row × factor` in place.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale(row: &mut [f32], factor: f32) {
        let body = row.len() / 8 * 8;
        let (p, f) = (row.as_mut_ptr(), _mm256_set1_ps(factor));
        for i in (0..body).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), f));
        }
        for s in &mut row[body..] {
            *s *= factor;
        }
    }

    /// `out[i] = x[i] / (1 + e^(−k x[i])) × (mul[i] or 1)`: SiLU (k = 1) and quick GELU (k = 1.702).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gated(x: &[f32], mul: Option<&[f32]>, k: f32, out: &mut [f32]) {
        let body = x.len() / 8 * 8;
        let (one, vk) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-k));
        for i in (0..body).step_by(8) {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let e = exp8(_mm256_mul_ps(v, vk));
            let mut y = _mm256_div_ps(v, _mm256_add_ps(one, e));
            if let Some(m) = mul {
                y = _mm256_mul_ps(y, _mm256_loadu_ps(m.as_ptr().add(i)));
            }
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
        }
        super::gated_scalar(&x[body..], mul.map(|m| &m[body..]), k, &mut out[body..]);
    }
}

fn gated_scalar(x: &[f32], mul: Option<&[f32]>, k: f32, out: &mut [f32]) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let y = v / (1.0 + (-k * v).exp());
        *o = mul.map_or(y, |m| y * m[i]);
    }
}

/// Max-subtracted softmax of one row in place (all-`-inf` rows cannot occur: callers pass only the
/// keys a query sees, itself included).
pub fn softmax_in_place(row: &mut [f32]) {
    let (_, total) = exp_shifted_in_place(row);
    let inv = 1.0 / total;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { avx2::scale(row, inv) };
    }
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// The unnormalised half of a softmax: `e^(s − max)` in place, returning `(max, Σ e^(s − max))`, so
/// that partial softmaxes over parts of a row can be merged later (decode attention over a shared
/// prefix). An empty row gives `(-inf, 0)`.
pub fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { avx2::exp_shifted(row) };
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f32;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    (max, total)
}

/// `x / (1 + e^(−k x))`, times `mul` elementwise where given, over equal-length slices.
fn gated(x: &[f32], mul: Option<&[f32]>, k: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA; every slice is as long as `x` (the callers' chunks).
        return unsafe { avx2::gated(x, mul, k, out) };
    }
    gated_scalar(x, mul, k, out)
}

/// Rows per parallel task of the elementwise passes.
const ROWS_PER_TASK: usize = 8;

/// LLaMA's `silu(gate) × up` from the merged projection's rows `[gate | up]` (`rows × 2·inter`):
/// `rows × inter`, in one pass without splitting the halves into tensors first.
pub fn silu_mul(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * inter);
    let mut out = vec![0f32; rows * inter];
    out.par_chunks_mut(ROWS_PER_TASK * inter)
        .zip(gate_up.par_chunks(ROWS_PER_TASK * 2 * inter))
        .for_each(|(out, input)| {
            for (o, row) in out
                .chunks_exact_mut(inter)
                .zip(input.chunks_exact(2 * inter))
            {
                let (gate, up) = row.split_at(inter);
                gated(gate, Some(up), 1.0, o);
            }
        });
    out
}

/// CLIP's quick GELU, `x · σ(1.702 x)`, in one pass.
pub fn quick_gelu(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    const CHUNK: usize = 16 * 1024;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| gated(x, None, 1.702, o));
    out
}

/// LLaMA's RMSNorm of f32 rows in one pass each: `x · (mean(x²) + eps)^-½ · weight` (HF's order: the
/// reciprocal root times x, then the weight).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(ROWS_PER_TASK * d)
        .zip(x.par_chunks(ROWS_PER_TASK * d))
        .for_each(|(out, x)| {
            for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let inv = 1.0 / (dot::<f32>(row, row) / d as f32 + eps).sqrt();
                for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
                    *o = v * inv * w;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error of the vector exp against f64, over the range softmax and the activations use.
    #[test]
    fn exp8_within_two_ulp_of_f64() {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            use std::arch::x86_64::*;
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 1.37e-3);
                let mut got = [0f32; 8];
                // SAFETY: AVX2 and FMA checked above.
                unsafe {
                    _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(xs.as_ptr())))
                };
                for (g, x) in got.iter().zip(xs) {
                    let want = (x as f64).exp();
                    worst = worst.max((*g as f64 - want).abs() / want);
                }
                x += 0.0113;
            }
            // 2 ulp of f32 is 2 × 2⁻²³ ≈ 2.4e-7 relative.
            assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        }
    }

    #[test]
    fn exp8_gives_zero_far_below_and_one_at_zero() {
        let mut row = vec![
            0.0,
            f32::NEG_INFINITY,
            -1000.0,
            0.0,
            -200.0,
            0.0,
            -95.0,
            0.0,
            0.0,
        ];
        softmax_in_place(&mut row);
        for (i, p) in row.iter().enumerate() {
            let want = if [1, 2, 4, 6].contains(&i) { 0.0 } else { 0.2 };
            assert!((p - want).abs() < 1e-7, "{i}: {p}");
        }
    }

    #[test]
    fn nan_and_infinite_scores_give_nan_rows() {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut row: Vec<f32> = (0..19).map(|i| i as f32 * 0.1).collect();
            row[5] = bad;
            softmax_in_place(&mut row);
            assert!(row.iter().all(|p| p.is_nan()), "{bad}: {row:?}");
        }
        let gelu = quick_gelu(&[f32::NAN; 9]);
        assert!(gelu.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn rms_norm_matches_its_definition() {
        let d = 37;
        let x: Vec<f32> = (0..3 * d).map(|i| (i as f32 * 0.71).sin() * 3.0).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.01).collect();
        let got = rms_norm(&x, &w, 1e-5);
        for (r, row) in x.chunks(d).enumerate() {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            for c in 0..d {
                let want = row[c] as f64 / (ms + 1e-5).sqrt() * w[c] as f64;
                assert!((got[r * d + c] as f64 - want).abs() < 1e-6, "[{r}][{c}]");
            }
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        let x: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.173).collect();
        let up: Vec<f32> = (0..203).map(|i| (i as f32 * 0.37).sin()).collect();
        let gate_up: Vec<f32> = x.iter().chain(&up).copied().collect();
        let silu = silu_mul(&gate_up, x.len());
        let gelu = quick_gelu(&x);
        for i in 0..x.len() {
            let v = x[i] as f64;
            let sig = |k: f64| 1.0 / (1.0 + (-k * v).exp());
            let (want_silu, want_gelu) = (v * sig(1.0) * up[i] as f64, v * sig(1.702));
            assert!((silu[i] as f64 - want_silu).abs() <= 1e-6 * (1.0 + want_silu.abs()));
            assert!((gelu[i] as f64 - want_gelu).abs() <= 1e-6 * (1.0 + want_gelu.abs()));
        }
    }
}
