//! One sequence straight through the model, no scheduler: chunked prefill over its own paged cache, then
//! one token at a time. The reference the batched engine is compared with, and the tests' direct way
//! to the model's logits.

use candle_core::Tensor;

use super::inputs::{encode_images, image_rows_in_range};
use crate::model::attention::SequenceStep;
use crate::model::{AttentionMetadata, ForwardInput, KvCache, LlavaModel, ModelError};
use crate::types::TokenizedPrompt;

/// A prompt's state in its own paged KV cache.
pub struct SequenceState<'m> {
    model: &'m LlavaModel,
    kv_cache: KvCache,
    block_table: Vec<u32>,
    block_size: usize,
    num_cached: usize,
    capacity: usize,
    /// Run the fused-kernel path (the default on a GPU that has it; forced in tests of its CPU side).
    pub kernel_path: bool,
}

impl<'m> SequenceState<'m> {
    /// A cache with room for `capacity` tokens. Blocks are handed out in reverse order so that logical
    /// and physical positions differ, as they will under the block manager.
    pub fn new(
        model: &'m LlavaModel,
        capacity: usize,
        block_size: usize,
    ) -> Result<Self, ModelError> {
        let num_blocks = capacity.div_ceil(block_size).max(1);
        Ok(Self {
            model,
            kv_cache: model.new_kv_cache(num_blocks, block_size)?,
            block_table: (0..num_blocks as u32).rev().collect(),
            block_size,
            num_cached: 0,
            capacity,
            kernel_path: model.uses_attention_kernels(),
        })
    }

    /// Runs `tokens` (positions `num_cached..`) with optional image rows; returns the last logits.
    fn step(
        &mut self,
        tokens: &[u32],
        image_rows: Option<(Tensor, Vec<u32>)>,
    ) -> Result<Vec<f32>, ModelError> {
        if self.num_cached + tokens.len() > self.capacity {
            return Err(ModelError::Config(format!(
                "sequence of {} tokens exceeds its cache of {}",
                self.num_cached + tokens.len(),
                self.capacity
            )));
        }
        let device = self.model.device();
        let meta = AttentionMetadata::build_for(
            &[SequenceStep {
                num_cached: self.num_cached,
                num_new: tokens.len(),
                block_table: &self.block_table,
            }],
            self.block_size,
            device,
            self.kernel_path,
        )?;
        let token_ids = Tensor::new(tokens, device)?;
        let logits_rows = Tensor::new(&[tokens.len() as u32 - 1], device)?;
        let image_rows = image_rows
            .map(|(f, rows)| Ok::<_, ModelError>((f, Tensor::new(rows, device)?)))
            .transpose()?;
        let logits = self.model.forward(
            &ForwardInput {
                token_ids: &token_ids,
                image_rows: image_rows.as_ref().map(|(f, r)| (f, r)),
                attention: &meta,
                logits_rows: &logits_rows,
            },
            &self.kv_cache,
        )?;
        self.num_cached += tokens.len();
        Ok(logits.squeeze(0)?.to_vec1()?)
    }

    /// Prefills the prompt in chunks of `chunk` tokens (images encoded once, rows split across chunks);
    /// returns the logits at the prompt's last position.
    pub fn prefill(
        &mut self,
        prompt: &TokenizedPrompt,
        chunk: Option<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let features = encode_images(self.model, &prompt.images)?;
        let total = prompt.token_ids.len();
        if total == 0 {
            return Err(ModelError::Config("empty prompt".into()));
        }
        let chunk = chunk.unwrap_or(total).max(1);
        let mut logits = Vec::new();
        let mut start = 0;
        while start < total {
            let len = chunk.min(total - start);
            let rows = image_rows_in_range(&prompt.image_spans, &features, start, len, 0)?;
            logits = self.step(&prompt.token_ids[start..start + len], rows)?;
            start += len;
        }
        Ok(logits)
    }

    /// Feeds one generated token; returns the logits for the next.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        self.step(&[token], None)
    }
}
