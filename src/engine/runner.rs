//! The model runner: turns a step of the scheduler into tensors (flattened token ids, positions, slot
//! mapping, block tables, sequence boundaries), encodes the images whose placeholders are scheduled
//! (through an embedding cache keyed by content hash), and runs one forward pass. It owns the model and
//! the KV cache; the scheduler never sees either.

use candle_core::Tensor;
use std::collections::HashMap;
use std::time::Instant;

use super::batch_sampler::{SamplePlan, StepLogits};
use super::fixed_decode::{DecodeGraphs, FixedDecode};
use super::inputs::{encode_images, image_rows_in_range};
use super::sampler::step_logprobs;
use crate::model::attention::SequenceStep;
use crate::model::sampling::sample_rows;
use crate::model::static_decode::DecodeRow;
use crate::model::{AttentionMetadata, ForwardInput, KvCache, LlavaModel, ModelError};
use crate::scheduler::{ScheduledSeq, SeqImage};
use crate::types::{ImageSpan, ProcessedImage, StepLogprobs};

/// One scheduled sequence with what the runner needs to read of it.
pub struct BatchEntry<'a> {
    pub scheduled: &'a ScheduledSeq,
    /// All of the sequence's tokens (prompt and generated).
    pub token_ids: &'a [u32],
    pub images: &'a [SeqImage],
    /// Pixel values of `images`, same order.
    pub pixels: &'a [ProcessedImage],
    pub num_prompt_tokens: usize,
    /// `Some(k)`: score the prompt tokens this step computes (see `SamplingParams::prompt_logprobs`).
    pub prompt_logprobs: Option<usize>,
}

/// Scores of the prompt tokens one sequence computed in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptScores {
    /// Index of the sequence in the step's batch.
    pub entry: usize,
    /// Position of the first scored token (the logits of position `first - 1` score it).
    pub first: usize,
    pub logprobs: Vec<StepLogprobs>,
}

/// Rows of prompt logits brought to the host at once: bounds the host copy of a long prompt.
const PROMPT_ROWS_PER_COPY: usize = 256;

/// What a step cost on the image side, for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepImageStats {
    pub encoded: u64,
    pub cache_hits: u64,
    pub encode_micros: u64,
}

/// Projected image features by content hash, least recently used evicted beyond `capacity`.
struct ImageEmbeddingCache {
    entries: HashMap<[u8; 32], (Tensor, u64)>,
    capacity: usize,
    clock: u64,
}

impl ImageEmbeddingCache {
    fn get(&mut self, hash: &[u8; 32]) -> Option<Tensor> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(hash).map(|(t, used)| {
            *used = clock;
            t.clone()
        })
    }

    fn insert(&mut self, hash: [u8; 32], features: Tensor) {
        self.clock += 1;
        self.entries.insert(hash, (features, self.clock));
        while self.entries.len() > self.capacity.max(1) {
            let oldest = *self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h)
                .expect("non-empty");
            self.entries.remove(&oldest);
        }
    }
}

pub struct ModelRunner {
    model: LlavaModel,
    kv_cache: KvCache,
    image_cache: ImageEmbeddingCache,
    /// Pure decode steps through fixed-shape buffers (CUDA graphs on a GPU); `None`: always eager.
    fixed_decode: Option<FixedDecode>,
    /// Fixed-shape steps that failed and ran eagerly instead (for rate-limited logging).
    fixed_step_failures: u64,
}

/// Output of a step, in batch order.
pub struct StepOutput {
    pub logits: StepLogits,
    pub images: StepImageStats,
    pub prepare_micros: u64,
    pub forward_micros: u64,
    /// The step ran through the fixed-shape decode buffers (a CUDA graph on a GPU).
    pub fixed_shape: bool,
    pub prompt_scores: Vec<PromptScores>,
}

impl ModelRunner {
    /// Captures the decode graphs `decode_graphs` asks for; must run on the thread that will step.
    pub fn new(
        model: LlavaModel,
        kv_cache: KvCache,
        image_cache_size: usize,
        decode_graphs: DecodeGraphs,
        max_num_seqs: usize,
    ) -> Result<Self, ModelError> {
        let fixed_decode = FixedDecode::new(decode_graphs, &model, &kv_cache, max_num_seqs)?;
        Ok(Self {
            model,
            kv_cache,
            image_cache: ImageEmbeddingCache {
                entries: HashMap::new(),
                capacity: image_cache_size,
                clock: 0,
            },
            fixed_decode,
            fixed_step_failures: 0,
        })
    }

    /// Features of every image overlapping a scheduled range, encoding the uncached ones in one batch.
    fn image_features(
        &mut self,
        batch: &[BatchEntry<'_>],
        stats: &mut StepImageStats,
    ) -> Result<HashMap<[u8; 32], Tensor>, ModelError> {
        let mut found = HashMap::new();
        let mut missing: Vec<&ProcessedImage> = Vec::new();
        for entry in batch {
            let (start, end) = range(entry.scheduled);
            for (img, pixels) in entry.images.iter().zip(entry.pixels) {
                if !img.overlaps(start, end) || found.contains_key(&img.content_hash) {
                    continue;
                }
                if missing.iter().any(|m| m.content_hash == img.content_hash) {
                    continue;
                }
                match self.image_cache.get(&img.content_hash) {
                    Some(features) => {
                        stats.cache_hits += 1;
                        found.insert(img.content_hash, features);
                    }
                    None => missing.push(pixels),
                }
            }
        }
        if !missing.is_empty() {
            let started = Instant::now();
            let owned: Vec<ProcessedImage> = missing.iter().map(|p| (*p).clone()).collect();
            let features = encode_images(&self.model, &owned)?;
            for (img, f) in owned.iter().zip(features) {
                self.image_cache.insert(img.content_hash, f.clone());
                found.insert(img.content_hash, f);
            }
            stats.encoded += owned.len() as u64;
            stats.encode_micros += started.elapsed().as_micros() as u64;
        }
        Ok(found)
    }

    /// `plan` says how the sampling rows (in batch order) get their tokens.
    pub fn execute(
        &mut self,
        batch: &[BatchEntry<'_>],
        plan: &SamplePlan,
    ) -> Result<StepOutput, ModelError> {
        let started = Instant::now();
        if let (Some(fixed), Some(rows)) = (&self.fixed_decode, decode_rows(batch)) {
            match fixed.execute(&rows, plan, &self.model, &self.kv_cache) {
                Ok(Some(logits)) => {
                    return Ok(StepOutput {
                        logits,
                        images: StepImageStats::default(),
                        prepare_micros: 0,
                        forward_micros: started.elapsed().as_micros() as u64,
                        fixed_shape: true,
                        prompt_scores: Vec::new(),
                    })
                }
                Ok(None) => {}
                // The eager path below recomputes the step (rewriting the same K/V slots).
                Err(e) => {
                    // Once, then every 1000th: a persistent failure would otherwise log every step.
                    self.fixed_step_failures += 1;
                    let n = self.fixed_step_failures;
                    if n == 1 || n.is_multiple_of(1000) {
                        tracing::warn!(error = %e, failures = n, "fixed-shape decode step failed; running it eagerly");
                    }
                }
            }
        }
        let mut images = StepImageStats::default();
        let features = self.image_features(batch, &mut images)?;
        let device = self.model.device().clone();

        let mut token_ids = Vec::new();
        let mut steps = Vec::with_capacity(batch.len());
        let mut feature_parts = Vec::new();
        let mut feature_rows = Vec::new();
        let mut logits_rows = Vec::new();
        // (entry, first scored position, batch row of the position before it, count)
        let mut prompt_rows: Vec<(usize, usize, u32, usize)> = Vec::new();
        for (index, entry) in batch.iter().enumerate() {
            let s = entry.scheduled;
            let (start, end) = range(s);
            let offset = token_ids.len();
            token_ids.extend_from_slice(&entry.token_ids[start..end]);
            steps.push(SequenceStep {
                num_cached: s.num_cached,
                num_new: s.num_new,
                block_table: &s.block_ids,
            });
            let (spans, feats): (Vec<ImageSpan>, Vec<Tensor>) = entry
                .images
                .iter()
                .filter(|img| img.overlaps(start, end))
                .map(|img| {
                    let span = ImageSpan {
                        start: img.start,
                        len: img.len,
                    };
                    (span, features[&img.content_hash].clone())
                })
                .unzip();
            if let Some((f, rows)) = image_rows_in_range(&spans, &feats, start, s.num_new, offset)?
            {
                feature_parts.push(f);
                feature_rows.extend(rows);
            }
            if s.sample {
                logits_rows.push(token_ids.len() as u32 - 1);
            }
            // Position p's logits score prompt token p + 1.
            let scored_end = end.min(entry.num_prompt_tokens.saturating_sub(1));
            if entry.prompt_logprobs.is_some() && start < scored_end {
                prompt_rows.push((index, start + 1, offset as u32, scored_end - start));
            }
        }
        let num_sampling = logits_rows.len();
        for &(_, _, row, count) in &prompt_rows {
            logits_rows.extend(row..row + count as u32);
        }
        let block_size = self.kv_cache.shape.block_size;
        let meta = AttentionMetadata::build_for(
            &steps,
            block_size,
            &device,
            self.model.uses_attention_kernels(),
        )?;
        let token_ids = Tensor::new(token_ids, &device)?;
        let image_rows = if feature_parts.is_empty() {
            None
        } else {
            Some((
                Tensor::cat(&feature_parts, 0)?,
                Tensor::new(feature_rows, &device)?,
            ))
        };
        let prepare_micros = started.elapsed().as_micros() as u64 - images.encode_micros;
        let forward_started = Instant::now();
        let mut prompt_scores = Vec::new();
        let logits = if logits_rows.is_empty() {
            // Only partial prefills this step: the K/V are what matters, no logits are wanted.
            let rows = Tensor::new(&[0u32], &device)?;
            self.forward(&token_ids, &image_rows, &meta, &rows)?;
            StepLogits::default()
        } else {
            let rows = Tensor::new(logits_rows, &device)?;
            let all = self.forward(&token_ids, &image_rows, &meta, &rows)?;
            let mut next_row = num_sampling;
            for &(entry, first, _, count) in &prompt_rows {
                let scored = all.narrow(0, next_row, count)?;
                next_row += count;
                prompt_scores.push(PromptScores {
                    entry,
                    first,
                    logprobs: score_prompt(&scored, &batch[entry], first)?,
                });
            }
            let logits = all.narrow(0, 0, num_sampling)?;
            let tokens = if !plan.has_device_rows() {
                Vec::new()
            } else if plan.all_greedy() && !device.is_cpu() {
                logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?
            } else {
                sample_rows(&logits, &plan.device)?
            };
            StepLogits {
                tokens,
                host: host_rows(&logits, &plan.host_rows)?,
            }
        };
        Ok(StepOutput {
            logits,
            images,
            prepare_micros,
            forward_micros: forward_started.elapsed().as_micros() as u64,
            fixed_shape: false,
            prompt_scores,
        })
    }

    fn forward(
        &self,
        token_ids: &Tensor,
        image_rows: &Option<(Tensor, Tensor)>,
        meta: &AttentionMetadata,
        logits_rows: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.model.forward(
            &ForwardInput {
                token_ids,
                image_rows: image_rows.as_ref().map(|(f, r)| (f, r)),
                attention: meta,
                logits_rows,
            },
            &self.kv_cache,
        )
    }
}

/// The step as decode rows when every sequence samples after exactly one new text token.
fn decode_rows<'a>(batch: &[BatchEntry<'a>]) -> Option<Vec<DecodeRow<'a>>> {
    batch
        .iter()
        .map(|entry| {
            let s = entry.scheduled;
            let (start, end) = range(s);
            let text = !entry.images.iter().any(|img| img.overlaps(start, end));
            (s.num_new == 1 && s.sample && text).then(|| DecodeRow {
                token: entry.token_ids[start],
                position: start,
                block_table: &s.block_ids,
            })
        })
        .collect()
}

/// Log-probabilities of the prompt tokens from `first` on, from the logits of the positions before
/// them (`[count, vocab]`), copied to the host a bounded number of rows at a time.
fn score_prompt(
    logits: &Tensor,
    entry: &BatchEntry<'_>,
    first: usize,
) -> Result<Vec<StepLogprobs>, ModelError> {
    let k = entry.prompt_logprobs.unwrap_or(0);
    let count = logits.dim(0)?;
    let mut scores = Vec::with_capacity(count);
    for chunk_start in (0..count).step_by(PROMPT_ROWS_PER_COPY) {
        let len = PROMPT_ROWS_PER_COPY.min(count - chunk_start);
        let rows = logits.narrow(0, chunk_start, len)?.to_vec2::<f32>()?;
        for (i, row) in rows.iter().enumerate() {
            let token = entry.token_ids[first + chunk_start + i];
            scores.push(step_logprobs(row, token, k));
        }
    }
    Ok(scores)
}

/// The rows of `[rows, vocab]` logits the host needs, copied alone.
pub fn host_rows(logits: &Tensor, rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if rows.len() == logits.dim(0)? {
        return Ok(logits.to_vec2::<f32>()?);
    }
    let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let index = Tensor::new(index, logits.device())?;
    Ok(logits.index_select(&index, 0)?.to_vec2::<f32>()?)
}

fn range(s: &ScheduledSeq) -> (usize, usize) {
    (s.num_cached, s.num_cached + s.num_new)
}
