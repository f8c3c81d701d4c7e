//! Attention over a paged KV cache for a flattened batch of variable-length sequences.
//!
//! `AttentionMetadata` is the explicit contract between the engine's runner and the model: where each
//! sequence's new tokens sit in the flattened batch, how long its context is, and which cache slots hold
//! it. `paged_attention` is the CPU reference path (HF's eager attention, softmax in f32); GPU kernels
//! plug in behind the same function and are checked against it. On f32 CPU caches its decode queries
//! read the cache in place (`decode_attention`), the same arithmetic without the gather.

use candle_core::{DType, Device, Tensor};

use super::cpu_attention::{paged_prefill, AttentionShape};
use super::decode_attention::{decode_attention_in_place, DecodeQuery, Heads};

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SequenceAttention {
    /// First of this sequence's new tokens in the flattened batch.
    pub query_start: usize,
    /// Number of new tokens this step.
    pub query_len: usize,
    /// Tokens whose K/V exist once this step has written its own: cached prefix + new tokens.
    pub context_len: usize,
    /// Cache slot of each of the `context_len` positions, in order. The CPU kernels read the cache
    /// through them; the reference path makes its gather index and causal mask from them and the
    /// lengths, only when it runs.
    slots: Vec<u32>,
}

impl SequenceAttention {
    /// The sequence as a decode query of the in-place path, when it decodes (one new token).
    pub fn as_decode(&self) -> Option<DecodeQuery<'_>> {
        (self.query_len == 1).then_some(DecodeQuery {
            token: self.query_start,
            slots: &self.slots,
        })
    }
}

/// Per-step attention inputs for all sequences of a flattened batch.
#[derive(Debug, Clone)]
pub struct AttentionMetadata {
    /// Position (within its own sequence) of every flattened token: drives the rotary embedding.
    pub positions: Tensor,
    /// Cache slot each new token's K/V is written to, `[num_tokens]` u32.
    pub slot_mapping: Tensor,
    pub sequences: Vec<SequenceAttention>,
    pub num_tokens: usize,
    /// What the GPU kernels read instead of the per-sequence tensors (set off the CPU).
    pub kernel: Option<KernelMetadata>,
}

/// Step metadata for the paged-attention kernels, views into one buffer copied in one transfer.
#[derive(Debug, Clone)]
pub struct KernelMetadata {
    /// Sequence index of every flattened token, `[num_tokens]` u32.
    pub token_seq: Tensor,
    /// `[seqs]` u32.
    pub context_lens: Tensor,
    /// `[seqs, max_blocks]` u32, padded with 0.
    pub block_tables: Tensor,
    pub max_context: usize,
    pub block_size: usize,
    /// Every sequence computes exactly one token (a pure decode step).
    pub all_decode: bool,
    /// How the prefill kernels split the batch (unused by pure decode steps).
    pub prefill: llava_kernels::PrefillWork,
}

/// What the runner knows of one sequence in a step, before it becomes tensors.
#[derive(Debug, Clone)]
pub struct SequenceStep<'a> {
    /// Tokens already in the cache before this step.
    pub num_cached: usize,
    /// New tokens computed this step.
    pub num_new: usize,
    /// Physical block ids, in logical order, covering at least `num_cached + num_new` positions.
    pub block_table: &'a [u32],
}

impl AttentionMetadata {
    /// Builds the metadata for sequences laid out one after another in the flattened batch, for the
    /// reference attention path: each sequence gets its context slots and causal mask.
    pub fn build(
        steps: &[SequenceStep<'_>],
        block_size: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Self::build_for(steps, block_size, device, false)
    }

    /// With `kernels`, everything the GPU kernels need goes to the device in one copy instead.
    pub fn build_for(
        steps: &[SequenceStep<'_>],
        block_size: usize,
        device: &Device,
        kernels: bool,
    ) -> candle_core::Result<Self> {
        let mut positions = Vec::new();
        let mut slot_mapping = Vec::new();
        let mut token_seq = Vec::new();
        let mut spans = Vec::with_capacity(steps.len());
        for (index, step) in steps.iter().enumerate() {
            let context_len = step.num_cached + step.num_new;
            if step.block_table.len() * block_size < context_len {
                candle_core::bail!(
                    "block table of {} blocks cannot hold {context_len} tokens",
                    step.block_table.len()
                );
            }
            spans.push((positions.len(), context_len));
            for pos in step.num_cached..context_len {
                positions.push(pos as u32);
                slot_mapping.push(slot_of(step.block_table, block_size, pos));
                token_seq.push(index as u32);
            }
        }
        let num_tokens = positions.len();
        if !kernels {
            let sequences = steps
                .iter()
                .zip(&spans)
                .map(|(step, &(query_start, context_len))| SequenceAttention {
                    query_start,
                    query_len: step.num_new,
                    context_len,
                    slots: (0..context_len)
                        .map(|p| slot_of(step.block_table, block_size, p))
                        .collect(),
                })
                .collect();
            return Ok(Self {
                positions: Tensor::new(positions, device)?,
                slot_mapping: Tensor::new(slot_mapping, device)?,
                sequences,
                num_tokens,
                kernel: None,
            });
        }
        // One host buffer, one transfer:
        // positions | slots | token_seq | context_lens | block tables | prefill tiles | single queries.
        let seqs = steps.len();
        let query_lens: Vec<usize> = steps.iter().map(|s| s.num_new).collect();
        let (tiles, singles) = llava_kernels::prefill_work(&query_lens);
        let max_blocks = steps
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let context_lens: Vec<u32> = spans.iter().map(|&(_, c)| c as u32).collect();
        let mut packed = Vec::with_capacity(
            3 * num_tokens + seqs * (1 + max_blocks) + tiles.len() + singles.len(),
        );
        packed.extend(&positions);
        packed.extend(&slot_mapping);
        packed.extend(&token_seq);
        packed.extend(&context_lens);
        for step in steps {
            packed.extend(step.block_table);
            packed.extend(std::iter::repeat_n(0, max_blocks - step.block_table.len()));
        }
        packed.extend(&tiles);
        packed.extend(&singles);
        let all = Tensor::new(packed, device)?;
        let t = num_tokens;
        let work_at = 3 * t + seqs * (1 + max_blocks);
        Ok(Self {
            positions: all.narrow(0, 0, t)?,
            slot_mapping: all.narrow(0, t, t)?,
            sequences: Vec::new(),
            num_tokens,
            kernel: Some(KernelMetadata {
                token_seq: all.narrow(0, 2 * t, t)?,
                context_lens: all.narrow(0, 3 * t, seqs)?,
                block_tables: all
                    .narrow(0, 3 * t + seqs, seqs * max_blocks)?
                    .reshape((seqs, max_blocks))?,
                max_context: context_lens.iter().copied().max().unwrap_or(0) as usize,
                block_size,
                all_decode: steps.iter().all(|s| s.num_new == 1),
                prefill: llava_kernels::PrefillWork {
                    tiles: all.narrow(0, work_at, tiles.len())?,
                    singles: all.narrow(0, work_at + tiles.len(), singles.len())?,
                },
            }),
        })
    }
}

fn slot_of(table: &[u32], block_size: usize, pos: usize) -> u32 {
    table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}

/// Query `i` sits at position `num_cached + i` and sees keys `0..=num_cached + i`.
fn causal_mask(num_cached: usize, num_new: usize, device: &Device) -> candle_core::Result<Tensor> {
    let context = num_cached + num_new;
    let mask: Vec<f32> = (0..num_new)
        .flat_map(|i| {
            (0..context).map(move |j| {
                if j <= num_cached + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (num_new, context), device)
}

/// Writes this step's keys and values (`[num_tokens, kv_heads, head_dim]`) into their cache slots.
pub fn write_kv(
    key_cache: &Tensor,
    value_cache: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    slot_mapping: &Tensor,
) -> candle_core::Result<()> {
    let (num_tokens, row) = (keys.dim(0)?, key_cache.dim(1)?);
    let index = slot_mapping
        .reshape((num_tokens, 1))?
        .broadcast_as((num_tokens, row))?
        .contiguous()?;
    key_cache.scatter_set(&index, &keys.reshape((num_tokens, row))?, 0)?;
    value_cache.scatter_set(&index, &values.reshape((num_tokens, row))?, 0)?;
    Ok(())
}

/// Causal attention of every sequence's new queries over its cached context (CPU reference path).
///
/// `queries` is `[num_tokens, heads, head_dim]`; the result is `[num_tokens, heads * head_dim]`.
/// Grouped-query attention: query head `h` reads kv head `h / (heads / kv_heads)`, as HF's `repeat_kv`.
pub fn paged_attention(
    queries: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    num_kv_heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (_, heads, head_dim) = queries.dims3()?;
    let groups = heads / num_kv_heads;
    // Decoding sequences read their context in place (f32 CPU caches); the rest gather it below.
    let decodes: Vec<DecodeQuery<'_>> = meta
        .sequences
        .iter()
        .filter_map(SequenceAttention::as_decode)
        .collect();
    let shape = Heads {
        heads,
        kv_heads: num_kv_heads,
        head_dim,
    };
    let in_place = match decodes.is_empty() {
        true => None,
        false => decode_attention_in_place(
            queries,
            key_cache,
            value_cache,
            &decodes,
            shape,
            scale as f32,
        )?
        .map(|rows| Tensor::from_vec(rows, (decodes.len(), heads * head_dim), queries.device()))
        .transpose()?,
    };
    if let Some(rows) = &in_place {
        if decodes.len() == meta.sequences.len() {
            return Ok(rows.clone());
        }
    }
    let mut next_decode = 0;
    let mut outputs = Vec::with_capacity(meta.sequences.len());
    for seq in &meta.sequences {
        if let (Some(rows), 1) = (&in_place, seq.query_len) {
            outputs.push(rows.narrow(0, next_decode, 1)?);
            next_decode += 1;
            continue;
        }
        let q_len = seq.query_len;
        let ctx = seq.context_len;
        let prefill_shape = AttentionShape {
            heads,
            kv_heads: num_kv_heads,
            head_dim,
            causal_offset: Some(ctx - q_len),
            scale: scale as f32,
        };
        if let Some(out) = paged_prefill(
            queries,
            key_cache,
            value_cache,
            seq.query_start,
            q_len,
            &seq.slots,
            prefill_shape,
        )? {
            outputs.push(out);
            continue;
        }
        // [q_len, heads, d] -> [kv_heads, groups * q_len, d]: heads sharing a kv head are adjacent.
        let q = queries
            .narrow(0, seq.query_start, q_len)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((num_kv_heads, groups * q_len, head_dim))?;
        let context_slots = Tensor::new(seq.slots.as_slice(), queries.device())?;
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&context_slots, 0)?
                .reshape((ctx, num_kv_heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let k = gather(key_cache)?;
        let v = gather(value_cache)?;
        let scores = (q.matmul(&k.t()?)? * scale)?
            .to_dtype(DType::F32)?
            .reshape((heads, q_len, ctx))?;
        let scores = match q_len {
            1 => scores,
            _ => scores.broadcast_add(&causal_mask(ctx - q_len, q_len, queries.device())?)?,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(queries.dtype())?
            .reshape((num_kv_heads, groups * q_len, ctx))?;
        let out = probs
            .matmul(&v)?
            .reshape((heads, q_len, head_dim))?
            .transpose(0, 1)?
            .reshape((q_len, heads * head_dim))?;
        outputs.push(out);
    }
    Tensor::cat(&outputs, 0)
}

/// Plain bidirectional multi-head attention for the vision tower: `[batch, heads, tokens, d]` inputs.
pub fn full_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    // The fused, parallel softmax: the composed one made five passes (and allocations) over the
    // `heads × tokens²` scores and was most of CLIP's time on the CPU.
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
    probs.matmul(v)
}
