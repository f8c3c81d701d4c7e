//! Fixed-shape decode steps (what a CUDA graph replays): padding rows must change nothing but the
//! cache's scratch block, and a padded step must compute what an unpadded one does.

mod common;

use candle_core::Tensor;
use common::{assert_close, Fixture};
use llava_server::model::attention::SequenceStep;
use llava_server::model::static_decode::{batch_sizes, DecodeRow, StaticDecode};
use llava_server::model::{AttentionMetadata, KvCache, LlavaModel};

const BLOCK: usize = 16;

fn cache_rows(kv: &KvCache) -> Vec<Vec<f32>> {
    let (k, v) = kv.layer(0);
    let mut rows = k
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    rows.extend(
        v.to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
    );
    rows
}

/// One decode token per row through the ordinary (unpadded) kernel-metadata path.
fn unpadded_logits(model: &LlavaModel, kv: &KvCache, rows: &[DecodeRow<'_>]) -> Tensor {
    let steps: Vec<SequenceStep<'_>> = rows
        .iter()
        .map(|r| SequenceStep {
            num_cached: r.position,
            num_new: 1,
            block_table: r.block_table,
        })
        .collect();
    let meta = AttentionMetadata::build_for(&steps, BLOCK, model.device(), true).unwrap();
    let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
    let tokens = Tensor::new(tokens, model.device()).unwrap();
    model.decode_logits(&tokens, &meta, kv).unwrap()
}

#[test]
fn padding_rows_write_only_the_scratch_block_and_change_no_result() {
    let fx = Fixture::load("tiny_gqa");
    let model = &fx.model;
    let blocks = 6;
    let (padded_kv, plain_kv) = (
        model.new_kv_cache(blocks, BLOCK).unwrap(),
        model.new_kv_cache(blocks, BLOCK).unwrap(),
    );
    let step = StaticDecode::new(4, 64, &padded_kv, model.device()).unwrap();
    let (first, second) = ([2u32, 4], [5u32]);
    // Two real rows (second block of one, first of the other) and two padding rows.
    let rows = [
        DecodeRow {
            token: 17,
            position: 0,
            block_table: &second,
        },
        DecodeRow {
            token: 9,
            position: 0,
            block_table: &first,
        },
    ];
    step.upload(&rows, &[]).unwrap();
    let out = step.run(model, &padded_kv).unwrap();
    let want = unpadded_logits(model, &plain_kv, &rows);
    let got = out.logits.narrow(0, 0, 2).unwrap();
    // Same tolerance as the HF parity checks: GEMMs over 4 rows instead of 2 may sum in another order.
    assert_close("padded vs unpadded logits", &got, &want, 1e-4);
    assert_eq!(
        out.argmax_rows(2).unwrap(),
        want.argmax(1).unwrap().to_vec1::<u32>().unwrap()
    );

    let (padded, plain) = (cache_rows(&padded_kv), cache_rows(&plain_kv));
    let slots = (blocks + 1) * BLOCK;
    let scratch = blocks * BLOCK;
    let real = [5 * BLOCK, 2 * BLOCK];
    for (i, (p, q)) in padded.iter().zip(&plain).enumerate() {
        let slot = i % slots;
        if slot >= scratch {
            continue;
        }
        if real.contains(&slot) {
            // K/V of the real rows: GEMMs over 4 rows instead of 2 may sum in another order.
            let diff = p
                .iter()
                .zip(q)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "slot {slot}: {diff}");
        } else {
            assert!(
                p.iter().all(|&x| x == 0.0),
                "slot {slot} written by padding"
            );
        }
    }
    for written in [5 * BLOCK, 2 * BLOCK, scratch] {
        assert!(
            padded[written].iter().any(|&x| x != 0.0),
            "slot {written} was not written"
        );
    }
}

#[test]
fn a_padded_decode_continues_a_prefill_with_hfs_tokens() {
    // The engine test covers many sequences; here one sequence decodes alone in a step of 2 rows.
    let fx = Fixture::load("tiny");
    let model = &fx.model;
    let case = fx.case("text_only");
    let prompt = fx
        .builder
        .tokenize(case["prompt"].as_str().unwrap(), fx.images(case))
        .unwrap();
    let want = common::ids(&case["greedy"]["ids"]);
    let len = prompt.token_ids.len();
    let table: Vec<u32> = (0..(len + want.len()).div_ceil(BLOCK) as u32).collect();
    let kv = model.new_kv_cache(table.len(), BLOCK).unwrap();
    let meta = AttentionMetadata::build_for(
        &[SequenceStep {
            num_cached: 0,
            num_new: len,
            block_table: &table,
        }],
        BLOCK,
        model.device(),
        true,
    )
    .unwrap();
    let ids = Tensor::new(prompt.token_ids.clone(), model.device()).unwrap();
    let logits = model.decode_logits(&ids, &meta, &kv).unwrap();
    let mut token = logits.get(len - 1).unwrap().argmax(0).unwrap();
    let mut got = vec![token.to_scalar::<u32>().unwrap()];
    let step = StaticDecode::new(
        2,
        model.config.text.max_position_embeddings,
        &kv,
        model.device(),
    )
    .unwrap();
    for position in len..len + want.len() - 1 {
        step.upload(
            &[DecodeRow {
                token: got[got.len() - 1],
                position,
                block_table: &table,
            }],
            &[],
        )
        .unwrap();
        token = step.run(model, &kv).unwrap().argmax;
        got.push(token.to_vec1::<u32>().unwrap()[0]);
    }
    assert_eq!(got, want);
}

#[test]
fn steps_that_do_not_fit_are_refused() {
    let fx = Fixture::load("tiny");
    let kv = fx.model.new_kv_cache(4, BLOCK).unwrap();
    let step = StaticDecode::new(1, 32, &kv, fx.model.device()).unwrap();
    let table = [0u32, 1, 2];
    let row = |position| DecodeRow {
        token: 1,
        position,
        block_table: &table,
    };
    assert!(
        step.pack(&[row(0), row(1)], &[]).is_err(),
        "two rows in one"
    );
    assert!(step.pack(&[row(32)], &[]).is_err(), "context beyond 32");
    assert!(step.pack(&[row(31)], &[]).is_ok());
    let short = [0u32];
    let beyond_table = DecodeRow {
        token: 1,
        position: 16,
        block_table: &short,
    };
    assert!(step.pack(&[beyond_table], &[]).is_err(), "table too short");
}

#[test]
fn batch_sizes_cover_every_batch_up_to_the_limit() {
    for max in [1, 3, 8, 100, 256, 1000] {
        let sizes = batch_sizes(max);
        assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
        assert_eq!(*sizes.last().unwrap(), max.min(256), "{sizes:?}");
        assert_eq!(sizes[0], 1);
    }
}
