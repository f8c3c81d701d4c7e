//! Sampling at batch 64 with 0, 8 and 64 rows under a JSON-schema grammar (structured outputs), on
//! the real LLaMA vocabulary of the tiny fixture (32,064 rows). Each step does what the engine does
//! around the forward pass: the plan, the grammar masks of the constrained rows (in parallel; the
//! engine runs them beside the forward pass), the device draw of the other rows (here the CPU
//! kernel), the copy of the host rows and the host sampling. A constrained row whose answer ends
//! starts a new one, so every step computes real masks. Two shapes of logits: flat (uniform in
//! [0, 8], where the temperature draw must draw every token's noise) and shaped as a language
//! model's at T = 1 (normal with σ = 3, one token per row 20 above the rest: the draw skips tokens
//! more than 20 nats below the top, here all but ~5%).
//!
//! Run: `cargo bench --bench sampling` (prints a table; no assertions).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use llava_server::engine::batch_sampler::{BatchSampler, StepLogits};
use llava_server::engine::runner::host_rows;
use llava_server::engine::sampler::SequenceSampler;
use llava_server::frontend::structured::StructuredOutputs;
use llava_server::model::sampling::sample_rows;
use llava_server::types::{OutputFormat, SamplingParams};
use rand::{Rng, SeedableRng};

const BATCH: u64 = 64;
const VOCAB: usize = 32064;
const EOS: u32 = 2;
const STEPS: usize = 200;

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "maxItems": 3, "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog", "llama"]}, "legs": {"type": "integer"}},
                "required": ["kind", "legs"], "additionalProperties": false}}
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false
    })
}

#[derive(Default)]
struct Times {
    masks: Duration,
    sample: Duration,
}

fn run(constrained: u64, outputs: &StructuredOutputs, spread: bool) -> Times {
    let grammar = outputs
        .compile(&OutputFormat::JsonSchema(schema()))
        .unwrap();
    let params = |row: u64| SamplingParams {
        temperature: 1.0,
        seed: Some(row),
        constraint: (row < constrained).then(|| grammar.clone()),
        ..SamplingParams::default()
    };
    let mut batch = BatchSampler::default();
    let rows: Vec<u64> = (0..BATCH).collect();
    for &row in &rows {
        batch.add(row, SequenceSampler::new(&params(row), &[], 0));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let logits: Vec<f32> = (0..BATCH as usize * VOCAB)
        .map(|i| {
            let (u, v) = (rng.random::<f32>().max(1e-9), rng.random::<f32>());
            if !spread {
                8.0 * u
            } else if i % VOCAB == 17 {
                20.0
            } else {
                // Box-Muller: a standard normal from two uniforms.
                3.0 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            }
        })
        .collect();
    let logits = Tensor::from_vec(logits, (BATCH as usize, VOCAB), &Device::Cpu).unwrap();
    let mut times = Times::default();
    for _ in 0..STEPS {
        let plan = batch.plan(&rows);
        let started = Instant::now();
        batch.prepare_masks(&rows);
        let masked = Instant::now();
        let tokens = if plan.has_device_rows() {
            sample_rows(&logits, &plan.device).unwrap()
        } else {
            Vec::new()
        };
        let step = StepLogits {
            tokens,
            host: host_rows(&logits, &plan.host_rows).unwrap(),
        };
        let sampled = batch.sample(&rows, &plan, &step);
        times.masks += masked - started;
        times.sample += masked.elapsed();
        for (row, s) in sampled {
            if s.unwrap().token_id == EOS && row < constrained {
                batch.add(row, SequenceSampler::new(&params(row), &[], 0));
            }
        }
    }
    times
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let outputs = StructuredOutputs::from_checkpoint(&dir, VOCAB, EOS).unwrap();
    println!(
        "sampling at batch {BATCH}, vocabulary {VOCAB}, {STEPS} steps, {} threads",
        rayon::current_num_threads()
    );
    println!("| logits | constrained rows | masks ms/step | sampling ms/step | total ms/step |");
    println!("|---|---:|---:|---:|---:|");
    for spread in [false, true] {
        for constrained in [0, 8, 64] {
            let t = run(constrained, &outputs, spread);
            let ms = |d: Duration| d.as_secs_f64() * 1e3 / STEPS as f64;
            println!(
                "| {} | {constrained} | {:.3} | {:.3} | {:.3} |",
                if spread { "LM-shaped" } else { "flat" },
                ms(t.masks),
                ms(t.sample),
                ms(t.masks + t.sample)
            );
        }
    }
}
