//! One scheduling rule per step (the vLLM v1 / nano-vllm shape): running sequences first, each asking
//! for the tokens it lacks (one for a decode, a chunk for a prefill) under a token budget; then waiting
//! sequences in arrival order, after a prefix-cache lookup, while the budget, the sequence cap and the
//! block pool allow. When blocks run out, the newest running sequence is preempted (recomputed later).

use std::collections::{HashMap, VecDeque};

use super::block_pool::BlockPool;
use super::kv_manager::KvManager;
use super::sequence::{SeqId, SeqStatus, Sequence};

/// Limits of one step.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// Image feature tokens the encoder may produce per step.
    pub max_num_encoder_tokens: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    /// Tokens whose K/V were already cached before this step.
    pub num_cached: usize,
    /// Tokens computed this step: positions `num_cached..num_cached + num_new`.
    pub num_new: usize,
    /// The sequence's whole block table.
    pub block_ids: Vec<u32>,
    /// Images (indices into the sequence's images) handed to the encoder for the first time.
    pub encode_images: Vec<usize>,
    /// This step reaches the last known token: a new token is to be sampled.
    pub sample: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<ScheduledSeq>,
    pub preempted: Vec<SeqId>,
    pub num_batched_tokens: usize,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the last one is the newest, the first to be preempted.
    running: Vec<SeqId>,
    num_preemptions: u64,
    num_prefix_hit_tokens: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, pool: BlockPool) -> Self {
        Self {
            config,
            kv: KvManager::new(pool),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
            num_prefix_hit_tokens: 0,
        }
    }

    pub fn pool(&self) -> &BlockPool {
        self.kv.pool()
    }

    /// Queues a sequence (at the back: first come, first served).
    pub fn add(&mut self, seq: Sequence) {
        assert!(!seq.is_empty(), "a sequence needs at least one token");
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Removes a sequence in any state; its blocks go back to the pool as it drops.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = self.seqs.remove(&id)?;
        self.waiting.retain(|&s| s != id);
        self.running.retain(|&s| s != id);
        Some(seq)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn num_prefix_hit_tokens(&self) -> u64 {
        self.num_prefix_hit_tokens
    }

    /// Cuts `num_new` so that the images first scheduled in this chunk fit the encoder budget;
    /// returns the chunk length and those images.
    fn fit_encoder_budget(
        seq: &Sequence,
        num_new: usize,
        budget: &mut usize,
    ) -> (usize, Vec<usize>) {
        let start = seq.num_computed_tokens;
        let mut end = start + num_new;
        let mut images = Vec::new();
        let mut used = 0;
        for (i, img) in seq.images.iter().enumerate() {
            if seq.images_scheduled[i] || !img.overlaps(start, end) {
                continue;
            }
            if used + img.len > *budget {
                // Stop the chunk before this image; later images start later still.
                end = end.min(img.start.max(start));
                break;
            }
            used += img.len;
            images.push(i);
        }
        images.retain(|&i| seq.images[i].overlaps(start, end));
        let used: usize = images.iter().map(|&i| seq.images[i].len).sum();
        *budget -= used;
        (end - start, images)
    }

    fn preempt_newest(&mut self, out: &mut SchedulerOutput) -> Option<SeqId> {
        let victim = self.running.pop()?;
        let seq = self.seqs.get_mut(&victim).expect("running sequences exist");
        self.kv.free(seq);
        seq.status = SeqStatus::Waiting;
        seq.num_preemptions += 1;
        self.num_preemptions += 1;
        self.waiting.push_front(victim);
        // A sequence preempted after being scheduled this step is taken out of the step again.
        out.scheduled.retain(|s| s.seq_id != victim);
        out.preempted.push(victim);
        Some(victim)
    }

    /// Decides this step's work. Sequences scheduled here have their `num_computed_tokens` advanced:
    /// the runner must compute exactly what the output says before `update` is called.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut token_budget = self.config.max_num_batched_tokens;
        let mut encoder_budget = self.config.max_num_encoder_tokens;

        let mut index = 0;
        while index < self.running.len() && token_budget > 0 {
            let id = self.running[index];
            let seq = &self.seqs[&id];
            let wanted = (seq.len() - seq.num_computed_tokens).min(token_budget);
            let (num_new, encode_images) =
                Self::fit_encoder_budget(seq, wanted, &mut encoder_budget);
            if num_new == 0 {
                index += 1;
                continue;
            }
            let mut self_preempted = false;
            while !self.kv.can_allocate_slots(&self.seqs[&id], num_new) {
                if self.preempt_newest(&mut out) == Some(id) {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let seq = self.seqs.get_mut(&id).expect("running");
            self.kv.allocate_slots(seq, num_new).expect("checked");
            out.scheduled
                .push(Self::commit(seq, num_new, encode_images));
            out.num_batched_tokens += num_new;
            token_budget -= num_new;
            index += 1;
        }

        if out.preempted.is_empty() {
            self.admit_waiting(&mut out, token_budget, encoder_budget);
        }
        out
    }

    fn admit_waiting(
        &mut self,
        out: &mut SchedulerOutput,
        mut token_budget: usize,
        mut encoder_budget: usize,
    ) {
        while token_budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            // A sibling waits until its parent's prompt was computed in an earlier step (its blocks
            // are registered only after the step that computes them).
            let waits_for_sibling = self.seqs[&id].wait_for.is_some_and(|parent| {
                let Some(p) = self.seqs.get(&parent) else {
                    return false;
                };
                let prompt_done = match out.scheduled.iter().find(|s| s.seq_id == parent) {
                    Some(s) => s.num_cached >= p.num_prompt_tokens,
                    None => p.num_computed_tokens >= p.num_prompt_tokens,
                };
                !prompt_done
            });
            if waits_for_sibling {
                break;
            }
            let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
            let cached = self.kv.get_computed_blocks(seq);
            seq.num_computed_tokens = cached;
            let wanted = (seq.len() - cached).min(token_budget);
            let (num_new, encode_images) =
                Self::fit_encoder_budget(seq, wanted, &mut encoder_budget);
            if num_new == 0 || self.kv.allocate_slots(seq, num_new).is_none() {
                self.kv.free(seq);
                break;
            }
            seq.num_cached_prompt_tokens = cached.min(seq.num_prompt_tokens);
            seq.status = SeqStatus::Running;
            self.num_prefix_hit_tokens += cached as u64;
            out.scheduled
                .push(Self::commit(seq, num_new, encode_images));
            out.num_batched_tokens += num_new;
            token_budget -= num_new;
            self.waiting.pop_front();
            self.running.push(id);
        }
    }

    fn commit(seq: &mut Sequence, num_new: usize, encode_images: Vec<usize>) -> ScheduledSeq {
        for &i in &encode_images {
            seq.images_scheduled[i] = true;
        }
        let num_cached = seq.num_computed_tokens;
        seq.num_computed_tokens += num_new;
        ScheduledSeq {
            seq_id: seq.id,
            num_cached,
            num_new,
            block_ids: seq.block_ids(),
            encode_images,
            sample: seq.num_computed_tokens == seq.len(),
        }
    }

    /// After the runner computed `out`: appends the sampled tokens and registers newly full blocks in
    /// the prefix cache (only now is their content in the cache).
    pub fn update(&mut self, out: &SchedulerOutput, sampled: &[(SeqId, u32)]) {
        for s in &out.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.seq_id) {
                self.kv.cache_computed_blocks(seq);
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.token_ids.push(token);
            }
        }
    }
}
