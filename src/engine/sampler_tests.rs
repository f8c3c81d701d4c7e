//! Sampler checks against distributions computed by hand.

use super::*;

/// Logits whose softmax at T = 1 is exactly [0.1, 0.2, 0.3, 0.4].
fn logits() -> Vec<f32> {
    [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect()
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    f(&mut p);
    p
}

fn assert_probs(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
}

#[test]
fn plain_softmax_and_temperature() {
    assert_probs(
        &filtered_probs(&logits(), &params(|_| {})),
        &[0.1, 0.2, 0.3, 0.4],
    );
    // T = 2 takes square roots of the probabilities before renormalising.
    let roots: Vec<f64> = [1.0f64, 2.0, 3.0, 4.0].iter().map(|x| x.sqrt()).collect();
    let sum: f64 = roots.iter().sum();
    let want: Vec<f64> = roots.iter().map(|r| r / sum).collect();
    assert_probs(
        &filtered_probs(&logits(), &params(|p| p.temperature = 2.0)),
        &want,
    );
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let p = params(|p| p.top_k = 2);
    assert_probs(
        &filtered_probs(&logits(), &p),
        &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
    );
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    // 0.4 < 0.5 ≤ 0.4 + 0.3: two tokens.
    let p = params(|p| p.top_p = 0.5);
    assert_probs(
        &filtered_probs(&logits(), &p),
        &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
    );
    let p = params(|p| p.top_p = 0.4);
    assert_probs(&filtered_probs(&logits(), &p), &[0.0, 0.0, 0.0, 1.0]);
    let p = params(|p| p.top_p = 0.95);
    assert_probs(&filtered_probs(&logits(), &p), &[0.1, 0.2, 0.3, 0.4]);
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_top() {
    // Floor 0.45 × 0.4 = 0.18 keeps 0.2, 0.3, 0.4.
    let p = params(|p| p.min_p = 0.45);
    assert_probs(
        &filtered_probs(&logits(), &p),
        &[0.0, 2.0 / 9.0, 3.0 / 9.0, 4.0 / 9.0],
    );
}

#[test]
fn draws_follow_the_filtered_distribution() {
    let p = params(|p| {
        p.top_k = 2;
        p.seed = Some(1);
    });
    let mut s = SequenceSampler::new(&p, &[], 0);
    let mut counts = [0usize; 4];
    let n = 20000;
    for _ in 0..n {
        counts[s.sample(&logits()).unwrap().token_id as usize] += 1;
    }
    assert_eq!(counts[0] + counts[1], 0);
    let frac = counts[3] as f64 / n as f64;
    assert!((frac - 4.0 / 7.0).abs() < 0.015, "{frac}");
}

#[test]
fn seeded_sampling_is_reproducible_and_choices_differ() {
    let p = params(|p| p.seed = Some(42));
    let flat = vec![0.0f32; 1000];
    let run = |choice| {
        let mut s = SequenceSampler::new(&p, &[], choice);
        (0..16)
            .map(|_| s.sample(&flat).unwrap().token_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(0), run(0));
    assert_ne!(run(0), run(1));
}

#[test]
fn greedy_ignores_the_generator() {
    let p = SamplingParams::default();
    let mut s = SequenceSampler::new(&p, &[], 0);
    assert_eq!(s.sample(&logits()).unwrap().token_id, 3);
    assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1, "first maximum on ties");
}

#[test]
fn penalties_follow_their_definitions() {
    // Repetition 2 over the prompt: a positive logit is halved, a negative one doubled.
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::default()
    };
    let s = SequenceSampler::new(&p, &[0, 1], 0);
    let mut l = vec![4.0, -1.0, 3.0];
    s.apply_bias_and_penalties(&mut l);
    assert_eq!(l, vec![2.0, -2.0, 3.0]);

    // Presence 1 and frequency 0.5 after token 2 was generated twice: 3 − 1 − 2 × 0.5 = 1.
    let p = SamplingParams {
        presence_penalty: 1.0,
        frequency_penalty: 0.5,
        ..SamplingParams::default()
    };
    let mut s = SequenceSampler::new(&p, &[0], 0);
    s.sample(&[0.0, 0.0, 9.0]).unwrap();
    s.sample(&[0.0, 0.0, 9.0]).unwrap();
    let mut l = vec![1.0, 1.0, 3.0];
    s.apply_bias_and_penalties(&mut l);
    assert_eq!(l, vec![1.0, 1.0, 1.0]);

    // A logit bias moves the greedy choice.
    let p = SamplingParams {
        logit_bias: vec![(0, 10.0)],
        ..SamplingParams::default()
    };
    let mut s = SequenceSampler::new(&p, &[], 0);
    assert_eq!(s.sample(&logits()).unwrap().token_id, 0);
}

#[test]
fn logprobs_are_log_softmax_of_the_raw_logits() {
    let p = SamplingParams {
        logprobs: Some(2),
        ..SamplingParams::default()
    };
    let mut s = SequenceSampler::new(&p, &[], 0);
    let got = s.sample(&logits()).unwrap().logprobs.unwrap();
    assert_eq!(got.chosen.token_id, 3);
    assert!((got.chosen.logprob - 0.4f32.ln()).abs() < 1e-6);
    let top: Vec<u32> = got.top.iter().map(|t| t.token_id).collect();
    assert_eq!(top, vec![3, 2]);
    assert!((got.top[1].logprob - 0.3f32.ln()).abs() < 1e-6);
}

#[test]
fn unfiltered_temperature_draws_follow_softmax_and_match_the_device_draw() {
    // softmax(ln p / 2) ∝ √p for p = [0.1, 0.2, 0.3, 0.4], by the Gumbel-max path.
    let p = params(|p| {
        p.temperature = 2.0;
        p.seed = Some(3);
    });
    let mut s = SequenceSampler::new(&p, &[], 0);
    assert!(s.runs_on_device());
    let n = 20000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[s.sample(&logits()).unwrap().token_id as usize] += 1;
    }
    let want: Vec<f64> = [0.1f64, 0.2, 0.3, 0.4].iter().map(|p| p.sqrt()).collect();
    let total: f64 = want.iter().sum();
    for (i, w) in want.iter().enumerate() {
        let frac = counts[i] as f64 / n as f64;
        assert!((frac - w / total).abs() < 0.015, "{i}: {frac}");
    }
    // The device path (seed from device_params, draw by gumbel_argmax) picks the same tokens.
    let (mut host, mut device) = (
        SequenceSampler::new(&p, &[], 1),
        SequenceSampler::new(&p, &[], 1),
    );
    for _ in 0..50 {
        let (t, seed) = device.device_params();
        let drawn = crate::model::sampling::gumbel_argmax(&logits(), t, seed);
        assert_eq!(
            host.sample(&logits()).unwrap().token_id,
            device.record(drawn).token_id
        );
    }
}

#[test]
fn only_unfiltered_rows_without_host_needs_run_on_the_device() {
    let on = |f: fn(&mut SamplingParams)| SequenceSampler::new(&params(f), &[], 0).runs_on_device();
    assert!(on(|_| {}));
    assert!(on(|p| p.temperature = 0.0));
    assert!(!on(|p| p.top_p = 0.9));
    assert!(!on(|p| p.top_k = 5));
    assert!(!on(|p| p.min_p = 0.1));
    assert!(!on(|p| p.logprobs = Some(1)));
    assert!(!on(|p| p.presence_penalty = 0.5));
}

#[test]
fn a_vanishing_temperature_is_greedy() {
    // logits / 1e-38 would overflow f32 to +inf for every positive logit; it must stay the argmax.
    let p = params(|p| p.temperature = 1e-38);
    let mut s = SequenceSampler::new(&p, &[], 0);
    // Greedy where the logits are: the argmax (temperature 0), no seed taken.
    assert!(s.runs_on_device() && s.device_params() == (0.0, 0));
    assert_eq!(s.sample(&[0.5, 2.0, 1.0]).unwrap().token_id, 1);
}

#[test]
fn logits_with_nothing_finite_are_refused_not_a_panic() {
    // All-NaN rows once panicked in the top-k/top-p filter (no candidate left to keep).
    for f in [
        (|_: &mut SamplingParams| {}) as fn(&mut SamplingParams),
        |p| p.temperature = 0.0,
        |p| p.top_k = 2,
        |p| p.top_p = 0.5,
    ] {
        let mut s = SequenceSampler::new(&params(f), &[], 0);
        assert!(s.sample(&[f32::NAN; 4]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY; 4]).is_err());
    }
    // An infinite logit among finite ones: the filter keeps a token instead of indexing past its list.
    let probs = filtered_probs(&[f32::INFINITY, 1.0, 0.0], &params(|p| p.top_p = 0.5));
    assert_eq!(probs.len(), 3);
}
