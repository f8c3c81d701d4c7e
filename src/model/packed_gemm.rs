//! `x Wᵀ` on the CPU for every row count, with the weight packed once at load into panels of 32 output
//! columns: `[n/32][k][32]`, the last panel zero-padded.
//!
//! A register tile is 8 activation rows × one panel: sixteen 16-lane accumulators. Each step of `k`
//! loads the panel's 32 weights (two registers, the next 128 bytes of one sequential stream) and
//! broadcasts one activation per row, so products need no horizontal sums and land as `[m][n]`
//! directly. `small_gemm`'s dot-product tiles over the `[out, in]` rows re-read the activations from L2
//! for every tile and sum every accumulator across its lanes; on the mid checkpoint's shapes at 16
//! rows these panels ran 1.5–3.4× faster, and at 600 rows (prefill) 3–6× faster than those tiles and
//! ahead of candle's GEMM (`cargo bench --bench cpu_gemm -- --packed`, then the server's
//! own figures in the results file). The decoder keeps only the packed copy, so prefill and decode
//! both run here.
//!
//! Sums run over `k` in order, one lane per output: the same products as the reference, added in
//! another order (the HF parity tests' tolerances cover it). f16 panels (`--cpu-f16-weights`) are
//! widened to f32 in registers.

use candle_core::{CpuStorage, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

use super::cpu_kernels::{cpu_kernels_enabled, f32_slice, has_avx512};
use super::small_gemm::Weight;

/// Output columns per panel: two 16-lane registers.
const PANEL: usize = 32;

/// Activation rows per register tile (× 2 registers: 16 accumulators).
const TILE_ROWS: usize = 8;

/// Panels per parallel task: two, so the narrowest decoder shape (1024 outputs) still gives each of
/// two threads eight tasks.
const PANELS_PER_TASK: usize = 2;

/// A weight `[n, k]` packed as `[n/32][k][32]`.
#[derive(Debug, Clone)]
pub struct Packed<W> {
    n: usize,
    k: usize,
    panels: Vec<W>,
}

/// The packed weight in its storage type.
#[derive(Debug, Clone)]
pub enum PackedWeight {
    F32(Packed<f32>),
    F16(Packed<f16>),
}

impl PackedWeight {
    /// Packs a contiguous `[out, in]` f32 or f16 CPU weight, when this CPU runs the kernel (AVX-512)
    /// and the CPU kernels are on; `None` otherwise (the caller keeps the tensor).
    pub fn pack(w: &Tensor) -> candle_core::Result<Option<Self>> {
        match cpu_kernels_enabled() {
            true => Self::pack_if_avx512(w),
            false => Ok(None),
        }
    }

    /// `pack` whatever the CPU kernels' switch says.
    fn pack_if_avx512(w: &Tensor) -> candle_core::Result<Option<Self>> {
        if !has_avx512() || !w.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let (guard, layout) = w.storage_and_layout();
        if !layout.is_contiguous() {
            return Ok(None);
        }
        let at = layout.start_offset();
        Ok(match &*guard {
            Storage::Cpu(CpuStorage::F32(data)) => {
                Some(Self::F32(pack(&data[at..][..n * k], n, k, 0f32)))
            }
            Storage::Cpu(CpuStorage::F16(data)) => {
                Some(Self::F16(pack(&data[at..][..n * k], n, k, f16::ZERO)))
            }
            _ => None,
        })
    }

    pub fn out_dim(&self) -> usize {
        match self {
            Self::F32(p) => p.n,
            Self::F16(p) => p.n,
        }
    }

    /// The same panels in f16 (`--cpu-f16-weights`: half the bytes per decode step).
    pub fn to_f16(&self) -> Self {
        match self {
            Self::F32(p) => Self::F16(Packed {
                n: p.n,
                k: p.k,
                panels: p.panels.iter().map(|&v| f16::from_f32(v)).collect(),
            }),
            Self::F16(p) => Self::F16(p.clone()),
        }
    }

    /// `x Wᵀ` for a 2-D f32 CPU `x` (`[m, k]`): `[m, n]`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        let x = x.contiguous()?;
        let out = {
            let (guard, layout) = x.storage_and_layout();
            let Some(xs) = f32_slice(&guard, layout) else {
                candle_core::bail!("packed weights multiply f32 CPU rows, not {:?}", x.dtype());
            };
            match self {
                Self::F32(p) => p.matmul(&xs[..m * k], m, k)?,
                Self::F16(p) => p.matmul(&xs[..m * k], m, k)?,
            }
        };
        Tensor::from_vec(out, (m, self.out_dim()), x.device())
    }
}

fn pack<W: Copy>(w: &[W], n: usize, k: usize, zero: W) -> Packed<W> {
    let mut panels = vec![zero; n.div_ceil(PANEL) * k * PANEL];
    for (j, row) in w.chunks_exact(k).enumerate() {
        let panel = &mut panels[j / PANEL * k * PANEL..][..k * PANEL];
        for (kk, &v) in row.iter().enumerate() {
            panel[kk * PANEL + j % PANEL] = v;
        }
    }
    Packed { n, k, panels }
}

impl<W: Weight> Packed<W> {
    fn matmul(&self, x: &[f32], m: usize, k: usize) -> candle_core::Result<Vec<f32>> {
        if k != self.k {
            candle_core::bail!("a linear layer of {} inputs given rows of {k}", self.k);
        }
        let n = self.n;
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return Ok(out);
        }
        let panels = n.div_ceil(PANEL);
        // Each task writes only its own panels' columns of every row.
        let out_at = SendPtr(out.as_mut_ptr());
        (0..panels.div_ceil(PANELS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let out_at = &out_at;
                let first = task * PANELS_PER_TASK;
                for panel in first..(first + PANELS_PER_TASK).min(panels) {
                    let weights = &self.panels[panel * k * PANEL..][..k * PANEL];
                    let cols = (n - panel * PANEL).min(PANEL);
                    for i in (0..m).step_by(TILE_ROWS) {
                        let rows = (m - i).min(TILE_ROWS);
                        // SAFETY: `pack` checked AVX-512F; `x` holds rows `i..i + rows` of `k`,
                        // `weights` `k × 32`, and `out` rows `i..i + rows` of `n` from the panel's
                        // first column on, of which the kernel writes only `cols`; no other task
                        // writes this panel's columns.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            tile(
                                &x[i * k..][..rows * k],
                                weights,
                                out_at.0.add(i * n + panel * PANEL),
                                n,
                                cols,
                            )
                        };
                    }
                }
            });
        Ok(out)
    }
}

/// A pointer the tasks share; each writes only its own columns.
struct SendPtr(*mut f32);
// SAFETY: the tasks that hold it write disjoint columns of the buffer, which outlives them.
unsafe impl Sync for SendPtr {}

/// One register tile: `rows` (≤ 8) activation rows of `x` times one panel, into `out` (row stride
/// `n`), writing the panel's first `cols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile<W: Weight>(x: &[f32], panel: &[W], out: *mut f32, n: usize, cols: usize) {
    let rows = x.len() / (panel.len() / PANEL);
    match rows {
        1 => tile_rows::<W, 1>(x, panel, out, n, cols),
        2 => tile_rows::<W, 2>(x, panel, out, n, cols),
        3 => tile_rows::<W, 3>(x, panel, out, n, cols),
        4 => tile_rows::<W, 4>(x, panel, out, n, cols),
        5 => tile_rows::<W, 5>(x, panel, out, n, cols),
        6 => tile_rows::<W, 6>(x, panel, out, n, cols),
        7 => tile_rows::<W, 7>(x, panel, out, n, cols),
        _ => tile_rows::<W, TILE_ROWS>(x, panel, out, n, cols),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile_rows<W: Weight, const R: usize>(
    x: &[f32],
    panel: &[W],
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let k = panel.len() / PANEL;
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for kk in 0..k {
        let w0 = W::load16(wp.add(kk * PANEL));
        let w1 = W::load16(wp.add(kk * PANEL + 16));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*xp.add(r * k + kk));
            a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
        }
    }
    let mask = |c: usize| ((1u32 << c.min(16)) - 1) as __mmask16;
    for (r, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(r * n), mask(cols), a[0]);
        _mm512_mask_storeu_ps(out.add(r * n + 16), mask(cols.saturating_sub(16)), a[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5 - 1.0) * 0.5)
            .collect()
    }

    /// `Σ_k x[i][k] w[j][k]` in f64: the definition.
    fn definition(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    /// `packed`'s product with the `m × k` rows `x`, flattened.
    fn product(packed: &PackedWeight, x: &[f32], m: usize, k: usize) -> Vec<f32> {
        let x = Tensor::from_vec(x.to_vec(), (m, k), &Device::Cpu).unwrap();
        let out = packed.matmul(&x).unwrap();
        assert_eq!(out.dims(), &[m, packed.out_dim()]);
        out.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Within f32 rounding of sums over at most a hundred products of magnitude below one.
    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}: {g} vs {w}"
            );
        }
    }

    fn runs_here() -> bool {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512");
            return false;
        }
        true
    }

    #[test]
    fn equals_the_definition_for_ragged_shapes_and_every_row_count() {
        if !runs_here() {
            return;
        }
        let dev = Device::Cpu;
        // Panels cut short (45, 70), several tasks (200), one column; row counts around the tile.
        for (n, k) in [(45usize, 7usize), (70, 100), (200, 33), (1, 16)] {
            let w = values(n * k, n);
            let packed =
                PackedWeight::pack_if_avx512(&Tensor::from_vec(w.clone(), (n, k), &dev).unwrap())
                    .unwrap()
                    .expect("packed");
            for m in [1usize, 3, 8, 9, 17, 40] {
                let x = values(m * k, m + 1);
                let got = product(&packed, &x, m, k);
                assert_close(
                    &got,
                    &definition(&x, &w, m, n, k),
                    &format!("n {n} k {k} m {m}"),
                );
            }
        }
    }

    #[test]
    fn f16_panels_are_widened_and_summed_in_f32() {
        if !runs_here() {
            return;
        }
        let dev = Device::Cpu;
        let (n, k, m) = (40usize, 24usize, 5usize);
        // Weights that f16 holds exactly, so the definition over them is exact too.
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i % 61) as f32 - 30.0) / 64.0)
            .collect();
        let wt = Tensor::from_vec(w.clone(), (n, k), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let direct = PackedWeight::pack_if_avx512(&wt).unwrap().expect("packed");
        let converted =
            PackedWeight::pack_if_avx512(&Tensor::from_vec(w.clone(), (n, k), &dev).unwrap())
                .unwrap()
                .expect("packed")
                .to_f16();
        let x = values(m * k, 3);
        let want = definition(&x, &w, m, n, k);
        for packed in [direct, converted] {
            assert!(matches!(packed, PackedWeight::F16(_)));
            assert_close(&product(&packed, &x, m, k), &want, "f16");
        }
    }

    #[test]
    fn rows_of_the_wrong_width_are_an_error() {
        if !runs_here() {
            return;
        }
        let dev = Device::Cpu;
        let packed =
            PackedWeight::pack_if_avx512(&Tensor::zeros((4, 8), DType::F32, &dev).unwrap())
                .unwrap()
                .expect("packed");
        assert!(packed
            .matmul(&Tensor::zeros((2, 9), DType::F32, &dev).unwrap())
            .is_err());
    }
}
