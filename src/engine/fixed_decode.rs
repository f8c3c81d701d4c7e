//! Pure decode steps through fixed-shape buffers, replayed as CUDA graphs where they could be captured.
//! The runner hands a step here when every scheduled sequence computes exactly one text token.

use crate::model::static_decode::{batch_sizes, DecodeOutput, DecodeRow, StaticDecode};
use crate::model::{KvCache, LlavaModel, ModelError};

use super::batch_sampler::{SamplePlan, StepLogits};
use super::runner::host_rows;

/// How decode steps run (`--enforce-eager` picks `Off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeGraphs {
    /// CUDA graphs where the fused kernels run (CUDA build, GPU, head dim 64 or 128); eager elsewhere.
    #[default]
    Auto,
    /// Every step eager, shaped by its own batch.
    Off,
    /// Padded fixed-shape steps without capture, on any device: the graph path's inputs, checkable on
    /// the CPU against HF.
    Padded,
}

struct Size {
    step: StaticDecode,
    #[cfg(feature = "cuda")]
    graph: Option<crate::model::cuda_graph::CapturedDecode>,
}

pub struct FixedDecode {
    sizes: Vec<Size>,
    /// Graphs were wanted: a size without one is better left to the eager path than padded.
    captured: bool,
}

impl FixedDecode {
    /// Buffers (and graphs) for every padded size up to `max_seqs`; `None` when `mode` wants none.
    /// A size whose capture fails runs eagerly through the runner's ordinary path instead.
    pub fn new(
        mode: DecodeGraphs,
        model: &LlavaModel,
        kv_cache: &KvCache,
        max_seqs: usize,
    ) -> Result<Option<Self>, ModelError> {
        let capture = match mode {
            DecodeGraphs::Off => return Ok(None),
            DecodeGraphs::Auto if !model.uses_attention_kernels() => return Ok(None),
            DecodeGraphs::Auto => true,
            // The fixed-shape step runs the fused path: on a GPU only where its kernels exist.
            DecodeGraphs::Padded if !model.device().is_cpu() && !model.uses_attention_kernels() => {
                return Ok(None)
            }
            DecodeGraphs::Padded => false,
        };
        let max_context = model.config.text.max_position_embeddings;
        let mut sizes = Vec::new();
        for batch in batch_sizes(max_seqs) {
            let step = StaticDecode::new(batch, max_context, kv_cache, model.device())?;
            sizes.push(Size {
                #[cfg(feature = "cuda")]
                graph: capture_or_warn(capture, &step, model, kv_cache),
                step,
            });
        }
        if capture {
            let captured = sizes.iter().filter(|s| s.has_graph()).count();
            tracing::info!(
                captured,
                sizes = sizes.len(),
                "decode steps captured as CUDA graphs"
            );
        }
        Ok(Some(Self {
            sizes,
            captured: capture,
        }))
    }

    /// Runs a pure decode step when a padded size fits it; `None` leaves the step to the eager path.
    pub fn execute(
        &self,
        rows: &[DecodeRow<'_>],
        plan: &SamplePlan,
        model: &LlavaModel,
        kv_cache: &KvCache,
    ) -> Result<Option<StepLogits>, ModelError> {
        let Some(size) = self.sizes.iter().find(|s| s.step.batch() >= rows.len()) else {
            return Ok(None);
        };
        if self.captured && !size.has_graph() {
            return Ok(None);
        }
        size.step.upload(rows, &plan.device)?;
        let owned;
        let output: &DecodeOutput = match size.replay()? {
            Some(out) => out,
            None => {
                owned = size.step.run(model, kv_cache)?;
                &owned
            }
        };
        let n = rows.len();
        let tokens = if !plan.has_device_rows() {
            Vec::new()
        } else if plan.all_greedy() {
            output.argmax_rows(n)?
        } else {
            output.drawn_rows(n)?
        };
        Ok(Some(StepLogits {
            tokens,
            host: host_rows(&output.logits.narrow(0, 0, n)?, &plan.host_rows)?,
        }))
    }
}

impl Size {
    fn has_graph(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.graph.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    fn replay(&self) -> Result<Option<&DecodeOutput>, ModelError> {
        #[cfg(feature = "cuda")]
        if let Some(graph) = &self.graph {
            return graph.replay().map(Some);
        }
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
fn capture_or_warn(
    capture: bool,
    step: &StaticDecode,
    model: &LlavaModel,
    kv_cache: &KvCache,
) -> Option<crate::model::cuda_graph::CapturedDecode> {
    if !capture {
        return None;
    }
    match crate::model::cuda_graph::CapturedDecode::capture(step, model, kv_cache) {
        Ok(graph) => Some(graph),
        Err(e) => {
            tracing::warn!(batch = step.batch(), error = %e, "decode step not captured; it runs eagerly");
            None
        }
    }
}
