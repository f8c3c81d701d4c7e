//! Decode attention on the CPU that reads keys and values where they lie in the paged cache.
//!
//! The reference path (`attention::paged_attention`) gathers each sequence's whole context out of the
//! pool (`index_select`), transposes it and then multiplies: per layer and sequence that is two copies
//! of `context × kv_heads × head_dim` values before any arithmetic, and at 16 decoding sequences it was
//! most of a step's memory traffic (`memmove` in issue 14's profile). A decode query needs each cached
//! row once, so this path reads the rows in place through the slot list and does the same arithmetic:
//! scores `q·k × scale` in f32, softmax in f32 (max-subtracted, normalised before use, as softmax then
//! `probs @ V`), then the probability-weighted sum of the value rows. Only the order of additions
//! differs from the GEMM's (and, for a shared prefix below, the normalisation comes after the weighted
//! sums, when the parts merge), which the HF parity tests' tolerances cover.
//!
//! Sequences that share the first slots of their contexts (the prefix cache gives 16 streams on one
//! image the same ~600 cached tokens) read that shared part once for all of them: a first pass attends
//! each sequence over its own remaining slots, a second attends all the group's queries together over
//! the shared slots, and the two partial softmaxes are merged by their maxima and sums (the "cascade"
//! of FlashInfer). Per step this reads the shared keys and values once instead of once per sequence.
//!
//! f32 caches only (the CPU serves f32); other dtypes keep the reference path.

use candle_core::Tensor;
use rayon::prelude::*;

use super::cpu_kernels::{cpu_kernels_enabled, has_avx2_fma, with_f32_slices};
use super::cpu_math::{exp_shifted_in_place, softmax_in_place};
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

impl Heads {
    /// Values per cached row: every kv head's.
    fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Query heads per kv head.
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
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
        let (row, groups) = (shape.row(), shape.groups());
        let slots_in_pool = keys.len() / row;
        for decode in decodes {
            if decode.slots.is_empty() {
                candle_core::bail!("a decode query with no context");
            }
            if let Some(&bad) = decode.slots.iter().find(|&&s| s as usize >= slots_in_pool) {
                candle_core::bail!("cache slot {bad} is outside the pool of {slots_in_pool} slots");
            }
        }
        let kernel = Kernel {
            keys,
            values,
            shape,
            scale,
            avx2: has_avx2_fma() && d % 8 == 0,
        };
        let shared = shared_prefixes(decodes);
        let mut own_start = vec![0usize; decodes.len()];
        for group in &shared {
            for &member in &group.members {
                own_start[member] = group.len;
            }
        }
        let mut out = vec![0f32; decodes.len() * heads * d];
        // The softmax maxima and sums of the members' own parts, for the merge.
        let mut own_stats = vec![(0f32, 0f32); decodes.len() * heads];
        // One task per (sequence, block of kv heads): it reads each cached row's block once, in slot
        // order, for all the block's query heads. (One kv head per task read 256 of every 4096 bytes of a
        // row, sixteen times over: at 16 sequences the rows fell out of L2 between heads.) Small batches
        // split the heads so both threads have work.
        let block = kv_heads / head_split(kv_heads, decodes.len());
        out.par_chunks_mut(block * groups * d)
            .zip(own_stats.par_chunks_mut(block * groups))
            .enumerate()
            .for_each_init(Vec::new, |scores, (task, (out, stats))| {
                let split = kv_heads / block;
                let (i, first_kv) = (task / split, (task % split) * block);
                let q_row = &q[decodes[i].token * heads * d..][..heads * d];
                let part = Part {
                    queries: &q_row[first_kv * groups * d..][..block * groups * d],
                    slots: &decodes[i].slots[own_start[i]..],
                    column: first_kv * d,
                    kv_block: block,
                    normalize: own_start[i] == 0,
                };
                kernel.attend(&part, scores, out, stats);
            });
        for group in &shared {
            let queries: Vec<usize> = group.members.iter().map(|&m| decodes[m].token).collect();
            let slots = &decodes[group.members[0]].slots[..group.len];
            let parts = kernel.attend_together(q, &queries, slots);
            merge_into(&group.members, parts, &own_stats, shape, &mut out);
        }
        Ok(out)
    })
}

/// Fewest splits of the kv heads that give each thread at least two tasks among `sequences`.
fn head_split(kv_heads: usize, sequences: usize) -> usize {
    let threads = rayon::current_num_threads();
    let splits = [1, 2, 4, 8, 16]
        .into_iter()
        .filter(|s| kv_heads.is_multiple_of(*s));
    splits
        .clone()
        .find(|s| sequences * s >= 2 * threads)
        .or(splits.clone().next_back())
        .unwrap_or(1)
}

/// Shortest shared part worth a pass of its own: one cache block.
const MIN_SHARED_SLOTS: usize = 16;

/// Decoding sequences (indices into the batch) whose contexts all begin with the same `len` slots.
#[derive(Debug, PartialEq)]
struct SharedPrefix {
    members: Vec<usize>,
    len: usize,
}

/// Groups the sequences by their first slot; a group of two or more whose common prefix spans at
/// least `MIN_SHARED_SLOTS` is attended together over it. (Slots identify cached tokens: two sequences
/// can only hold the same slot through the prefix cache, which shares whole blocks from the start.)
fn shared_prefixes(decodes: &[DecodeQuery<'_>]) -> Vec<SharedPrefix> {
    let mut order: Vec<usize> = (0..decodes.len()).collect();
    order.sort_by_key(|&i| decodes[i].slots[0]);
    order
        .chunk_by(|&a, &b| decodes[a].slots[0] == decodes[b].slots[0])
        .filter(|run| run.len() >= 2)
        .filter_map(|run| {
            let first = decodes[run[0]].slots;
            let len = run[1..]
                .iter()
                .map(|&i| {
                    let other = decodes[i].slots;
                    first.iter().zip(other).take_while(|(a, b)| a == b).count()
                })
                .min()?;
            (len >= MIN_SHARED_SLOTS).then(|| SharedPrefix {
                members: run.to_vec(),
                len,
            })
        })
        .collect()
}

/// Merges the shared part's partial softmaxes (`parts`, one per block of kv heads, queries in
/// member-major order) with each member's own part (`out`, unnormalised, and `own_stats`):
/// `(O₁·e^(m₁−m) + O₂·e^(m₂−m)) / (l₁·e^(m₁−m) + l₂·e^(m₂−m))` with `m` the larger maximum.
fn merge_into(
    members: &[usize],
    parts: Vec<SharedPart>,
    own_stats: &[(f32, f32)],
    shape: Heads,
    out: &mut [f32],
) {
    let Heads {
        heads, head_dim: d, ..
    } = shape;
    let per_member = heads / parts.len();
    for (t, part) in parts.iter().enumerate() {
        let (shared_out, shared_stats) = (&part.out, &part.stats);
        for (k, &member) in members.iter().enumerate() {
            for j in 0..per_member {
                let (query, h) = (k * per_member + j, t * per_member + j);
                let ((m1, l1), (m2, l2)) = (shared_stats[query], own_stats[member * heads + h]);
                // An empty own part has (−inf, 0): its weight is e^(−inf) = 0.
                let top = m1.max(m2);
                let (a, b) = ((m1 - top).exp(), (m2 - top).exp());
                let inv = 1.0 / (l1 * a + l2 * b);
                let o1 = &shared_out[query * d..][..d];
                for (o, s) in out[(member * heads + h) * d..][..d].iter_mut().zip(o1) {
                    *o = (s * a + *o * b) * inv;
                }
            }
        }
    }
}

/// The shared pass's result for one block of kv heads: every member's query heads, member-major,
/// their unnormalised outputs and `(max, sum)`.
struct SharedPart {
    out: Vec<f32>,
    stats: Vec<(f32, f32)>,
}

/// What every task reads: the pool and the heads' shape.
struct Kernel<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    shape: Heads,
    scale: f32,
    avx2: bool,
}

/// One task's queries over some slots, for one block of kv heads.
struct Part<'a> {
    /// Query heads, `kv_block × groups` of `d` per sequence (several sequences one after another in
    /// the shared pass): query `i` reads kv head `(i / groups) % kv_block` of the block.
    queries: &'a [f32],
    slots: &'a [u32],
    /// Offset of the block's first kv head in a cache row.
    column: usize,
    kv_block: usize,
    /// A full softmax (the whole context), or the unnormalised part and its `(max, sum)` per query.
    normalize: bool,
}

impl Kernel<'_> {
    /// The group's queries (`tokens`) over its shared `slots`: per block of kv heads, the unnormalised
    /// outputs and `(max, sum)` of every member's query heads.
    fn attend_together(&self, q: &[f32], tokens: &[usize], slots: &[u32]) -> Vec<SharedPart> {
        let Heads {
            heads,
            kv_heads,
            head_dim: d,
        } = self.shape;
        let groups = self.shape.groups();
        let block = kv_heads / head_split(kv_heads, 1);
        (0..kv_heads / block)
            .into_par_iter()
            .map_init(Vec::new, |scores, t| {
                let per_member = block * groups * d;
                let mut queries = Vec::with_capacity(tokens.len() * per_member);
                for &token in tokens {
                    let first = (token * heads + t * block * groups) * d;
                    queries.extend_from_slice(&q[first..][..per_member]);
                }
                let mut out = vec![0f32; queries.len()];
                let mut stats = vec![(0f32, 0f32); queries.len() / d];
                let part = Part {
                    queries: &queries,
                    slots,
                    column: t * block * d,
                    kv_block: block,
                    normalize: false,
                };
                self.attend(&part, scores, &mut out, &mut stats);
                SharedPart { out, stats }
            })
            .collect()
    }

    fn attend(
        &self,
        part: &Part<'_>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        stats: &mut [(f32, f32)],
    ) {
        if self.avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time) and `d` is a multiple of 8.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                return attend_avx2(self, part, scores, out, stats);
            }
        }
        attend(
            self,
            part,
            scores,
            out,
            stats,
            scores_portable,
            weighted_values_portable,
        );
    }
}

/// `attend` with the eight-lane kernels of `avx2`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    kernel: &Kernel<'_>,
    part: &Part<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    stats: &mut [(f32, f32)],
) {
    attend(
        kernel,
        part,
        scores,
        out,
        stats,
        |k, p, s| unsafe { avx2::scores(k, p, s) },
        |k, p, s, o| unsafe { avx2::weighted_values(k, p, s, o) },
    )
}

/// Scores of every (query head, slot), a softmax per head (or its unnormalised part and `(max, sum)`
/// in `stats`), then the probability-weighted value rows. `scores` is `[query heads][slots]`.
#[inline(always)]
fn attend(
    kernel: &Kernel<'_>,
    part: &Part<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    stats: &mut [(f32, f32)],
    score: impl Fn(&Kernel<'_>, &Part<'_>, &mut [f32]),
    weigh: impl Fn(&Kernel<'_>, &Part<'_>, &[f32], &mut [f32]),
) {
    let ctx = part.slots.len();
    if ctx == 0 {
        // A member whose whole context is shared: its own part is empty.
        stats.fill((f32::NEG_INFINITY, 0.0));
        return;
    }
    scores.clear();
    scores.resize(part.queries.len() / kernel.shape.head_dim * ctx, 0.0);
    score(kernel, part, scores);
    for (probs, stat) in scores.chunks_exact_mut(ctx).zip(stats.iter_mut()) {
        match part.normalize {
            true => softmax_in_place(probs),
            false => *stat = exp_shifted_in_place(probs),
        }
    }
    weigh(kernel, part, scores, out);
}

impl Kernel<'_> {
    /// Offset of the part's query `i`'s kv head in the block's columns.
    #[inline(always)]
    fn kv_column(&self, part: &Part<'_>, i: usize) -> usize {
        (i / self.shape.groups()) % part.kv_block * self.shape.head_dim
    }
}

/// The portable scores: one dot product at a time, in slot order.
fn scores_portable(kernel: &Kernel<'_>, part: &Part<'_>, scores: &mut [f32]) {
    let (d, ctx) = (kernel.shape.head_dim, part.slots.len());
    let width = part.kv_block * d;
    for (j, &s) in part.slots.iter().enumerate() {
        let keys = &kernel.keys[s as usize * kernel.shape.row() + part.column..][..width];
        for (i, q) in part.queries.chunks_exact(d).enumerate() {
            let k = &keys[kernel.kv_column(part, i)..][..d];
            scores[i * ctx + j] = dot(q, k) * kernel.scale;
        }
    }
}

/// The portable weighted sum: value rows added into the outputs in slot order.
fn weighted_values_portable(kernel: &Kernel<'_>, part: &Part<'_>, probs: &[f32], out: &mut [f32]) {
    let (d, ctx) = (kernel.shape.head_dim, part.slots.len());
    let width = part.kv_block * d;
    for (j, &s) in part.slots.iter().enumerate() {
        let values = &kernel.values[s as usize * kernel.shape.row() + part.column..][..width];
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let v = &values[kernel.kv_column(part, i)..][..d];
            let p = probs[i * ctx + j];
            for (o, v) in o.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "decode_attention_avx2.rs"]
mod avx2;

#[cfg(test)]
#[path = "decode_attention_tests.rs"]
mod tests;
