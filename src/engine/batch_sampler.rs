//! The one owner of a step's sampling decisions. Before the forward pass it decides, per sampling
//! row, whether the token is chosen where the logits are (argmax or a seeded draw) or on the host
//! (logprobs, penalties, bias, filters, grammars); while the model runs it computes the grammar masks
//! of the constrained rows, in parallel; after it, it turns the runner's output into each row's token.
//! Only the rows that need the host pay for it: a batch of 64 with 8 constrained rows copies 8 rows of
//! logits and computes 8 masks, and the others take their tokens from the device.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use super::sampler::{Sampled, SequenceSampler};
use crate::scheduler::SeqId;

/// How a step's sampling rows get their tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplePlan {
    /// Per sampling row, (temperature, seed) of the draw made where the logits are; temperature 0
    /// is the argmax. Host rows hold (0, 0) and their device token is not read.
    pub device: Vec<(f32, u64)>,
    /// The sampling rows (indices into `device`) whose logits come to the host.
    pub host_rows: Vec<usize>,
}

impl SamplePlan {
    /// Some row takes its token from the device.
    pub fn has_device_rows(&self) -> bool {
        self.host_rows.len() < self.device.len()
    }

    /// Every row is plain greedy.
    pub fn all_greedy(&self) -> bool {
        self.host_rows.is_empty() && self.device.iter().all(|&(t, _)| t == 0.0)
    }
}

/// What the runner hands back for the sampling rows of a step.
#[derive(Debug, Default)]
pub struct StepLogits {
    /// One token per sampling row, chosen where the logits are; empty unless the plan has device
    /// rows (host rows' entries are not read).
    pub tokens: Vec<u32>,
    /// The logits of the plan's `host_rows`, in that order.
    pub host: Vec<Vec<f32>>,
}

/// Every live sequence's sampler.
#[derive(Default)]
pub struct BatchSampler {
    samplers: HashMap<SeqId, SequenceSampler>,
}

impl BatchSampler {
    pub fn add(&mut self, seq: SeqId, sampler: SequenceSampler) {
        self.samplers.insert(seq, sampler);
    }

    pub fn remove(&mut self, seq: SeqId) {
        self.samplers.remove(&seq);
    }

    /// The plan for `rows` (the step's sampling sequences, in batch order); a row drawn on the device
    /// takes this step's seed from its own generator now.
    pub fn plan(&mut self, rows: &[SeqId]) -> SamplePlan {
        let mut plan = SamplePlan::default();
        for (i, id) in rows.iter().enumerate() {
            let sampler = self.samplers.get_mut(id).expect("scheduled sequence");
            if sampler.runs_on_device() {
                plan.device.push(sampler.device_params());
            } else {
                plan.device.push((0.0, 0));
                plan.host_rows.push(i);
            }
        }
        plan
    }

    /// Some row of `rows` follows a grammar (its mask is worth computing beside the forward pass).
    pub fn has_constrained(&self, rows: &[SeqId]) -> bool {
        rows.iter()
            .any(|id| self.samplers.get(id).is_some_and(|s| s.is_constrained()))
    }

    /// The grammar masks of the constrained rows, on the thread pool.
    pub fn prepare_masks(&mut self, rows: &[SeqId]) {
        let wanted: HashSet<&SeqId> = rows.iter().collect();
        let mut constrained: Vec<&mut SequenceSampler> = self
            .samplers
            .iter_mut()
            .filter(|(id, s)| s.is_constrained() && wanted.contains(id))
            .map(|(_, s)| s)
            .collect();
        constrained
            .par_iter_mut()
            .for_each(|sampler| sampler.prepare_mask());
    }

    /// Each row's token (or why none could be chosen), in `rows` order.
    pub fn sample(
        &mut self,
        rows: &[SeqId],
        plan: &SamplePlan,
        logits: &StepLogits,
    ) -> Vec<(SeqId, Result<Sampled, String>)> {
        let mut host = plan.host_rows.iter().zip(&logits.host).peekable();
        rows.iter()
            .enumerate()
            .map(|(i, &id)| {
                let sampler = self.samplers.get_mut(&id).expect("scheduled sequence");
                let sampled = match host.peek() {
                    Some((&row, row_logits)) if row == i => {
                        let s = sampler.sample(row_logits);
                        host.next();
                        s
                    }
                    _ => Ok(sampler.record(logits.tokens[i])),
                };
                (id, sampled)
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "batch_sampler_tests.rs"]
mod tests;
