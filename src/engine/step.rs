//! One engine step, in nano-vllm's shape: schedule → run the model (with the grammar masks computed
//! beside it) → sample → update the scheduler and emit the tokens; then the step's metrics.

use std::time::Instant;

use super::supervision::StepOutcome;
use super::EngineCore;
use crate::engine::batch_sampler::{SamplePlan, StepLogits};
use crate::engine::metrics::add;
use crate::engine::runner::{BatchEntry, PromptScores, StepOutput};
use crate::scheduler::{SchedulerOutput, SeqId};
use crate::types::{SamplingParams, StepLogprobs};

/// Where a step's time went, for metrics.
struct StepTimes {
    started: Instant,
    schedule_micros: u64,
    sample_micros: u64,
    update_started: Instant,
}

impl EngineCore {
    pub(super) fn step(&mut self) -> StepOutcome {
        let started = Instant::now();
        let out = self.scheduler.schedule();
        let schedule_micros = started.elapsed().as_micros() as u64;
        if out.is_empty() {
            return StepOutcome::Done;
        }
        self.begin_step(&out, started);
        let sampling: Vec<SeqId> = out
            .scheduled
            .iter()
            .filter(|s| s.sample)
            .map(|s| s.seq_id)
            .collect();
        let plan = self.sampler.plan(&sampling);
        let step = match self.run_model(&out, &sampling, &plan) {
            Ok(step) => step,
            Err(e) => return StepOutcome::Faulted(e),
        };
        self.keep_prompt_scores(&out, &step.prompt_scores);
        let sample_started = Instant::now();
        let sampled = self.sample(&sampling, &plan, &step.logits);
        let sample_micros = sample_started.elapsed().as_micros() as u64;
        let update_started = Instant::now();
        self.scheduler.update(
            &out,
            &sampled
                .iter()
                .map(|&(id, t, _)| (id, t))
                .collect::<Vec<_>>(),
        );
        // Counted before the tokens go out, so a reader that has the answer sees them counted.
        add(&self.metrics.generated_tokens, sampling.len() as u64);
        for (id, token, logprobs) in sampled {
            self.emit(id, token, logprobs);
        }
        let times = StepTimes {
            started,
            schedule_micros,
            sample_micros,
            update_started,
        };
        self.record_step(&step, &plan, times);
        StepOutcome::Done
    }

    /// Notes the step's requests (what a fault fails), runs the test-only fault hook, and stamps
    /// each request's queue time at its first step.
    fn begin_step(&mut self, out: &SchedulerOutput, started: Instant) {
        for s in &out.scheduled {
            if let Some(q) = self.seqs.get(&s.seq_id) {
                if !self.step_requests.contains(&q.request) {
                    self.step_requests.push(q.request);
                }
            }
        }
        if let Some(hook) = &self.fault_hook {
            let params: Vec<&SamplingParams> = self
                .step_requests
                .iter()
                .map(|id| &self.requests[id].params)
                .collect();
            if (hook.0)(&params) {
                panic!("injected step fault");
            }
        }
        for s in &out.scheduled {
            if let Some(req) = self
                .seqs
                .get(&s.seq_id)
                .and_then(|q| self.requests.get_mut(&q.request))
            {
                if !req.scheduled {
                    req.scheduled = true;
                    req.usage.queue_time = started.saturating_duration_since(req.received);
                }
            }
        }
    }

    /// The forward pass; the constrained rows' grammar masks are computed meanwhile on other
    /// threads (they depend only on the tokens so far).
    fn run_model(
        &mut self,
        out: &SchedulerOutput,
        sampling: &[SeqId],
        plan: &SamplePlan,
    ) -> Result<StepOutput, String> {
        let batch: Vec<BatchEntry<'_>> = out
            .scheduled
            .iter()
            .map(|s| {
                let seq = self
                    .scheduler
                    .get(s.seq_id)
                    .expect("scheduled sequences exist");
                let state = &self.seqs[&s.seq_id];
                let req = &self.requests[&state.request];
                BatchEntry {
                    scheduled: s,
                    token_ids: &seq.token_ids,
                    images: &req.images,
                    pixels: &req.pixels,
                    num_prompt_tokens: seq.num_prompt_tokens,
                    prompt_logprobs: state.prompt_logprobs,
                }
            })
            .collect();
        let (runner, sampler) = (&mut self.runner, &mut self.sampler);
        std::thread::scope(|scope| {
            let masks = sampler
                .has_constrained(sampling)
                .then(|| scope.spawn(|| sampler.prepare_masks(sampling)));
            // On the CPU the step runs on a worker of the compute pool (the engine thread waits
            // once per step) rather than here, where every parallel op of the step would hand its
            // work to the pool and wait for it: about sixty sleeps and wake-ups per decode step, 10%
            // of the server's samples in the scheduler. One stream decoded 1.00–1.23× as fast
            // (median 1.067×, 10 interleaved pairs of 128 tokens on the mid checkpoint). A GPU step
            // stays on this thread, where its CUDA context and graphs were made.
            let result = match runner.on_cpu() {
                true => rayon::scope(|_| runner.execute(&batch, plan)),
                false => runner.execute(&batch, plan),
            };
            if let Some(masks) = masks {
                if let Err(panic) = masks.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            result.map_err(|e| e.to_string())
        })
    }

    /// Keeps the prompt scores a step computed, one per token: a sequence recomputed after
    /// preemption scores its prompt again.
    fn keep_prompt_scores(&mut self, out: &SchedulerOutput, scores: &[PromptScores]) {
        for scored in scores {
            let id = out.scheduled[scored.entry].seq_id;
            let Some(state) = self.seqs.get_mut(&id) else {
                continue;
            };
            for (i, lp) in scored.logprobs.iter().enumerate() {
                if scored.first + i == state.next_scored {
                    state.prompt_scores.push(lp.clone());
                    state.next_scored += 1;
                }
            }
        }
    }

    /// Each sampling row's token; a row no token could be chosen for fails its own request, and the
    /// rest of the batch goes on.
    fn sample(
        &mut self,
        sampling: &[SeqId],
        plan: &SamplePlan,
        logits: &StepLogits,
    ) -> Vec<(SeqId, u32, Option<StepLogprobs>)> {
        let mut sampled = Vec::with_capacity(sampling.len());
        let mut unsampleable = Vec::new();
        for (id, s) in self.sampler.sample(sampling, plan, logits) {
            match s {
                Ok(s) => sampled.push((id, s.token_id, s.logprobs)),
                Err(reason) => unsampleable.push((self.seqs[&id].request, reason)),
            }
        }
        for (request, reason) in unsampleable {
            tracing::error!(
                request,
                reason,
                "no token could be sampled; failing the request"
            );
            self.fail_request(request, &reason);
        }
        sampled
    }

    fn record_step(&self, step: &StepOutput, plan: &SamplePlan, times: StepTimes) {
        let m = &self.metrics;
        add(&m.steps, 1);
        add(&m.fixed_decode_steps, step.fixed_shape as u64);
        add(
            &m.tokens_chosen_in_place,
            (plan.device.len() - plan.host_rows.len()) as u64,
        );
        add(&m.schedule_micros, times.schedule_micros);
        add(&m.prepare_micros, step.prepare_micros);
        add(&m.forward_micros, step.forward_micros);
        add(&m.sample_micros, times.sample_micros);
        add(
            &m.update_micros,
            times.update_started.elapsed().as_micros() as u64,
        );
        add(&m.images_encoded, step.images.encoded);
        add(&m.image_cache_hits, step.images.cache_hits);
        add(&m.image_encode_micros, step.images.encode_micros);
        add(&m.step_micros, times.started.elapsed().as_micros() as u64);
    }
}
