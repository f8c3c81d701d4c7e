//! The engine's core loop, on its own OS thread: take commands, then schedule → run → sample → update →
//! emit, one step at a time, until there is no work and the handle is gone. It owns the scheduler and
//! the runner; requests talk to it only through channels.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

#[path = "step.rs"]
mod step;
#[path = "supervision.rs"]
mod supervision;

use super::batch_sampler::BatchSampler;
use super::handle::StepFaultHook;
use super::metrics::{add, set, EngineMetrics};
use super::runner::ModelRunner;
use super::sampler::SequenceSampler;
use super::EngineError;
use crate::scheduler::{Scheduler, SeqId, SeqImage, Sequence};
use crate::types::{
    FinishReason, ProcessedImage, SamplingParams, TokenEvent, TokenizedPrompt, Usage,
};

pub type RequestId = u64;
pub type EventSender = UnboundedSender<Result<TokenEvent, EngineError>>;

pub(super) enum Command {
    Submit(Box<Submission>),
    Abort(RequestId),
    /// The frontend ended one choice (a stop string): stop computing it, keep its siblings.
    StopChoice(RequestId, usize),
}

pub(super) struct Submission {
    pub id: RequestId,
    pub prompt: TokenizedPrompt,
    pub params: SamplingParams,
    pub events: EventSender,
}

struct RequestState {
    params: SamplingParams,
    events: EventSender,
    pixels: Arc<Vec<ProcessedImage>>,
    images: Vec<SeqImage>,
    seqs: Vec<SeqId>,
    unfinished: usize,
    usage: Usage,
    received: Instant,
    /// Set at the first step that schedules any of its sequences.
    scheduled: bool,
}

struct SeqState {
    request: RequestId,
    index: usize,
    /// `Some(k)`: this sequence scores its prompt (choice 0 of a `prompt_logprobs` request).
    prompt_logprobs: Option<usize>,
    /// The next prompt token to score, and the scores not yet sent.
    next_scored: usize,
    prompt_scores: Vec<crate::types::StepLogprobs>,
    /// Prompt plus `max_tokens`, capped by the context.
    max_len: usize,
}

pub(super) use supervision::Ended;

pub(super) struct EngineCore {
    pub scheduler: Scheduler,
    pub runner: ModelRunner,
    sampler: BatchSampler,
    pub metrics: Arc<EngineMetrics>,
    pub eos_token_ids: Vec<u32>,
    pub max_model_len: usize,
    requests: HashMap<RequestId, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_seq: SeqId,
    /// The requests of the step being run: what a fault inside it fails.
    step_requests: Vec<RequestId>,
    consecutive_faults: u32,
    pub fault_hook: Option<StepFaultHook>,
}

impl EngineCore {
    pub fn new(
        scheduler: Scheduler,
        runner: ModelRunner,
        metrics: Arc<EngineMetrics>,
        eos_token_ids: Vec<u32>,
        max_model_len: usize,
    ) -> Self {
        Self {
            scheduler,
            runner,
            sampler: BatchSampler::default(),
            metrics,
            eos_token_ids,
            max_model_len,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            step_requests: Vec::new(),
            consecutive_faults: 0,
            fault_hook: None,
        }
    }

    /// Runs until the command channel closes and no work is left, or until steps keep failing (then
    /// every request still known gets an error).
    pub fn run(&mut self, commands: Receiver<Command>) -> Ended {
        let mut open = true;
        loop {
            if !self.scheduler.has_work() {
                if !open {
                    break;
                }
                match commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_abandoned();
            if self.scheduler.has_work() && !self.supervised_step() {
                self.fail_all("the engine stopped after repeated faults");
                self.publish_gauges();
                return Ended::Failed;
            }
            self.publish_gauges();
        }
        Ended::Drained
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(sub) => self.add_request(*sub),
            Command::Abort(id) => self.finish_request(id),
            Command::StopChoice(id, index) => self.stop_choice(id, index),
        }
    }

    /// Frees one choice's sequence; the request ends with it when it was the last one running. Its
    /// events stop here: the frontend that asked has already closed the choice itself.
    fn stop_choice(&mut self, id: RequestId, index: usize) {
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        let seqs = &self.seqs;
        let Some(seq) = req
            .seqs
            .iter()
            .copied()
            .find(|s| seqs.get(s).is_some_and(|st| st.index == index))
        else {
            return;
        };
        req.unfinished -= 1;
        let done = req.unfinished == 0;
        self.forget_seq(seq);
        if done {
            self.finish_request(id);
        }
    }

    fn add_request(&mut self, sub: Submission) {
        let images: Vec<SeqImage> = sub
            .prompt
            .image_spans
            .iter()
            .zip(&sub.prompt.images)
            .map(|(span, img)| SeqImage {
                start: span.start,
                len: span.len,
                content_hash: img.content_hash,
            })
            .collect();
        let prompt_len = sub.prompt.token_ids.len();
        let max_len = (prompt_len + sub.params.max_tokens).min(self.max_model_len);
        let mut seq_ids = Vec::with_capacity(sub.params.n);
        for index in 0..sub.params.n {
            let id = self.next_seq;
            self.next_seq += 1;
            let mut seq = Sequence::new(id, sub.prompt.token_ids.clone(), images.clone());
            seq.cache_salt = sub.prompt.cache_salt;
            let prompt_logprobs = sub.params.prompt_logprobs.filter(|_| index == 0);
            seq.computes_whole_prompt = prompt_logprobs.is_some();
            // Later choices wait for the first one's prompt, then reuse its blocks.
            seq.wait_for = seq_ids.first().copied();
            self.scheduler.add(seq);
            self.sampler.add(
                id,
                SequenceSampler::new(&sub.params, &sub.prompt.token_ids, index),
            );
            self.seqs.insert(
                id,
                SeqState {
                    request: sub.id,
                    index,
                    prompt_logprobs,
                    next_scored: 1,
                    prompt_scores: Vec::new(),
                    max_len,
                },
            );
            seq_ids.push(id);
        }
        let image_tokens = sub.prompt.image_spans.iter().map(|s| s.len).sum();
        add(
            &self.metrics.prefix_queried_tokens,
            (prompt_len * sub.params.n) as u64,
        );
        add(&self.metrics.prompt_tokens, prompt_len as u64);
        self.requests.insert(
            sub.id,
            RequestState {
                params: sub.params,
                events: sub.events,
                pixels: Arc::new(sub.prompt.images),
                images,
                unfinished: seq_ids.len(),
                seqs: seq_ids,
                usage: Usage {
                    prompt_tokens: prompt_len,
                    image_tokens,
                    ..Usage::default()
                },
                received: Instant::now(),
                scheduled: false,
            },
        );
    }

    /// Removes a request and all its sequences (their KV blocks return to the pool as they drop).
    fn finish_request(&mut self, id: RequestId) {
        if let Some(req) = self.requests.remove(&id) {
            for seq in req.seqs {
                self.forget_seq(seq);
            }
        }
    }

    /// A sequence leaves the scheduler (its blocks return to the pool), the core and the sampler.
    fn forget_seq(&mut self, seq: SeqId) {
        self.scheduler.remove(seq);
        self.runner.forget(seq);
        self.seqs.remove(&seq);
        self.sampler.remove(seq);
    }

    /// Requests whose stream was dropped are aborted even before their Abort command arrives.
    fn drop_abandoned(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish_request(id);
        }
    }

    /// Sends a sampled token to its request and finishes the sequence when it should stop.
    fn emit(&mut self, id: SeqId, token: u32, logprobs: Option<crate::types::StepLogprobs>) {
        let Some(seq_state) = self.seqs.get_mut(&id) else {
            return;
        };
        let prompt_logprobs = std::mem::take(&mut seq_state.prompt_scores);
        let req_id = seq_state.request;
        let (len, cached) = {
            let seq = self.scheduler.get(id).expect("live sequence");
            (seq.len(), seq.num_cached_prompt_tokens)
        };
        let req = self.requests.get_mut(&req_id).expect("live request");
        let params = &req.params;
        // `max_tokens: 0` (prompt scoring): the step that finished the prompt ends the choice, and
        // the token it drew is not part of the answer.
        let scores_only = params.max_tokens == 0;
        let finish = if scores_only {
            Some(FinishReason::Length)
        } else if (!params.ignore_eos && self.eos_token_ids.contains(&token))
            || params.stop_token_ids.contains(&token)
        {
            Some(FinishReason::Stop)
        } else if len >= seq_state.max_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        req.usage.completion_tokens += usize::from(!scores_only);
        if seq_state.index == 0 {
            req.usage.cached_prompt_tokens = cached;
        }
        let mut event = TokenEvent {
            index: seq_state.index,
            token_ids: if scores_only { Vec::new() } else { vec![token] },
            logprobs: if scores_only {
                Vec::new()
            } else {
                logprobs.into_iter().collect()
            },
            prompt_logprobs,
            finish_reason: finish,
            cached_prompt_tokens: cached,
            usage: None,
        };
        if finish.is_some() {
            req.unfinished -= 1;
            if req.unfinished == 0 {
                event.usage = Some(req.usage);
            }
        }
        let delivered = req.events.send(Ok(event)).is_ok();
        if finish.is_some() {
            self.forget_seq(id);
        }
        let req_done = self
            .requests
            .get(&req_id)
            .is_some_and(|r| r.unfinished == 0);
        if req_done || !delivered {
            self.finish_request(req_id);
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        let pool = self.scheduler.pool();
        set(&m.waiting, self.scheduler.num_waiting() as u64);
        set(&m.running, self.scheduler.num_running() as u64);
        set(&m.kv_blocks_total, pool.num_blocks() as u64);
        set(
            &m.kv_blocks_used,
            (pool.num_blocks() - pool.num_free()) as u64,
        );
        set(&m.preemptions, self.scheduler.num_preemptions());
        set(&m.prefix_hit_tokens, self.scheduler.num_prefix_hit_tokens());
    }
}
