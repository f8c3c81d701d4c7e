//! Causal attention over the paged KV cache: prefill (tiles of queries, lone queries) and decode
//! (partitioned contexts), with the host-side plans of how the kernels split a batch.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{f32s, storage, u32s};
use crate::cpu;

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
