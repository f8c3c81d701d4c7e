//! Picking the next token of one sequence from its logits: logit bias and penalties, then greedy or
//! temperature sampling filtered by min_p, top_k and top_p, from the sequence's own seeded generator
//! (so a seed gives the same tokens whatever else shares the batch). Log-probabilities are reported
//! from the model's raw distribution, as vLLM does by default.
//!
//! A request with a response format carries a grammar: each of its sequences has its own state in
//! it, whose mask of allowed tokens (computed by `prepare_mask`, beside the forward pass) removes
//! every other token before the choice.
//!
//! Unfiltered temperature sampling draws by the Gumbel-max trick from one 64-bit seed per step taken
//! from that generator. The same draw runs on the device (`model::sampling::sample_rows`) when nothing
//! else needs the logits on the host, so a seeded request gets the same tokens either way.

use rand::{Rng, SeedableRng};
use std::collections::HashMap;

use crate::types::{ConstraintState, SamplingParams, StepLogprobs, TokenLogprob};

/// Temperatures below this are greedy (as vLLM's sampling epsilon): dividing logits by them would
/// overflow f32.
const GREEDY_BELOW: f32 = 1e-5;

/// Per-sequence sampling state.
pub struct SequenceSampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
    /// Occurrences of each generated token (presence / frequency penalties).
    output_counts: HashMap<u32, u32>,
    /// Tokens of prompt and output (repetition penalty).
    seen: std::collections::HashSet<u32>,
    /// Where the output stands in its grammar (structured outputs).
    constraint: Option<Box<dyn ConstraintState>>,
    /// The grammar's allowed tokens for the coming step, once `prepare_mask` has run.
    mask: Option<Result<Vec<u32>, String>>,
}

/// One sampled token with its log-probabilities when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    pub logprobs: Option<StepLogprobs>,
}

impl SequenceSampler {
    /// `choice` separates the `n` choices of one seeded request.
    pub fn new(params: &SamplingParams, prompt: &[u32], choice: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(choice as u64)),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        let mut params = params.clone();
        if params.temperature < GREEDY_BELOW {
            params.temperature = 0.0;
        }
        Self {
            constraint: params.constraint.as_ref().map(|c| c.0.start()),
            params,
            rng,
            output_counts: HashMap::new(),
            seen,
            mask: None,
        }
    }

    /// A grammar decides which tokens may come next.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Computes the grammar's mask for the next token (the slow part of constrained sampling, so the
    /// engine runs it while the model computes the logits).
    pub fn prepare_mask(&mut self) {
        if let Some(constraint) = &mut self.constraint {
            self.mask = Some(constraint.allowed_tokens());
        }
    }

    /// Logprobs, bias, penalties or a grammar: the whole row of logits is read or changed on the host.
    fn needs_host_logits(&self) -> bool {
        let p = &self.params;
        self.constraint.is_some()
            || p.logprobs.is_some()
            || !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
    }

    /// Plain greedy or unfiltered temperature sampling with nothing that needs the logits on the host:
    /// the token can be chosen on the device (`device_params`, then `record`).
    pub fn runs_on_device(&self) -> bool {
        !self.needs_host_logits() && (self.params.temperature <= 0.0 || self.unfiltered())
    }

    /// No min_p, top_k or top_p: every token keeps its softmax(logits / T) probability.
    fn unfiltered(&self) -> bool {
        let p = &self.params;
        p.min_p <= 0.0 && p.top_k == 0 && p.top_p >= 1.0
    }

    /// (temperature, noise seed) of this step's device draw; takes the seed from the generator, as
    /// `sample` would.
    pub fn device_params(&mut self) -> (f32, u64) {
        if self.params.temperature > 0.0 {
            (self.params.temperature, self.rng.random::<u64>())
        } else {
            (0.0, 0)
        }
    }

    /// Takes a token chosen elsewhere (on the device, after `device_params`); never a constrained
    /// sequence's, whose logits always come to the host.
    pub fn record(&mut self, token_id: u32) -> Sampled {
        *self.output_counts.entry(token_id).or_default() += 1;
        Sampled {
            token_id,
            logprobs: None,
        }
    }

    /// An error when no token can be chosen: no logit is finite (a numerical fault of the model), or
    /// none that the grammar allows is, or the grammar itself failed. The caller fails this sequence
    /// alone.
    pub fn sample(&mut self, raw_logits: &[f32]) -> Result<Sampled, String> {
        let mut logits = raw_logits.to_vec();
        self.apply_bias_and_penalties(&mut logits);
        if self.constraint.is_some() {
            if self.mask.is_none() {
                self.prepare_mask();
            }
            let mask = self.mask.take().expect("prepared");
            let mask = mask.map_err(|e| format!("the response format's grammar failed: {e}"))?;
            apply_mask(&mut logits, &mask);
            if !logits.iter().any(|l| l.is_finite()) {
                return Err("no token the response format allows has a finite logit".into());
            }
        } else if !logits.iter().any(|l| l.is_finite()) {
            return Err("the model produced no finite logit".into());
        }
        let token_id = if self.params.temperature <= 0.0 {
            argmax(&logits)
        } else if self.unfiltered() {
            let seed = self.rng.random::<u64>();
            crate::model::sampling::gumbel_argmax(&logits, self.params.temperature, seed)
        } else {
            let probs = filtered_probs(&logits, &self.params);
            draw(&probs, self.rng.random::<f64>())
        };
        let logprobs = self
            .params
            .logprobs
            .map(|k| step_logprobs(raw_logits, token_id, k));
        *self.output_counts.entry(token_id).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token_id);
        }
        if let Some(constraint) = &mut self.constraint {
            constraint
                .accept(token_id)
                .map_err(|e| format!("the response format's grammar failed: {e}"))?;
        }
        Ok(Sampled { token_id, logprobs })
    }

    fn apply_bias_and_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(token, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }
}

/// Removes (sets to -inf) every token whose bit is clear in `allowed` (bit `t % 32` of word `t / 32`),
/// and every token past its end.
fn apply_mask(logits: &mut [f32], allowed: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let on = allowed.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
        if !on {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Index of the largest logit; the first one on ties, as torch's argmax.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The distribution sampled from: softmax(logits / T), then min_p, top_k and top_p (in that order,
/// as vLLM), renormalised. Removed tokens have probability 0.
pub fn filtered_probs(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
    let t = p.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t).exp())
        .collect();
    normalise(&mut probs);
    if p.min_p > 0.0 {
        let top = probs.iter().copied().fold(0.0, f64::max);
        let floor = p.min_p as f64 * top;
        probs
            .iter_mut()
            .filter(|x| **x < floor)
            .for_each(|x| *x = 0.0);
    }
    let k = p.top_k;
    if (k > 0 && k < probs.len()) || p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut keep = order.len();
        if k > 0 {
            keep = keep.min(k);
        }
        if p.top_p < 1.0 {
            let kept_mass: f64 = order[..keep].iter().map(|&i| probs[i]).sum();
            let mut cumulative = 0.0;
            for (rank, &i) in order[..keep].iter().enumerate() {
                cumulative += probs[i] / kept_mass;
                if cumulative >= p.top_p as f64 {
                    keep = rank + 1;
                    break;
                }
            }
        }
        let mut filtered = vec![0.0; probs.len()];
        // At least the most likely token survives; with no positive probability at all (infinite
        // logits) nothing does, and the draw falls back to the first token rather than panicking.
        for &i in &order[..keep.max(1).min(order.len())] {
            filtered[i] = probs[i];
        }
        probs = filtered;
    }
    normalise(&mut probs);
    probs
}

fn normalise(probs: &mut [f64]) {
    let total: f64 = probs.iter().sum();
    if total > 0.0 {
        probs.iter_mut().for_each(|x| *x /= total);
    }
}

/// Inverse-CDF draw with `u` uniform in [0, 1).
fn draw(probs: &[f64], u: f64) -> u32 {
    let mut remaining = u;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p <= 0.0 {
            continue;
        }
        last = i;
        if remaining < p {
            return i as u32;
        }
        remaining -= p;
    }
    last as u32
}

/// log-softmax of the raw logits: the chosen token and the `k` most likely ones (also how the runner
/// scores prompt tokens).
pub fn step_logprobs(logits: &[f32], chosen: u32, k: usize) -> StepLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_total = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    let lp = |i: usize| (logits[i] as f64 - log_total) as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
        });
        order.truncate(k);
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    } else {
        order.clear();
    }
    StepLogprobs {
        chosen: TokenLogprob {
            token_id: chosen,
            logprob: lp(chosen as usize),
        },
        top: order
            .into_iter()
            .map(|i| TokenLogprob {
                token_id: i as u32,
                logprob: lp(i),
            })
            .collect(),
    }
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
