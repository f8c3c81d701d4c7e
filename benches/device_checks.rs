//! Device correctness checks (run by `serving --check` on the lent GPU, before any timing): every
//! kernel on fresh random inputs against its CPU reference in f32 (relative error ≤ 1e-2 in bf16,
//! ≤ 1e-3 in f16), outputs poisoned first; and the tiny fixtures end to end in bf16 against HF's greedy
//! tokens (≥ 95% of the first 16 agree per case); and decode steps replayed from a CUDA graph against
//! eager steps. A failed check panics with what failed.

use candle_core::{DType, Device, Tensor};
use llava_kernels as k;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let got = got
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let want = want
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff = (got - &want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (diff / norm).sqrt()
}

/// Fills the device's free memory pool with NaN-patterned allocations and frees them, so that a
/// kernel that skips writing part of its output shows up as NaN.
fn poison(dev: &Device) {
    let junk = Tensor::full(f32::NAN, 64 << 20, dev).unwrap();
    drop(junk);
}

const CASES: [(DType, f32); 2] = [(DType::BF16, 1e-2), (DType::F16, 1e-3)];

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn elementwise_kernels_match_the_cpu_reference() {
    let dev = gpu();
    for (dtype, tol) in CASES {
        let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let (x, r, w) = (randn(&[37, 4096]), randn(&[37, 4096]), randn(&[4096]));
        let (want, _) = k::add_rms_norm(&x, &r, &w, 1e-5).unwrap();
        poison(&dev);
        let (got, _) = k::add_rms_norm(&on(&x), &on(&r), &on(&w), 1e-5).unwrap();
        assert!(
            rel_err(&got, &want) <= tol,
            "add_rms_norm {dtype:?}: {}",
            rel_err(&got, &want)
        );

        let gate_up = randn(&[37, 2 * 11008]);
        let want = k::silu_mul(&gate_up).unwrap();
        poison(&dev);
        let got = k::silu_mul(&on(&gate_up)).unwrap();
        assert!(rel_err(&got, &want) <= tol, "silu_mul {dtype:?}");

        // Merged qkv rows of a GQA layer: 32 q heads, 8 kv heads of 128.
        let qkv = randn(&[37, (32 + 2 * 8) * 128]);
        let angles = randn(&[4096, 64]);
        let table = Tensor::cat(&[&angles.cos().unwrap(), &angles.sin().unwrap()], 1).unwrap();
        let pos: Vec<u32> = (0..37).map(|i| (i * 97) % 4096).collect();
        let pos = Tensor::new(pos, &Device::Cpu).unwrap();
        let (want_q, want_k) = k::rotary_qk(&qkv, &table, &pos, 32, 8).unwrap();
        poison(&dev);
        let (got_q, got_k) = k::rotary_qk(
            &on(&qkv),
            &table.to_device(&dev).unwrap(),
            &pos.to_device(&dev).unwrap(),
            32,
            8,
        )
        .unwrap();
        let (got, want) = (
            Tensor::cat(
                &[got_q.flatten_all().unwrap(), got_k.flatten_all().unwrap()],
                0,
            )
            .unwrap(),
            Tensor::cat(
                &[want_q.flatten_all().unwrap(), want_k.flatten_all().unwrap()],
                0,
            )
            .unwrap(),
        );
        assert!(rel_err(&got, &want) <= tol, "rotary {dtype:?}");
    }
}

fn attention_kernels_match_the_cpu_reference() {
    let dev = gpu();
    // Two sequences (1100 and 257 tokens: decode splits them in 5 partitions of 224, 3 of them empty
    // for the shorter one), interleaved blocks of 16.
    let (block_size, max_blocks) = (16usize, 80usize);
    let tables: Vec<u32> = (0..2)
        .flat_map(|s| (0..max_blocks).map(move |b| (b * 2 + s) as u32))
        .collect();
    for (heads, kv_heads, dim) in [(32, 32, 128), (16, 16, 64), (32, 8, 128)] {
        for (dtype, tol) in CASES {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let slots = 2 * max_blocks * block_size;
            let (kc, vc) = (
                randn(&[slots, kv_heads * dim]),
                randn(&[slots, kv_heads * dim]),
            );
            let paged = |d: &Device| k::PagedLayout {
                block_tables: Tensor::from_vec(tables.clone(), (2, max_blocks), d).unwrap(),
                block_size,
                num_kv_heads: kv_heads,
            };
            let scale = (dim as f32).powf(-0.5);
            // Prefill beside a decode: 1 new token after 1050 cached of sequence 0 (a single query),
            // 40 new after 300 cached of sequence 1 (tiles of 16, 16 and 8 over 11 key tiles).
            let positions: Vec<u32> = std::iter::once(1050).chain(300..340).collect();
            let token_seq: Vec<u32> = std::iter::once(0)
                .chain(std::iter::repeat_n(1, 40))
                .collect();
            let (tiles, singles) = k::prefill_work(&[1, 40]);
            let work = |d: &Device| k::PrefillWork {
                tiles: Tensor::new(tiles.as_slice(), d).unwrap(),
                singles: Tensor::new(singles.as_slice(), d).unwrap(),
            };
            let q = randn(&[41, heads, dim]);
            let (pos, seq) = (
                Tensor::new(positions, &Device::Cpu).unwrap(),
                Tensor::new(token_seq, &Device::Cpu).unwrap(),
            );
            let want = k::prefill_attention(
                &q,
                &kc,
                &vc,
                &pos,
                &seq,
                &work(&Device::Cpu),
                &paged(&Device::Cpu),
                scale,
            )
            .unwrap();
            poison(&dev);
            let got = k::prefill_attention(
                &on(&q),
                &on(&kc),
                &on(&vc),
                &pos.to_device(&dev).unwrap(),
                &seq.to_device(&dev).unwrap(),
                &work(&dev),
                &paged(&dev),
                scale,
            )
            .unwrap();
            assert!(
                rel_err(&got, &want) <= tol,
                "prefill {heads}/{kv_heads}/{dim} {dtype:?}: {}",
                rel_err(&got, &want)
            );
            // Decode over long contexts.
            let lens = Tensor::new(&[1100u32, 257], &Device::Cpu).unwrap();
            let qd = randn(&[2, heads, dim]);
            let want = k::decode_attention(&qd, &kc, &vc, &lens, 1100, &paged(&Device::Cpu), scale)
                .unwrap();
            poison(&dev);
            let got = k::decode_attention(
                &on(&qd),
                &on(&kc),
                &on(&vc),
                &lens.to_device(&dev).unwrap(),
                1100,
                &paged(&dev),
                scale,
            )
            .unwrap();
            assert!(
                rel_err(&got, &want) <= tol,
                "decode {heads}/{kv_heads}/{dim} {dtype:?}: {}",
                rel_err(&got, &want)
            );
        }
    }
}

fn write_kv_writes_exactly_its_slots() {
    let dev = gpu();
    let cache = Tensor::full(f32::NAN, (64, 256), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let src = randn(&[3, 256]);
    let slots = Tensor::new(&[5u32, 0, 63], &dev).unwrap();
    // The rows as a column slice of wider rows (as v is of the merged qkv rows), read in place.
    let wide = Tensor::cat(&[&randn(&[3, 40]), &src], 1)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    k::write_kv(&cache, &wide.narrow(1, 40, 256).unwrap(), &slots).unwrap();
    let cache = cache
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for (row, slot) in [(0usize, 5usize), (1, 0), (2, 63)] {
        assert!(rel_err(&cache.get(slot).unwrap(), &src.get(row).unwrap()) < 1e-2);
    }
    let untouched = cache.get(6).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        untouched.iter().all(|v| v.is_nan()),
        "a slot that was not named changed"
    );
}

fn tiny_fixtures_in_bf16_agree_with_hf_greedy_tokens() {
    use llava_server::engine::{self, EngineConfig};
    use llava_server::frontend::{ImageProcessorConfig, PromptBuilder};
    use llava_server::types::SamplingParams;
    let fixtures = std::path::Path::new("tests/fixtures");
    for variant in ["tiny", "tiny_gqa"] {
        let dir = fixtures.join(variant);
        let (model, assets) = llava_server::model::load_model(
            dir.to_str().unwrap(),
            llava_server::model::LoadFormat::Auto,
            DType::BF16,
            &gpu(),
        )
        .unwrap();
        let builder = PromptBuilder::from_checkpoint(&assets.root, &model.config).unwrap();
        let processor = ImageProcessorConfig::for_checkpoint(&assets.root, &model.config).unwrap();
        let refs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join(format!("refs/{variant}.json"))).unwrap(),
        )
        .unwrap();
        let engine = engine::start(
            model,
            EngineConfig {
                num_kv_blocks: Some(256),
                ..EngineConfig::default()
            },
        )
        .unwrap();
        for case in refs["cases"].as_array().unwrap() {
            let files: Vec<String> = match (&case["images"], &case["image"]) {
                (serde_json::Value::Array(l), _) => {
                    l.iter().map(|v| v.as_str().unwrap().to_owned()).collect()
                }
                (_, serde_json::Value::String(one)) => vec![one.clone()],
                _ => vec![],
            };
            let images = files
                .iter()
                .map(|f| {
                    processor
                        .process_bytes(&std::fs::read(fixtures.join("images").join(f)).unwrap())
                        .unwrap()
                })
                .collect();
            let prompt = builder
                .tokenize(case["prompt"].as_str().unwrap(), images)
                .unwrap();
            let want: Vec<u32> = case["greedy"]["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let params = SamplingParams {
                max_tokens: 16,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            let events = engine::collect_blocking(engine.submit(prompt, params).unwrap()).unwrap();
            let got: Vec<u32> = events.iter().flat_map(|e| e.token_ids.clone()).collect();
            // The f32 CPU run gives exactly HF's tokens (tests/hf_parity.rs), so they are the yardstick.
            let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
            println!(
                "{variant}/{}: {agree}/16 greedy tokens agree in bf16",
                case["name"]
            );
            assert!(
                agree as f64 >= 0.95 * 16.0,
                "{variant}/{}: only {agree}/16",
                case["name"]
            );
        }
    }
}

/// Tokens drawn on the device equal the CPU reference's (same seeds, same Gumbel noise function); the
/// GPU's fast logarithm may flip a draw whose two best scores nearly tie, so 99% must agree, and every
/// greedy row exactly.
fn device_draws_match_the_cpu_reference() {
    let dev = gpu();
    let (rows, vocab) = (64usize, 32064usize);
    let logits = (randn(&[rows, vocab]) * 3.0).unwrap();
    let params: Vec<(f32, u64)> = (0..rows)
        .map(|r| {
            let t = [0.0f32, 0.3, 1.0, 1.7][r % 4];
            (t, (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xABCD)
        })
        .collect();
    let packed = k::sampling_params(&params);
    let want = k::sample_rows(
        &logits,
        &Tensor::new(packed.as_slice(), &Device::Cpu).unwrap(),
    )
    .unwrap()
    .to_vec1::<u32>()
    .unwrap();
    let got = k::sample_rows(
        &logits.to_device(&dev).unwrap(),
        &Tensor::new(packed.as_slice(), &dev).unwrap(),
    )
    .unwrap()
    .to_vec1::<u32>()
    .unwrap();
    let agree = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(agree * 100 >= 99 * rows, "draws agree on {agree}/{rows}");
    for r in (0..rows).step_by(4) {
        assert_eq!(got[r], want[r], "greedy row {r}");
    }
}

/// A small decoder with head dim 64 and GQA (the tiny fixtures' head dims have no fused kernels).
const SMALL_DECODER: &str = r#"{
  "model_type": "llava", "image_token_index": 32000, "vocab_size": 32064,
  "text_config": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
    "max_position_embeddings": 4096, "vocab_size": 32064},
  "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "image_size": 336,
    "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 1, "patch_size": 14}
}"#;

/// Decode steps replayed from a captured CUDA graph (padded 3 → 4 rows, contexts across partitions)
/// give the logits of eager unpadded steps; also times both.
fn decode_graphs_replay_what_eager_steps_compute() {
    use llava_server::model::attention::SequenceStep;
    use llava_server::model::cuda_graph::CapturedDecode;
    use llava_server::model::static_decode::{DecodeRow, StaticDecode};
    use llava_server::model::{AttentionMetadata, LlavaConfig, LlavaModel};
    let dev = gpu();
    let config = LlavaConfig::from_json(SMALL_DECODER).unwrap();
    let model = LlavaModel::dummy(config, DType::BF16, &dev).unwrap();
    let (bs, steps) = (16, 8);
    let lens = [40usize, 517, 1100];
    let per_seq = (1100usize + steps + 64).div_ceil(bs);
    let kv = model.new_kv_cache(per_seq * 3, bs).unwrap();
    let tables: Vec<Vec<u32>> = (0..3u32)
        .map(|i| (i * per_seq as u32..(i + 1) * per_seq as u32).collect())
        .collect();
    let eager = |rows: &[DecodeRow<'_>]| -> Tensor {
        let steps: Vec<SequenceStep<'_>> = rows
            .iter()
            .map(|r| SequenceStep {
                num_cached: r.position,
                num_new: 1,
                block_table: r.block_table,
            })
            .collect();
        let meta = AttentionMetadata::build_for(&steps, bs, &dev, true).unwrap();
        let ids = Tensor::new(rows.iter().map(|r| r.token).collect::<Vec<_>>(), &dev).unwrap();
        model.decode_logits(&ids, &meta, &kv).unwrap()
    };
    let mut last = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let ids: Vec<u32> = (0..len as u32)
            .map(|t| (t * 7919 + i as u32 * 31) % 32000)
            .collect();
        let meta = AttentionMetadata::build_for(
            &[SequenceStep {
                num_cached: 0,
                num_new: len,
                block_table: &tables[i],
            }],
            bs,
            &dev,
            true,
        )
        .unwrap();
        let logits = model
            .decode_logits(&Tensor::new(ids, &dev).unwrap(), &meta, &kv)
            .unwrap();
        last.push(
            logits
                .get(len - 1)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap(),
        );
    }
    let step = StaticDecode::new(4, 4096, &kv, &dev).unwrap();
    let graph = CapturedDecode::capture(&step, &model, &kv).expect("capture");
    let mut agree = 0;
    for t in 0..steps {
        let rows: Vec<DecodeRow<'_>> = (0..3)
            .map(|i| DecodeRow {
                token: last[i],
                position: lens[i] + t,
                block_table: &tables[i],
            })
            .collect();
        // Eager first (it writes this position's K/V); the replay rewrites the same slots.
        let want = eager(&rows);
        step.upload(&rows, &[]).unwrap();
        let got = graph.replay().unwrap().logits.narrow(0, 0, 3).unwrap();
        let err = rel_err(&got, &want);
        assert!(err <= 1e-2, "step {t}: graph vs eager relative error {err}");
        let (g, w) = (
            got.argmax(1).unwrap().to_vec1::<u32>().unwrap(),
            want.argmax(1).unwrap().to_vec1::<u32>().unwrap(),
        );
        agree += g.iter().zip(&w).filter(|(a, b)| a == b).count();
        last = w;
    }
    assert!(
        agree as f64 >= 0.95 * (3 * steps) as f64,
        "argmax agrees on {agree}/{}",
        3 * steps
    );
    // Timing of the same 3-row step both ways (positions stay put: K/V rewritten in place).
    let rows: Vec<DecodeRow<'_>> = (0..3)
        .map(|i| DecodeRow {
            token: last[i],
            position: lens[i] + steps,
            block_table: &tables[i],
        })
        .collect();
    let time = |f: &dyn Fn()| {
        f();
        dev.synchronize().unwrap();
        let started = std::time::Instant::now();
        for _ in 0..50 {
            f();
        }
        dev.synchronize().unwrap();
        started.elapsed().as_secs_f64() * 1e3 / 50.0
    };
    let eager_ms = time(&|| drop(eager(&rows)));
    let graph_ms = time(&|| {
        step.upload(&rows, &[]).unwrap();
        graph.replay().unwrap();
    });
    println!(
        "decode step of a 4-layer decoder, 3 rows: eager {eager_ms:.3} ms, graph {graph_ms:.3} ms"
    );
}

/// Runs every check; panics on the first failure.
pub fn run_all() {
    elementwise_kernels_match_the_cpu_reference();
    println!("ok: add_rms_norm, silu_mul, rotary_qk (bf16 ≤ 1e-2, f16 ≤ 1e-3)");
    attention_kernels_match_the_cpu_reference();
    println!("ok: prefill and decode attention (head dims 64/128, GQA, 5 partitions, empty ones)");
    write_kv_writes_exactly_its_slots();
    println!("ok: write_kv (strided source rows)");
    device_draws_match_the_cpu_reference();
    println!("ok: sample_rows (Gumbel-max draws and argmax as the CPU reference)");
    tiny_fixtures_in_bf16_agree_with_hf_greedy_tokens();
    println!("ok: tiny fixtures end to end in bf16");
    decode_graphs_replay_what_eager_steps_compute();
    println!("ok: CUDA-graph decode steps equal eager ones (bf16 ≤ 1e-2, argmax ≥ 95%)");
}
