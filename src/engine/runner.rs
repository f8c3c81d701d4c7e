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
use crate::scheduler::{ScheduledSeq, SeqId, SeqImage};
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

    /// With capacity 0 nothing is kept (`--image-cache-size 0`).
    fn insert(&mut self, hash: [u8; 32], features: Tensor) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        self.entries.insert(hash, (features, self.clock));
        while self.entries.len() > self.capacity {
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
    /// Features of images encoded for a sequence whose prefill has not yet passed them, by
    /// (sequence, image index).
    pending: HashMap<(SeqId, usize), Tensor>,
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
            pending: HashMap::new(),
            fixed_decode,
            fixed_step_failures: 0,
        })
    }

    /// The features of every image overlapping a scheduled range, per entry and image. Exactly the
    /// images the scheduler handed to the encoder (`encode_images`, counted against its budget) are
    /// encoded, in one batch, unless the content cache has them; their features are then held for
    /// the sequence until its prefill has passed the image, so a later chunk never re-encodes one
    /// (the content cache may have evicted it by then).
    fn image_features(
        &mut self,
        batch: &[BatchEntry<'_>],
        stats: &mut StepImageStats,
    ) -> Result<Vec<Vec<Option<Tensor>>>, ModelError> {
        let mut by_hash: HashMap<[u8; 32], Tensor> = HashMap::new();
        let mut to_encode: Vec<&ProcessedImage> = Vec::new();
        for entry in batch {
            for &i in &entry.scheduled.encode_images {
                let hash = entry.images[i].content_hash;
                if by_hash.contains_key(&hash) || to_encode.iter().any(|p| p.content_hash == hash) {
                    continue;
                }
                match self.image_cache.get(&hash) {
                    Some(features) => {
                        stats.cache_hits += 1;
                        by_hash.insert(hash, features);
                    }
                    None => to_encode.push(&entry.pixels[i]),
                }
            }
        }
        self.encode_into(&to_encode, &mut by_hash, stats)?;
        let mut out = Vec::with_capacity(batch.len());
        for entry in batch {
            let seq = entry.scheduled.seq_id;
            for &i in &entry.scheduled.encode_images {
                let features = by_hash[&entry.images[i].content_hash].clone();
                self.pending.insert((seq, i), features);
            }
            let (start, end) = range(entry.scheduled);
            let mut features = vec![None; entry.images.len()];
            for (i, img) in entry.images.iter().enumerate() {
                if !img.overlaps(start, end) {
                    continue;
                }
                let f = match self.pending.get(&(seq, i)) {
                    Some(f) => f.clone(),
                    // Not handed to the encoder by the scheduler, yet needed: encode it all the same
                    // (outside the budget) rather than fail the step, and say so.
                    None => {
                        tracing::warn!(seq, image = i, "an image the scheduler did not schedule for encoding is needed; encoding it");
                        let mut one = HashMap::new();
                        self.encode_into(&[&entry.pixels[i]], &mut one, stats)?;
                        one.remove(&img.content_hash).expect("just encoded")
                    }
                };
                if img.start + img.len <= end {
                    self.pending.remove(&(seq, i));
                } else {
                    self.pending.insert((seq, i), f.clone());
                }
                features[i] = Some(f);
            }
            out.push(features);
        }
        Ok(out)
    }

    /// Encodes `images` in one batch into `into` (by content hash) and the content cache.
    fn encode_into(
        &mut self,
        images: &[&ProcessedImage],
        into: &mut HashMap<[u8; 32], Tensor>,
        stats: &mut StepImageStats,
    ) -> Result<(), ModelError> {
        if images.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let owned: Vec<ProcessedImage> = images.iter().map(|p| (*p).clone()).collect();
        let features = encode_images(&self.model, &owned)?;
        for (img, f) in owned.iter().zip(features) {
            self.image_cache.insert(img.content_hash, f.clone());
            into.insert(img.content_hash, f);
        }
        stats.encoded += owned.len() as u64;
        stats.encode_micros += started.elapsed().as_micros() as u64;
        Ok(())
    }

    /// A sequence left the engine: drop the image features held for its prefill.
    pub fn forget(&mut self, seq: SeqId) {
        self.pending.retain(|&(s, _), _| s != seq);
    }

    /// Whether steps run on the CPU (their parallel ops on the rayon pool).
    pub fn on_cpu(&self) -> bool {
        self.model.device().is_cpu()
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
                .zip(&features[index])
                .filter_map(|(img, f)| {
                    let span = ImageSpan {
                        start: img.start,
                        len: img.len,
                    };
                    Some((span, f.clone()?))
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
