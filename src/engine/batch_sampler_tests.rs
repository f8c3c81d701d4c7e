//! The step plan and the per-row dispatch, with hand-built logits and a hand-written grammar.

use std::sync::Arc;

use super::*;
use crate::types::{ConstraintSource, ConstraintState, SamplingParams, TokenConstraint};

/// Allows only token 3, then only token 1 (the EOS of these tests), then nothing.
struct ThreeThenOne;

struct ThreeThenOneState(usize);

impl ConstraintSource for ThreeThenOne {
    fn start(&self) -> Box<dyn ConstraintState> {
        Box::new(ThreeThenOneState(0))
    }
}

impl ConstraintState for ThreeThenOneState {
    fn allowed_tokens(&mut self) -> Result<Vec<u32>, String> {
        match self.0 {
            0 => Ok(vec![1 << 3]),
            1 => Ok(vec![1 << 1]),
            _ => Err("past the end".into()),
        }
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        let expected = [3, 1][self.0.min(1)];
        self.0 += 1;
        (token == expected)
            .then_some(())
            .ok_or(format!("token {token} is not allowed"))
    }
}

fn sampler(f: impl FnOnce(&mut SamplingParams)) -> SequenceSampler {
    let mut p = SamplingParams::default();
    f(&mut p);
    SequenceSampler::new(&p, &[], 0)
}

fn constrained(p: &mut SamplingParams) {
    p.constraint = Some(TokenConstraint(Arc::new(ThreeThenOne)));
}

#[test]
fn only_rows_that_need_the_host_are_host_rows() {
    let mut batch = BatchSampler::default();
    batch.add(10, sampler(|_| {}));
    batch.add(11, sampler(constrained));
    batch.add(12, sampler(|p| p.temperature = 0.7));
    batch.add(13, sampler(|p| p.logprobs = Some(2)));
    let plan = batch.plan(&[10, 11, 12, 13]);
    assert_eq!(plan.host_rows, vec![1, 3]);
    assert_eq!(plan.device.len(), 4);
    assert_eq!(plan.device[0], (0.0, 0));
    assert_eq!(plan.device[2].0, 0.7);
    assert!(plan.has_device_rows() && !plan.all_greedy());
    assert!(batch.has_constrained(&[10, 11]) && !batch.has_constrained(&[10, 12]));

    let greedy = batch.plan(&[10]);
    assert!(greedy.all_greedy() && greedy.has_device_rows());
    assert!(!batch.plan(&[11, 13]).has_device_rows());
}

#[test]
fn device_tokens_and_host_rows_go_to_their_own_sequences() {
    let mut batch = BatchSampler::default();
    batch.add(10, sampler(|_| {}));
    batch.add(11, sampler(constrained));
    batch.add(12, sampler(|_| {}));
    let rows = [10, 11, 12];
    let plan = batch.plan(&rows);
    batch.prepare_masks(&rows);
    // Row 1's raw argmax is token 0, but its grammar allows token 3 alone.
    let logits = StepLogits {
        tokens: vec![5, 99, 6],
        host: vec![vec![9.0, 1.0, 2.0, -4.0, 3.0]],
    };
    let got: Vec<(SeqId, u32)> = batch
        .sample(&rows, &plan, &logits)
        .into_iter()
        .map(|(id, s)| (id, s.unwrap().token_id))
        .collect();
    assert_eq!(got, vec![(10, 5), (11, 3), (12, 6)]);

    // Next step: the grammar allows only token 1, with or without a prepared mask.
    let next = StepLogits {
        tokens: Vec::new(),
        host: vec![vec![9.0, -1.0, 2.0, 7.0, 3.0]],
    };
    let plan = batch.plan(&[11]);
    let got = batch.sample(&[11], &plan, &next);
    assert_eq!(got[0].1.as_ref().unwrap().token_id, 1);
}

#[test]
fn a_grammar_with_no_finite_allowed_logit_or_a_failure_fails_its_row_alone() {
    let mut batch = BatchSampler::default();
    batch.add(1, sampler(constrained));
    batch.add(2, sampler(|_| {}));
    let rows = [1, 2];
    let plan = batch.plan(&rows);
    let logits = StepLogits {
        tokens: vec![0, 4],
        host: vec![vec![0.0, 0.0, 0.0, f32::NEG_INFINITY]],
    };
    let got = batch.sample(&rows, &plan, &logits);
    assert!(got[0].1.as_ref().unwrap_err().contains("finite"));
    assert_eq!(got[1].1.as_ref().unwrap().token_id, 4);
}

#[test]
fn logprobs_of_a_constrained_row_are_the_models_own() {
    // As vLLM: the reported distribution is the raw one; the mask only decides the choice.
    let mut s = sampler(|p| {
        constrained(p);
        p.logprobs = Some(1);
    });
    let got = s.sample(&[2.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(got.token_id, 3);
    let lp = got.logprobs.unwrap();
    let total = (2.0f64.exp() + 3.0).ln();
    assert!((lp.chosen.logprob as f64 + total).abs() < 1e-6);
    assert_eq!(lp.top[0].token_id, 0);
}
