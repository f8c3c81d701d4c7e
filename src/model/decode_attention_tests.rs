//! Tests of `decode_attention`: against attention written out from its definition.

use super::*;
use candle_core::Device;

/// Attention written out from its definition, in f64, for one query head.
fn by_definition(q: &[f32], ks: &[&[f32]], vs: &[&[f32]], scale: f64) -> Vec<f64> {
    let scores: Vec<f64> = ks
        .iter()
        .map(|k| {
            q.iter()
                .zip(*k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = w.iter().sum();
    let mut out = vec![0f64; q.len()];
    for (wi, v) in w.iter().zip(vs) {
        for (o, x) in out.iter_mut().zip(*v) {
            *o += wi / total * *x as f64;
        }
    }
    out
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    // Deterministic, spread over [-2, 2], no two neighbours alike.
    (0..n)
        .map(|i| 2.0 * ((i as f32 * 0.754_877 + seed as f32 * 1.3).sin()))
        .collect()
}

/// Runs the in-place path on a pool of `pool_slots` rows (`tokens` query rows, `decodes` among them)
/// and checks every output head against the definition; returns the outputs.
fn check_against_the_definition(
    shape: Heads,
    pool_slots: usize,
    tokens: usize,
    decodes: &[DecodeQuery<'_>],
) -> Vec<f32> {
    let Heads {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let row = kv_heads * d;
    let dev = Device::Cpu;
    let keys = values(pool_slots * row, 1);
    let vals = values(pool_slots * row, 2);
    let qs = values(tokens * heads * d, 3);
    let scale = 0.3f32;
    let out = in_place(
        &Tensor::from_vec(qs.clone(), (tokens, heads, d), &dev).unwrap(),
        &Tensor::from_vec(keys.clone(), (pool_slots, row), &dev).unwrap(),
        &Tensor::from_vec(vals.clone(), (pool_slots, row), &dev).unwrap(),
        decodes,
        shape,
        scale,
    )
    .unwrap()
    .expect("f32 CPU tensors take the in-place path");
    for (i, decode) in decodes.iter().enumerate() {
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let cell = |data: &[f32], s: u32| data[s as usize * row + kvh * d..][..d].to_vec();
            let ks: Vec<Vec<f32>> = decode.slots.iter().map(|&s| cell(&keys, s)).collect();
            let vs: Vec<Vec<f32>> = decode.slots.iter().map(|&s| cell(&vals, s)).collect();
            let q = &qs[(decode.token * heads + h) * d..][..d];
            let want = by_definition(
                q,
                &ks.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                &vs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                scale as f64,
            );
            let got = &out[(i * heads + h) * d..][..d];
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "sequence {i}, head {h}: {g} vs {w}"
                );
            }
        }
    }
    out
}

#[test]
fn matches_the_definition_through_scattered_slots_with_grouped_heads() {
    // d not a multiple of 8: the dot's tail is used.
    let shape = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 12,
    };
    // Token 1 is a prefill token the caller handles elsewhere: only tokens 0 and 2 decode here.
    let slots_a: Vec<u32> = vec![7, 3, 30, 31, 0];
    let slots_b: Vec<u32> = vec![12];
    let decodes = [
        DecodeQuery {
            token: 0,
            slots: &slots_a,
        },
        DecodeQuery {
            token: 2,
            slots: &slots_b,
        },
    ];
    let out = check_against_the_definition(shape, 40, 3, &decodes);
    // A single key: the output is that key's value row exactly.
    let vals = values(40 * 24, 2);
    assert_eq!(&out[4 * 12..][..12], &vals[12 * 24..][..12]);
}

#[test]
fn sequences_sharing_a_prefix_match_the_definition() {
    // Three sequences share 20 slots (one of them has nothing else); a fourth reads some of those
    // slots after its own, so shares no prefix; two more share 3 slots (below a block): neither is
    // grouped. Both kernels: d = 16 (eight lanes) and d = 12 (the scalar loop).
    let prefix: Vec<u32> = (40..60).collect();
    let with = |tail: &[u32]| -> Vec<u32> { prefix.iter().chain(tail).copied().collect() };
    let (a, b, c) = (with(&[3, 9]), with(&[90]), prefix.clone());
    let later: Vec<u32> = (60..70).chain(40..45).collect();
    let (e, f) = (vec![5, 6, 7, 100], vec![5, 6, 7, 101, 102]);
    let contexts = [&a, &b, &c, &later, &e, &f];
    let decodes: Vec<DecodeQuery<'_>> = contexts
        .iter()
        .enumerate()
        .map(|(i, slots)| DecodeQuery {
            token: 2 * i,
            slots,
        })
        .collect();
    assert_eq!(
        shared_prefixes(&decodes),
        vec![SharedPrefix {
            members: vec![0, 1, 2],
            len: 20,
        }]
    );
    for (heads, kv_heads, head_dim) in [(8, 4, 16), (4, 2, 12), (4, 4, 16)] {
        let shape = Heads {
            heads,
            kv_heads,
            head_dim,
        };
        check_against_the_definition(shape, 110, 12, &decodes);
    }
}

#[test]
fn a_group_shares_only_the_prefix_common_to_all_its_members() {
    // All start at slot 0; two share 40 slots, the third only 18 of them: the group's shared part is 18.
    let a: Vec<u32> = (0..40).chain([50]).collect();
    let b: Vec<u32> = (0..40).chain([51, 52]).collect();
    let c: Vec<u32> = (0..18).chain(60..64).collect();
    let decodes: Vec<DecodeQuery<'_>> = [&a, &b, &c]
        .iter()
        .enumerate()
        .map(|(i, slots)| DecodeQuery { token: i, slots })
        .collect();
    assert_eq!(
        shared_prefixes(&decodes),
        vec![SharedPrefix {
            members: vec![0, 1, 2],
            len: 18,
        }]
    );
    let shape = Heads {
        heads: 4,
        kv_heads: 4,
        head_dim: 8,
    };
    check_against_the_definition(shape, 70, 3, &decodes);
}

#[test]
fn refuses_other_dtypes_and_slots_outside_the_pool() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 2, 8), candle_core::DType::F16, &dev).unwrap();
    let cache = Tensor::zeros((4, 16), candle_core::DType::F16, &dev).unwrap();
    let shape = Heads {
        heads: 2,
        kv_heads: 2,
        head_dim: 8,
    };
    let decode = [DecodeQuery {
        token: 0,
        slots: &[0],
    }];
    let r = in_place(&q, &cache, &cache, &decode, shape, 1.0).unwrap();
    assert!(r.is_none(), "f16 tensors take the reference path");
    let q = q.to_dtype(candle_core::DType::F32).unwrap();
    let cache = cache.to_dtype(candle_core::DType::F32).unwrap();
    let outside = [DecodeQuery {
        token: 0,
        slots: &[4],
    }];
    assert!(in_place(&q, &cache, &cache, &outside, shape, 1.0).is_err());
}

#[test]
fn long_contexts_and_wide_heads_match_the_definition() {
    // Contexts across several chunks of the weighted sum (64 slots) with a short last chunk of
    // scores, heads wider than one set of accumulators (96, 128), two sequences sharing 100 slots.
    let shared: Vec<u32> = (0..100).collect();
    let a: Vec<u32> = shared.iter().copied().chain(200..253).collect();
    let b: Vec<u32> = shared.iter().copied().chain([300]).collect();
    let c: Vec<u32> = (150..221).collect();
    let decodes: Vec<DecodeQuery<'_>> = [&a, &b, &c]
        .iter()
        .enumerate()
        .map(|(i, slots)| DecodeQuery { token: i, slots })
        .collect();
    for (heads, kv_heads, head_dim) in [(4, 2, 96), (2, 2, 128)] {
        let shape = Heads {
            heads,
            kv_heads,
            head_dim,
        };
        check_against_the_definition(shape, 310, 3, &decodes);
    }
}
