//! Decode steps of a fixed shape, the precondition of replaying them as CUDA graphs.
//!
//! A graph records kernel pointers and launch grids once. So a step must read its inputs from memory
//! allocated once (`buffer`, overwritten in place by `upload`), run the same grids whatever the batch
//! holds (the batch is padded to `batch` rows, and decode attention is sized for the longest context
//! the model allows, not the longest one present), and keep padding harmless: padding rows write their
//! K/V into the cache's scratch block and attend to that one slot only. Without graphs the same step
//! runs eagerly, which is how the CPU tests check it against HF.

use candle_core::{DType, Device, Tensor};

use super::attention::{AttentionMetadata, KernelMetadata};
use super::kv_cache::KvCache;
use super::llava::LlavaModel;
use super::sampling::sampling_params;
use super::ModelError;

/// One real sequence of a decode step: its newest token and where its context lives.
#[derive(Debug, Clone, Copy)]
pub struct DecodeRow<'a> {
    pub token: u32,
    /// Position of `token`; the context after this step is `position + 1` tokens.
    pub position: usize,
    /// Physical block ids in logical order, covering at least `position + 1` slots.
    pub block_table: &'a [u32],
}

/// Inputs of one padded batch size, in one u32 buffer laid out as
/// `tokens | positions | slots | context lengths` (`batch` each), the sampling parameters
/// (`3 × batch`, as `sampling_params`), then `batch × max_blocks` block tables.
pub struct StaticDecode {
    batch: usize,
    /// Longest context a row may have (the rotary table's length).
    max_context: usize,
    max_blocks: usize,
    block_size: usize,
    scratch_block: u32,
    buffer: Tensor,
    tokens: Tensor,
    sampling: Tensor,
    meta: AttentionMetadata,
}

impl StaticDecode {
    /// Buffers for `batch` rows of contexts up to `max_context` tokens over `kv_cache`'s blocks.
    pub fn new(
        batch: usize,
        max_context: usize,
        kv_cache: &KvCache,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let block_size = kv_cache.shape.block_size;
        let max_blocks = max_context.div_ceil(block_size).max(1);
        let buffer = Tensor::zeros(batch * (7 + max_blocks), DType::U32, device)?;
        let part = |i: usize| buffer.narrow(0, i * batch, batch);
        let positions = part(1)?;
        let meta = AttentionMetadata {
            slot_mapping: part(2)?,
            sequences: Vec::new(),
            num_tokens: batch,
            kernel: Some(KernelMetadata {
                // Only prefill attention reads it; decode rows are their own sequences.
                token_seq: positions.clone(),
                context_lens: part(3)?,
                block_tables: buffer
                    .narrow(0, 7 * batch, batch * max_blocks)?
                    .reshape((batch, max_blocks))?,
                max_context: max_blocks * block_size,
                block_size,
                all_decode: true,
                prefill: llava_kernels::PrefillWork {
                    tiles: buffer.narrow(0, 0, 0)?,
                    singles: buffer.narrow(0, 0, 0)?,
                },
            }),
            positions,
        };
        Ok(Self {
            batch,
            max_context,
            max_blocks,
            block_size,
            scratch_block: kv_cache.shape.scratch_block(),
            tokens: part(0)?,
            sampling: buffer.narrow(0, 4 * batch, 3 * batch)?,
            buffer,
            meta,
        })
    }

    /// Padded batch size.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The buffer's host image for `rows`, padding rows after them; `sampling` holds (temperature,
    /// seed) per row, or is empty when the step's tokens are not drawn.
    pub fn pack(
        &self,
        rows: &[DecodeRow<'_>],
        sampling: &[(f32, u64)],
    ) -> Result<Vec<u32>, ModelError> {
        let (b, bs) = (self.batch, self.block_size);
        if rows.len() > b {
            return Err(ModelError::Config(format!(
                "{} sequences do not fit a decode step of {b}",
                rows.len()
            )));
        }
        let mut packed = vec![0u32; b * (7 + self.max_blocks)];
        let mut params = sampling.to_vec();
        params.resize(b, (0.0, 0));
        packed[4 * b..7 * b].copy_from_slice(&sampling_params(&params));
        for i in 0..b {
            let (token, position, table) = match rows.get(i) {
                Some(r) => (r.token, r.position, r.block_table),
                None => (0, 0, std::slice::from_ref(&self.scratch_block)),
            };
            let blocks = (position + 1).div_ceil(bs);
            if position >= self.max_context || blocks > self.max_blocks || blocks > table.len() {
                return Err(ModelError::Config(format!(
                    "a context of {} tokens needs {blocks} blocks: the step holds {} and the table {}",
                    position + 1,
                    self.max_blocks,
                    table.len()
                )));
            }
            packed[i] = token;
            packed[b + i] = position as u32;
            packed[2 * b + i] = table[position / bs] * bs as u32 + (position % bs) as u32;
            packed[3 * b + i] = position as u32 + 1;
            let row = 7 * b + i * self.max_blocks;
            packed[row..row + blocks].copy_from_slice(&table[..blocks]);
        }
        Ok(packed)
    }

    /// Writes the step's inputs into the buffers, in place.
    pub fn upload(
        &self,
        rows: &[DecodeRow<'_>],
        sampling: &[(f32, u64)],
    ) -> Result<(), ModelError> {
        Ok(llava_kernels::upload_u32(
            &self.buffer,
            &self.pack(rows, sampling)?,
        )?)
    }

    /// Runs the step on whatever was uploaded: f32 logits `[batch, vocab]`, their argmax and the tokens
    /// drawn with the uploaded sampling parameters (`[batch]` each).
    pub fn run(&self, model: &LlavaModel, kv_cache: &KvCache) -> Result<DecodeOutput, ModelError> {
        let logits = model.decode_logits(&self.tokens, &self.meta, kv_cache)?;
        let argmax = logits.argmax(candle_core::D::Minus1)?;
        let drawn = llava_kernels::sample_rows(&logits, &self.sampling)?;
        Ok(DecodeOutput {
            logits,
            argmax,
            drawn,
        })
    }
}

/// What a fixed-shape step leaves on the device; rows past the real ones are padding.
pub struct DecodeOutput {
    pub logits: Tensor,
    pub argmax: Tensor,
    pub drawn: Tensor,
}

impl DecodeOutput {
    pub fn argmax_rows(&self, rows: usize) -> Result<Vec<u32>, ModelError> {
        Ok(self.argmax.narrow(0, 0, rows)?.to_vec1::<u32>()?)
    }

    pub fn drawn_rows(&self, rows: usize) -> Result<Vec<u32>, ModelError> {
        Ok(self.drawn.narrow(0, 0, rows)?.to_vec1::<u32>()?)
    }
}

/// Padded batch sizes worth a buffer (and on CUDA a graph) each, up to `max_seqs`: fine steps where
/// padding would cost most relative to the batch, coarser ones above.
pub fn batch_sizes(max_seqs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
        .into_iter()
        .filter(|&s| s < max_seqs)
        .collect();
    sizes.push(max_seqs.min(256));
    sizes.dedup();
    sizes
}
