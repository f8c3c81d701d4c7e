//! The engine's async edge: `start` sizes the KV pool and spawns the core thread; `submit` checks a
//! request against the engine's limits and returns a stream of its token events. Dropping the stream
//! aborts the request in any state and frees its blocks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::core::{Command, EngineCore, RequestId, Submission};
use super::fixed_decode::DecodeGraphs;
use super::metrics::{EngineMetrics, MetricsSnapshot};
use super::runner::ModelRunner;
use super::EngineError;
use crate::model::{LlavaModel, ModelError};
use crate::scheduler::{BlockPool, Scheduler, SchedulerConfig};
use crate::types::{ContextLimit, SamplingParams, TokenEvent, TokenizedPrompt};

/// Engine limits and sizes (the CLI's `--max-num-batched-tokens` and friends).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// Image feature tokens encoded per step; at least one image's worth is always allowed.
    pub max_num_encoder_tokens: usize,
    pub block_size: usize,
    /// Size of the KV pool in blocks; when `None`, `gpu_memory_utilization` (on a GPU) or else
    /// `kv_cache_memory` bytes decide it.
    pub num_kv_blocks: Option<usize>,
    pub kv_cache_memory: usize,
    /// Caps the context below the model's positions and the KV cache (vLLM's `--max-model-len`).
    pub max_model_len: Option<usize>,
    /// On a GPU: the share of its memory this process may fill (weights, activations and the KV
    /// cache, which gets what is left), as vLLM's flag. `None`: `kv_cache_memory` decides.
    pub gpu_memory_utilization: Option<f64>,
    /// Projected image features kept by content hash.
    pub image_cache_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Whether pure decode steps replay CUDA graphs.
    pub decode_graphs: DecodeGraphs,
    /// Tests only: makes chosen steps fail as a fault inside the model would.
    pub fault_hook: Option<StepFaultHook>,
}

/// Called at the start of every engine step with the sampling parameters of each request in it; a step
/// for which it returns true panics inside the step, as a fault in the model or sampler would. The
/// supervised step loop must then fail that step's requests and nothing else.
#[derive(Clone)]
pub struct StepFaultHook(pub Arc<StepFaultFn>);

pub type StepFaultFn = dyn Fn(&[&SamplingParams]) -> bool + Send + Sync;

impl std::fmt::Debug for StepFaultHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepFaultHook")
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            max_num_encoder_tokens: 2048,
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_memory: 1 << 30,
            max_model_len: None,
            gpu_memory_utilization: None,
            image_cache_size: 64,
            eos_token_ids: vec![2],
            decode_graphs: DecodeGraphs::Auto,
            fault_hook: None,
        }
    }
}

/// What `submit` checks a request against.
#[derive(Debug, Clone)]
struct Limits {
    context: ContextLimit,
    max_encoder_tokens: usize,
}

/// Cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Arc<Mutex<Option<Sender<Command>>>>,
    next_id: Arc<AtomicU64>,
    accepting: Arc<AtomicBool>,
    /// Set by the core when it stopped because it could not go on (`EngineCore::run`).
    failed: Arc<AtomicBool>,
    metrics: Arc<EngineMetrics>,
    limits: Limits,
}

/// Token events of one request; the stream ends after the event that carries `usage`.
pub struct RequestStream {
    id: RequestId,
    events: UnboundedReceiver<Result<TokenEvent, EngineError>>,
    commands: Sender<Command>,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<Result<TokenEvent, EngineError>> {
        self.events.recv().await
    }

    /// Stops choice `index` (a stop string ended it) while its siblings go on; events of it that were
    /// already on their way may still arrive.
    pub fn stop_choice(&self, index: usize) {
        let _ = self.commands.send(Command::StopChoice(self.id, index));
    }

    /// For synchronous callers (the CLI, tests); must not be called from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Result<TokenEvent, EngineError>> {
        self.events.blocking_recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        // After the last event the engine has already forgotten the request: the abort is a no-op.
        let _ = self.commands.send(Command::Abort(self.id));
    }
}

/// Sizes the pool, moves the model onto the core thread and starts it.
pub fn start(model: LlavaModel, config: EngineConfig) -> Result<EngineHandle, ModelError> {
    if config.block_size == 0 || config.max_num_batched_tokens == 0 || config.max_num_seqs == 0 {
        return Err(ModelError::Config(
            "block size, max batched tokens and max sequences must be positive".into(),
        ));
    }
    let shape = model.kv_cache_shape(1, config.block_size);
    let per_block = shape.bytes_per_token(model.dtype()) * config.block_size;
    // Frees of the loading stream (e.g. the unmerged projections) count as used until it syncs.
    model.device().synchronize()?;
    let num_blocks = match (config.num_kv_blocks, config.gpu_memory_utilization) {
        (Some(blocks), _) => blocks,
        (None, Some(share)) => match model.device_memory()? {
            Some(memory) => {
                let reserve = activation_reserve(&model, &config);
                let bytes = kv_budget(memory, share, reserve);
                tracing::info!(
                    free_mib = memory.free >> 20,
                    total_mib = memory.total >> 20,
                    reserve_mib = reserve >> 20,
                    kv_mib = bytes >> 20,
                    "KV cache sized from the GPU's memory"
                );
                if bytes < per_block {
                    return Err(ModelError::Config(format!(
                        "--gpu-memory-utilization {share} leaves no room for the KV cache: of {} MiB, \
                         {} MiB are in use and {} MiB are kept for activations",
                        memory.total >> 20,
                        (memory.total - memory.free) >> 20,
                        reserve >> 20
                    )));
                }
                bytes / per_block
            }
            None => config.kv_cache_memory / per_block.max(1),
        },
        (None, None) => config.kv_cache_memory / per_block.max(1),
    };
    if num_blocks == 0 {
        return Err(ModelError::Config(format!(
            "the KV cache holds no block: one block needs {per_block} bytes"
        )));
    }
    // The budget must admit the largest image on its own.
    let max_encoder_tokens = config
        .max_num_encoder_tokens
        .max(model.config.image_tokens().most());
    let context = [
        Some(model.config.text.max_position_embeddings),
        Some(num_blocks * config.block_size),
        config.max_model_len,
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0);
    let limits = Limits {
        context: ContextLimit(context),
        max_encoder_tokens,
    };
    let kv_cache = model.new_kv_cache(num_blocks, config.block_size)?;
    tracing::info!(
        num_blocks,
        block_size = config.block_size,
        mib = (num_blocks * per_block) >> 20,
        "KV cache allocated"
    );
    let metrics = Arc::new(EngineMetrics::default());
    metrics.block_size.store(
        config.block_size as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    metrics
        .kv_blocks_total
        .store(num_blocks as u64, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let core_metrics = metrics.clone();
    let max_model_len = limits.context.0;
    // Weights and cache were written on this thread's stream; the engine thread steps on its own.
    model.device().synchronize()?;
    let (ready_tx, ready) = mpsc::sync_channel(1);
    let failed = Arc::new(AtomicBool::new(false));
    let core_failed = failed.clone();
    let fault_hook = config.fault_hook.clone();
    std::thread::Builder::new()
        .name("llava-engine".into())
        .spawn(move || {
            // The pool lives on this thread (its blocks are not Send), so it is made here.
            let scheduler = Scheduler::new(
                SchedulerConfig {
                    max_num_batched_tokens: config.max_num_batched_tokens,
                    max_num_seqs: config.max_num_seqs,
                    max_num_encoder_tokens: max_encoder_tokens,
                },
                BlockPool::new(num_blocks, config.block_size),
            );
            let runner = match ModelRunner::new(
                model,
                kv_cache,
                config.image_cache_size,
                config.decode_graphs,
                config.max_num_seqs,
            ) {
                Ok(runner) => runner,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut core = EngineCore::new(
                scheduler,
                runner,
                core_metrics,
                config.eos_token_ids,
                max_model_len,
            );
            core.fault_hook = fault_hook;
            let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.run(rx)));
            // A fault the step supervisor could not contain, or too many in a row: the engine is gone
            // and the server must say so (health 503, exit non-zero) so a supervisor restarts it.
            if !matches!(finished, Ok(super::core::Ended::Drained)) {
                tracing::error!("the engine stopped after a fault it could not recover from");
                core_failed.store(true, Ordering::Release);
            }
        })
        .map_err(|e| ModelError::Config(format!("cannot start the engine thread: {e}")))?;
    ready
        .recv()
        .map_err(|_| ModelError::Config("the engine thread ended while starting".into()))??;
    Ok(EngineHandle {
        commands: Arc::new(Mutex::new(Some(tx))),
        next_id: Arc::new(AtomicU64::new(0)),
        accepting: Arc::new(AtomicBool::new(true)),
        failed,
        metrics,
        limits,
    })
}

/// Bytes a step may need beside weights and KV cache: the activations of a full token budget (hidden
/// states and the merged MLP rows, twice over for temporaries), the logits of every sequence (f32 and
/// model dtype), room for the decode graphs' own copies of those, and 1 GiB for cuBLAS workspaces, the
/// vision tower and fragmentation.
fn activation_reserve(model: &LlavaModel, config: &EngineConfig) -> usize {
    let t = &model.config.text;
    let elem = model.dtype().size_in_bytes();
    let tokens = config.max_num_batched_tokens;
    let activations = tokens * (4 * t.hidden_size + 2 * t.intermediate_size) * elem * 2;
    let logits = config.max_num_seqs * t.vocab_size * (4 + elem) * 2;
    activations + logits + (1 << 30)
}

/// What the KV cache gets of a GPU: `share` of its memory, less what is already in use (weights,
/// other processes) and the activation reserve; 0 when nothing is left.
fn kv_budget(memory: crate::model::DeviceMemory, share: f64, reserve: usize) -> usize {
    let allowed = (memory.total as f64 * share.clamp(0.0, 1.0)) as usize;
    let used = memory.total.saturating_sub(memory.free);
    allowed.saturating_sub(used).saturating_sub(reserve)
}

impl EngineHandle {
    /// Queues a request; errors here are the client's (too long, too big for the pool, bad params).
    pub fn submit(
        &self,
        prompt: TokenizedPrompt,
        params: SamplingParams,
    ) -> Result<RequestStream, EngineError> {
        if self.has_failed() {
            return Err(EngineError::Stopped);
        }
        if !self.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        self.validate(&prompt, &params)?;
        let commands = self
            .commands
            .lock()
            .expect("not poisoned")
            .clone()
            .ok_or(EngineError::ShuttingDown)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = unbounded_channel();
        commands
            .send(Command::Submit(Box::new(Submission {
                id,
                prompt,
                params,
                events: events_tx,
            })))
            .map_err(|_| EngineError::Stopped)?;
        Ok(RequestStream {
            id,
            events,
            commands,
        })
    }

    fn validate(
        &self,
        prompt: &TokenizedPrompt,
        params: &SamplingParams,
    ) -> Result<(), EngineError> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        let len = prompt.token_ids.len();
        if len == 0 {
            return invalid("the prompt is empty".into());
        }
        if params.n == 0 || (params.max_tokens == 0 && params.prompt_logprobs.is_none()) {
            return invalid(
                "n, and max_tokens unless the prompt is scored, must be at least 1".into(),
            );
        }
        if prompt.images.len() != prompt.image_spans.len() {
            return invalid("every image needs exactly one placeholder span".into());
        }
        let l = &self.limits;
        if let Err(overflow) = l.context.fit(len, Some(params.max_tokens)) {
            return invalid(overflow.to_string());
        }
        if let Some(span) = prompt
            .image_spans
            .iter()
            .find(|s| s.len > l.max_encoder_tokens)
        {
            return invalid(format!(
                "an image of {} features exceeds the encoder budget of {}",
                span.len, l.max_encoder_tokens
            ));
        }
        Ok(())
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// True once the engine thread stopped on a fault: nothing more will be served.
    /// Tokens a prompt and its generation may take together: the least of the model's positions,
    /// the KV cache and `max_model_len`.
    pub fn context_limit(&self) -> ContextLimit {
        self.limits.context
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Stops accepting requests; the engine thread ends once in-flight requests finish and every
    /// handle and stream is gone.
    pub fn shutdown(&self) {
        self.accepting.store(false, Ordering::Release);
        self.commands.lock().expect("not poisoned").take();
    }
}

#[cfg(test)]
mod tests {
    use super::kv_budget;
    use crate::model::DeviceMemory;

    #[test]
    fn the_kv_cache_gets_the_allowed_share_less_what_is_used_and_reserved() {
        const GIB: usize = 1 << 30;
        let h100 = DeviceMemory {
            total: 80 * GIB,
            free: 66 * GIB,
        };
        // 72 GiB allowed, 14 GiB in use (the weights), 2 GiB reserved.
        assert_eq!(kv_budget(h100, 0.9, 2 * GIB), 56 * GIB);
        assert_eq!(kv_budget(h100, 0.1, 2 * GIB), 0, "nothing left");
        assert_eq!(
            kv_budget(h100, 1.5, 0),
            66 * GIB,
            "the share is capped at 1"
        );
    }
}
