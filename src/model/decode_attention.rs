//! Decode attention on the CPU that reads keys and values where they lie in the paged cache.
//!
//! The reference path (`attention::paged_attention`) gathers each sequence's whole context out of the
//! pool (`index_select`), transposes it and then multiplies: per layer and sequence that is two copies
//! of `context × kv_heads × head_dim` values before any arithmetic, and at 16 decoding sequences it was
//! most of a step's memory traffic (`memmove` in issue 14's profile). A decode query needs each cached
//! row once, so this path reads the rows in place through the slot list and does the same arithmetic:
//! scores `q·k × scale` in f32, softmax in f32 (max-subtracted, normalised before use, as softmax then
//! `probs @ V`), then the probability-weighted sum of the value rows. Only the order of additions inside
//! the dot products differs from the GEMM's, which the HF parity tests' tolerances cover.
//!
//! f32 caches only (the CPU serves f32); other dtypes keep the reference path.

use candle_core::Tensor;
use rayon::prelude::*;

use super::cpu_kernels::{cpu_kernels_enabled, has_avx2_fma, with_f32_slices};
use super::cpu_math::softmax_in_place;
use super::small_gemm::dot;

/// One decoding sequence: its query row's index in the flattened batch and its context's cache slots.
pub struct DecodeQuery<'a> {
    pub token: usize,
    pub slots: &'a [u32],
}

/// Shape of the heads: `heads` query heads share `kv_heads` key/value heads (`heads / kv_heads` each,
/// adjacent, as HF's `repeat_kv`).
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `[decodes.len(), heads × head_dim]` attention outputs, or `None` when a tensor is not an f32 CPU
/// tensor laid out contiguously (the caller then takes the reference path).
pub fn decode_attention_in_place(
    queries: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    decodes: &[DecodeQuery<'_>],
    shape: Heads,
    scale: f32,
) -> candle_core::Result<Option<Vec<f32>>> {
    if !cpu_kernels_enabled() {
        return Ok(None);
    }
    in_place(queries, key_cache, value_cache, decodes, shape, scale)
}

/// The path itself, whatever `cpu_kernels_enabled` says (its tests call it directly).
fn in_place(
    queries: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    decodes: &[DecodeQuery<'_>],
    shape: Heads,
    scale: f32,
) -> candle_core::Result<Option<Vec<f32>>> {
    with_f32_slices([queries, key_cache, value_cache], |q, keys, values| {
        let Heads {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let row = kv_heads * d;
        let groups = heads / kv_heads;
        let slots_in_pool = keys.len() / row;
        for decode in decodes {
            if decode.slots.is_empty() {
                candle_core::bail!("a decode query with no context");
            }
            if let Some(&bad) = decode.slots.iter().find(|&&s| s as usize >= slots_in_pool) {
                candle_core::bail!("cache slot {bad} is outside the pool of {slots_in_pool} slots");
            }
        }
        let mut out = vec![0f32; decodes.len() * heads * d];
        // One task per (sequence, block of kv heads): it reads each cached row's block once, in slot
        // order, for all the block's query heads. (One kv head per task read 256 of every 4096 bytes of a
        // row, sixteen times over: at 16 sequences the rows fell out of L2 between heads.) Small batches
        // split the heads so both threads have work.
        let threads = rayon::current_num_threads();
        let splits = [1, 2, 4, 8].into_iter().filter(|s| kv_heads % s == 0);
        let split = splits
            .clone()
            .find(|s| decodes.len() * s >= 2 * threads)
            .or(splits.clone().next_back())
            .unwrap_or(1);
        let block = kv_heads / split;
        let avx2 = has_avx2_fma() && d % 8 == 0;
        out.par_chunks_mut(block * groups * d)
            .enumerate()
            .for_each_init(Vec::new, |scores, (task, out)| {
                let (decode, first_kv) = (&decodes[task / split], (task % split) * block);
                let q_row = &q[decode.token * heads * d..][..heads * d];
                let task = Task {
                    q_block: &q_row[first_kv * groups * d..][..block * groups * d],
                    keys,
                    values,
                    slots: decode.slots,
                    row,
                    column: first_kv * d,
                    kv_block: block,
                    groups,
                    d,
                    scale,
                };
                if avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (checked at run time above) and `d` is a
                    // multiple of 8.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        attend_avx2(&task, scores, out)
                    };
                } else {
                    attend(&task, scores, out, dot::<f32>, axpy);
                }
            });
        Ok(out)
    })
}

/// One (sequence, block of kv heads): its query heads, where its context lies in the pool.
struct Task<'a> {
    /// The block's query heads, `kv_block × groups` of `d`.
    q_block: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    slots: &'a [u32],
    row: usize,
    /// Offset of the block's first kv head in a cache row.
    column: usize,
    kv_block: usize,
    groups: usize,
    d: usize,
    scale: f32,
}

/// `attend` with eight-lane fused multiply-adds (Rust never contracts `a * b + c` by itself).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(task: &Task<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let dot8 = |a: &[f32], b: &[f32]| -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(x.as_ptr()),
                _mm256_loadu_ps(y.as_ptr()),
                acc,
            );
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum()
    };
    let axpy8 = |alpha: f32, x: &[f32], y: &mut [f32]| {
        let a = _mm256_set1_ps(alpha);
        for (x, y) in x.chunks_exact(8).zip(y.chunks_exact_mut(8)) {
            let acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr()));
            _mm256_storeu_ps(y.as_mut_ptr(), acc);
        }
    };
    attend(task, scores, out, dot8, axpy8)
}

/// Scores of every (query head, slot) in slot order, a softmax per head, then the probability-
/// weighted value rows, again in slot order. `scores` is `[heads of the block][slots]`.
#[inline(always)]
fn attend(
    task: &Task<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(f32, &[f32], &mut [f32]),
) {
    let (d, ctx) = (task.d, task.slots.len());
    let width = task.kv_block * task.d;
    let heads = task.kv_block * task.groups;
    scores.clear();
    scores.resize(heads * ctx, 0.0);
    for (j, &s) in task.slots.iter().enumerate() {
        let keys = &task.keys[s as usize * task.row + task.column..][..width];
        for h in 0..heads {
            let q = &task.q_block[h * d..][..d];
            scores[h * ctx + j] = dot(q, &keys[h / task.groups * d..][..d]) * task.scale;
        }
    }
    for probs in scores.chunks_exact_mut(ctx) {
        softmax_in_place(probs);
    }
    for (j, &s) in task.slots.iter().enumerate() {
        let values = &task.values[s as usize * task.row + task.column..][..width];
        for h in 0..heads {
            let p = scores[h * ctx + j];
            axpy(
                p,
                &values[h / task.groups * d..][..d],
                &mut out[h * d..][..d],
            );
        }
    }
}

fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Attention written out from its definition, in f64, for one query head.
    fn by_definition(q: &[f32], ks: &[&[f32]], vs: &[&[f32]], scale: f64) -> Vec<f64> {
        let scores: Vec<f64> = ks
            .iter()
            .map(|k| {
                q.iter()
                    .zip(*k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut out = vec![0f64; q.len()];
        for (wi, v) in w.iter().zip(vs) {
            for (o, x) in out.iter_mut().zip(*v) {
                *o += wi / total * *x as f64;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // Deterministic, spread over [-2, 2], no two neighbours alike.
        (0..n)
            .map(|i| 2.0 * ((i as f32 * 0.754_877 + seed as f32 * 1.3).sin()))
            .collect()
    }

    #[test]
    fn matches_the_definition_through_scattered_slots_with_grouped_heads() {
        let (heads, kv_heads, d) = (4, 2, 12); // d not a multiple of 8: the dot's tail is used
        let row = kv_heads * d;
        let pool_slots = 40;
        let dev = Device::Cpu;
        let keys = values(pool_slots * row, 1);
        let vals = values(pool_slots * row, 2);
        let qs = values(3 * heads * d, 3);
        // Token 1 is a prefill token the caller handles elsewhere: only tokens 0 and 2 decode here.
        let slots_a: Vec<u32> = vec![7, 3, 30, 31, 0];
        let slots_b: Vec<u32> = vec![12];
        let decodes = [
            DecodeQuery {
                token: 0,
                slots: &slots_a,
            },
            DecodeQuery {
                token: 2,
                slots: &slots_b,
            },
        ];
        let shape = Heads {
            heads,
            kv_heads,
            head_dim: d,
        };
        let scale = 0.3f32;
        let out = in_place(
            &Tensor::from_vec(qs.clone(), (3, heads, d), &dev).unwrap(),
            &Tensor::from_vec(keys.clone(), (pool_slots, row), &dev).unwrap(),
            &Tensor::from_vec(vals.clone(), (pool_slots, row), &dev).unwrap(),
            &decodes,
            shape,
            scale,
        )
        .unwrap()
        .expect("f32 CPU tensors take the in-place path");
        for (i, decode) in decodes.iter().enumerate() {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let cell = |data: &[f32], s: u32| data[s as usize * row + kvh * d..][..d].to_vec();
                let ks: Vec<Vec<f32>> = decode.slots.iter().map(|&s| cell(&keys, s)).collect();
                let vs: Vec<Vec<f32>> = decode.slots.iter().map(|&s| cell(&vals, s)).collect();
                let q = &qs[(decode.token * heads + h) * d..][..d];
                let want = by_definition(
                    q,
                    &ks.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    &vs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    scale as f64,
                );
                let got = &out[(i * heads + h) * d..][..d];
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-5, "head {h}: {g} vs {w}");
                }
            }
        }
        // A single key: the output is that key's value row exactly.
        let only = &out[heads * d..][..d];
        assert_eq!(only, &vals[12 * row..][..d]);
    }

    #[test]
    fn refuses_other_dtypes_and_slots_outside_the_pool() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 8), candle_core::DType::F16, &dev).unwrap();
        let cache = Tensor::zeros((4, 16), candle_core::DType::F16, &dev).unwrap();
        let shape = Heads {
            heads: 2,
            kv_heads: 2,
            head_dim: 8,
        };
        let decode = [DecodeQuery {
            token: 0,
            slots: &[0],
        }];
        let r = in_place(&q, &cache, &cache, &decode, shape, 1.0).unwrap();
        assert!(r.is_none(), "f16 tensors take the reference path");
        let q = q.to_dtype(candle_core::DType::F32).unwrap();
        let cache = cache.to_dtype(candle_core::DType::F32).unwrap();
        let outside = [DecodeQuery {
            token: 0,
            slots: &[4],
        }];
        assert!(in_place(&q, &cache, &cache, &outside, shape, 1.0).is_err());
    }
}
