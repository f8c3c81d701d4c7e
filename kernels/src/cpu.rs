//! Reference implementations on f32 slices: the definitions the CUDA kernels are checked against.
//! `round` rounds an f32 to the storage dtype where the kernel stores an intermediate in it.

/// Returns (normed, summed), each `rows × dim`.
pub fn add_rms_norm(
    x: &[f32],
    residual: &[f32],
    weight: &[f32],
    dim: usize,
    eps: f32,
    round: fn(f32) -> f32,
) -> (Vec<f32>, Vec<f32>) {
    let summed: Vec<f32> = x.iter().zip(residual).map(|(a, b)| round(a + b)).collect();
    let mut normed = vec![0f32; summed.len()];
    for (row, out) in summed.chunks(dim).zip(normed.chunks_mut(dim)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
            *o = w * round(v * inv);
        }
    }
    (normed, summed)
}

pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// `x`: `[tokens, heads, dim]`; `table`: `[positions, dim]` holding cos then sin.
pub fn rotary(x: &[f32], table: &[f32], positions: &[u32], heads: usize, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut out = x.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        let row = &table[pos as usize * dim..(pos as usize + 1) * dim];
        for h in 0..heads {
            let base = (t * heads + h) * dim;
            for i in 0..half {
                let (a, b) = (x[base + i], x[base + half + i]);
                let (c, s) = (row[i], row[half + i]);
                out[base + i] = a * c - b * s;
                out[base + half + i] = b * c + a * s;
            }
        }
    }
    out
}

/// Uniform in (0, 1) from a row's seed and a vocabulary index (splitmix64 finaliser, top 23 bits: with
/// 24, `k + 0.5` would round the top value to exactly 1.0).
pub fn uniform(seed: u64, i: u32) -> f32 {
    let mut z = seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 41) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// Gumbel noise -ln(-ln u), the inner log as ln_1p(u - 1): exact near u = 1.
fn gumbel(u: f32) -> f32 {
    -(-(u - 1.0).ln_1p()).ln()
}

/// The argmax of `logits / temperature + Gumbel noise`: a draw from softmax(logits / temperature)
/// (the Gumbel-max trick); the plain argmax when `temperature` is 0. First maximum on ties.
pub fn gumbel_argmax(logits: &[f32], temperature: f32, seed: u64) -> u32 {
    if temperature <= 0.0 {
        return argmax_first(logits);
    }
    // The winner scores at least max(logits / T) + GUMBEL_FLOOR, and no token gains more than
    // GUMBEL_CEILING from its noise: a token whose scaled logit falls short of the best possible by
    // more than that cannot win, so its noise is never drawn. The result is the same token as
    // drawing every noise (f32 rounding is monotonic, and both bounds have slack); on real logits,
    // where most of the vocabulary sits tens of nats below the top, this skips most of the work.
    let top = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l / temperature));
    let floor = top + GUMBEL_FLOOR;
    let mut best = (f32::MIN, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        let scaled = l / temperature;
        if i > 0 && scaled + GUMBEL_CEILING < floor.max(best.0) {
            continue;
        }
        let score = scaled + gumbel(uniform(seed, i as u32));
        if score > best.0 || i == 0 {
            best = (score, i as u32);
        }
    }
    best.1
}

/// Bounds of `gumbel(uniform(..))`: u lies in [2^-24, 1 - 2^-24], so the noise lies in
/// [-2.812, 16.636]; the constants leave slack for the rounding of `ln`.
const GUMBEL_CEILING: f32 = 17.0;
const GUMBEL_FLOOR: f32 = -3.0;

/// Index of the largest value; the first one on ties (and index 0 when nothing compares larger).
fn argmax_first(logits: &[f32]) -> u32 {
    let mut best = (f32::MIN, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.0 || i == 0 {
            best = (l, i as u32);
        }
    }
    best.1
}

/// The cache and how positions map to its slots.
pub struct PagedCache<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub block_tables: &'a [u32],
    pub max_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
}

impl PagedCache<'_> {
    fn slot(&self, seq: usize, pos: usize) -> usize {
        self.block_tables[seq * self.max_blocks + pos / self.block_size] as usize * self.block_size
            + pos % self.block_size
    }
}

/// Query `t` (of sequence `seqs[t]`) attends to positions `0..ends[t]`. `q`: `[queries, heads, dim]`.
pub fn paged_attention(
    q: &[f32],
    cache: &PagedCache<'_>,
    seqs: &[u32],
    ends: &[u32],
    heads: usize,
    dim: usize,
    scale: f32,
) -> Vec<f32> {
    let group = heads / cache.kv_heads;
    let mut out = vec![0f32; q.len()];
    for (t, (&seq, &end)) in seqs.iter().zip(ends).enumerate() {
        for h in 0..heads {
            let kvh = h / group;
            let qrow = &q[(t * heads + h) * dim..(t * heads + h + 1) * dim];
            let rows: Vec<usize> = (0..end as usize)
                .map(|p| (cache.slot(seq as usize, p) * cache.kv_heads + kvh) * dim)
                .collect();
            let scores: Vec<f32> = rows
                .iter()
                .map(|&r| {
                    qrow.iter()
                        .zip(&cache.keys[r..r + dim])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            let o = &mut out[(t * heads + h) * dim..(t * heads + h + 1) * dim];
            for (w, &r) in weights.iter().zip(&rows) {
                for (od, v) in o.iter_mut().zip(&cache.values[r..r + dim]) {
                    *od += w / total * v;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The draw as it was before pruning: every token's noise drawn.
    fn gumbel_argmax_unpruned(logits: &[f32], temperature: f32, seed: u64) -> u32 {
        let mut best = (f32::MIN, 0u32);
        for (i, &l) in logits.iter().enumerate() {
            let score = l / temperature + super::gumbel(super::uniform(seed, i as u32));
            if score > best.0 || i == 0 {
                best = (score, i as u32);
            }
        }
        best.1
    }

    #[test]
    fn noise_bounds_hold_at_the_extreme_uniforms() {
        let (low, high) = (0.5f32 / 8_388_608.0, (8_388_607.0f32 + 0.5) / 8_388_608.0);
        assert!(super::gumbel(high) < super::GUMBEL_CEILING && super::gumbel(high) > 16.0);
        assert!(super::gumbel(low) > super::GUMBEL_FLOOR && super::gumbel(low) < -2.0);
    }

    #[test]
    fn pruned_draws_are_the_unpruned_draws() {
        // Logits spread as a language model's (a few tokens near the top, the rest far below),
        // flat ones where nothing is pruned, and ones with infinities and NaNs.
        let spread: Vec<f32> = (0..5000u32)
            .map(|i| 12.0 - 40.0 * super::uniform(99, i).powi(3))
            .collect();
        let flat: Vec<f32> = (0..300u32).map(|i| super::uniform(7, i)).collect();
        let mut odd = spread[..200].to_vec();
        odd[3] = f32::NAN;
        odd[50] = f32::NEG_INFINITY;
        let mut with_inf = odd.clone();
        with_inf[120] = f32::INFINITY;
        for logits in [&spread, &flat, &odd, &with_inf] {
            for temperature in [0.05f32, 0.7, 1.0, 3.0] {
                for seed in 0..200u64 {
                    let seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    assert_eq!(
                        super::gumbel_argmax(logits, temperature, seed),
                        gumbel_argmax_unpruned(logits, temperature, seed),
                        "T={temperature} seed={seed}"
                    );
                }
            }
        }
    }

    use super::*;

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        let (normed, summed) = add_rms_norm(&[1.0, 1.0], &[2.0, 2.0], &[0.5, 2.0], 2, 0.0, |v| v);
        assert_eq!(summed, vec![3.0, 3.0]);
        assert!((normed[0] - 0.5).abs() < 1e-6 && (normed[1] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn rotary_at_position_zero_is_identity() {
        let table = vec![1.0, 1.0, 0.0, 0.0];
        assert_eq!(
            rotary(&[1.0, 2.0, 3.0, 4.0], &table, &[0], 1, 4),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn gumbel_draws_follow_softmax_of_logits_over_temperature() {
        // softmax(ln[1, 2, 3, 4] / 0.5) = [1, 4, 9, 16] / 30.
        let logits: Vec<f32> = [1f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        let n = 40_000;
        let mut counts = [0usize; 4];
        for seed in 0..n {
            counts[gumbel_argmax(&logits, 0.5, seed * 0x9E37_79B9 + 7) as usize] += 1;
        }
        for (i, want) in [1.0, 4.0, 9.0, 16.0].iter().enumerate() {
            let frac = counts[i] as f64 / n as f64;
            assert!((frac - want / 30.0).abs() < 0.01, "{i}: {frac}");
        }
        assert_eq!(
            gumbel_argmax(&[0.0, 2.0, 2.0, 1.0], 0.0, 5),
            1,
            "argmax, first on ties"
        );
        // The extreme noise inputs stay finite: the top 23-bit value is just below 1.
        let top = (8_388_607f32 + 0.5) / 8_388_608.0;
        assert!(top < 1.0 && gumbel(top).is_finite() && gumbel(0.5 / 8_388_608.0).is_finite());
        let u: Vec<f32> = (0..100_000).map(|i| uniform(42, i)).collect();
        assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
    }

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let cache = PagedCache {
            keys: &[1.0, 0.0],
            values: &[5.0, 7.0],
            block_tables: &[0],
            max_blocks: 1,
            block_size: 1,
            kv_heads: 1,
        };
        let out = paged_attention(&[0.3, 0.4], &cache, &[0], &[1], 1, 2, 1.0);
        assert_eq!(out, vec![5.0, 7.0]);
    }
}
