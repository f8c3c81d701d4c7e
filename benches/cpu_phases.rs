//! The CPU model's phases, without the server around them: vision tower, vision + projector, a
//! prefill of N text tokens, and decode steps of 1 and 16 sequences over a context of C tokens
//! (16 distinct contexts, or 16 that share all but their last two blocks, as 16 streams on one image
//! do). Prints the best of several runs of each; the step at 16 against the step at 1 is issue 14's
//! "16-sequence decode step ≤ 2× a 1-sequence step".
//!   cargo bench --bench cpu_phases [-- --model DIR|llava-mid] [--prefill N] [--context C] [--f16]
//!     [--decode-only] [--runs R]
//! Default model: target/llava-mid if it exists (`python benches/cpu_side_by_side.py make-mid`), else
//! the built-in llava-mid shapes with random weights. `LLAVA_SERVER_CPU_DECODE_KERNELS=off` compares
//! against candle's own ops. `--decode-only` skips vision and prefill, and `--runs R` times each step R
//! times (default 10), for `perf record` of the decode steps alone.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use llava_server::model::attention::{AttentionMetadata, SequenceAttention, SequenceStep};
use llava_server::model::decode_attention::{decode_attention_in_place, DecodeQuery, Heads};
use llava_server::model::kv_cache::KvCache;
use llava_server::model::llava::{ForwardInput, LlavaModel};
use llava_server::model::{load_model, LoadFormat};

const BLOCK: usize = 16;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn best_of(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn prefill(model: &LlavaModel, kv: &KvCache, n: usize) -> anyhow::Result<()> {
    let dev = model.device();
    let table: Vec<u32> = (0..n.div_ceil(BLOCK) as u32).collect();
    let ids: Vec<u32> = (0..n as u32).map(|i| i % 30000 + 10).collect();
    let meta = AttentionMetadata::build(
        &[SequenceStep {
            num_cached: 0,
            num_new: n,
            block_table: &table,
        }],
        BLOCK,
        dev,
    )?;
    let input = ForwardInput {
        token_ids: &Tensor::new(ids, dev)?,
        image_rows: None,
        attention: &meta,
        logits_rows: &Tensor::new(&[(n - 1) as u32], dev)?,
    };
    model.forward(&input, kv)?;
    Ok(())
}

/// One layer's decode attention for the step's sequences, without the rest of the step.
fn attention_alone(
    model: &LlavaModel,
    kv: &KvCache,
    meta: &AttentionMetadata,
    runs: usize,
    what: &str,
) -> anyhow::Result<()> {
    let text = &model.config.text;
    let kv_heads = text.num_key_value_heads;
    let d = text.hidden_size / text.num_attention_heads;
    let shape = Heads {
        heads: text.num_attention_heads,
        kv_heads,
        head_dim: d,
    };
    let decodes: Vec<DecodeQuery<'_>> = meta
        .sequences
        .iter()
        .filter_map(SequenceAttention::as_decode)
        .collect();
    let dev = model.device();
    let queries = Tensor::randn(0f32, 1.0, (decodes.len(), shape.heads, d), dev)?;
    let (k, v) = kv.layer(0);
    let alone = best_of(runs, || {
        decode_attention_in_place(&queries, k, v, &decodes, shape, 0.125)?;
        Ok(())
    })?;
    println!(
        "| {what}: one layer's attention alone | {:.2} |",
        alone * 1e3
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    llava_server::model::fix_cpu_thread_count();
    // On a worker of the compute pool, as the server runs its CPU steps (`engine::step`).
    rayon::scope(|_| phases())
}

fn phases() -> anyhow::Result<()> {
    let default_dir = std::path::Path::new("target/llava-mid");
    let spec = arg("--model").unwrap_or_else(|| match default_dir.is_dir() {
        true => default_dir.display().to_string(),
        false => "llava-mid".into(),
    });
    let format = match std::path::Path::new(&spec).is_dir() {
        true => LoadFormat::Auto,
        false => LoadFormat::Dummy,
    };
    let prefill_tokens: usize = arg("--prefill").map_or(Ok(600), |v| v.parse())?;
    let context: usize = arg("--context").map_or(Ok(650), |v| v.parse())?;
    let dev = Device::Cpu;
    let (mut model, _) = load_model(&spec, format, DType::F32, &dev)?;
    if std::env::args().any(|a| a == "--f16") {
        model.store_decoder_weights_f16()?;
    }
    let decode_only = std::env::args().any(|a| a == "--decode-only");
    let runs: usize = arg("--runs").map_or(Ok(10), |v| v.parse())?;
    println!(
        "model {spec}, {} threads; best of 5 (phases) and {runs} (decode steps)\n",
        rayon::current_num_threads()
    );

    let side = model.config.vision.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, side, side), &dev)?;
    if !decode_only {
        let vision = best_of(5, || Ok(model.vision_features(&pixels).map(drop)?))?;
        let encode = best_of(5, || Ok(model.encode_images(&pixels).map(drop)?))?;
        let kv = model.new_kv_cache(prefill_tokens.div_ceil(BLOCK) + 1, BLOCK)?;
        let pre = best_of(5, || prefill(&model, &kv, prefill_tokens))?;
        println!("| phase | seconds |\n|---|---|");
        println!("| vision tower, one image | {vision:.3} |");
        println!("| vision tower + projector | {encode:.3} |");
        println!("| prefill of {prefill_tokens} text tokens | {pre:.3} |");
    }

    // 16 sequences of `context` cached tokens: block tables either all distinct, or sharing every
    // block but the last two.
    let per = context.div_ceil(BLOCK) + 1;
    let kv = model.new_kv_cache(16 * per + 1, BLOCK)?;
    for layer in 0..model.config.text.num_hidden_layers {
        let (k, v) = kv.layer(layer);
        let noise = Tensor::randn(0f32, 1.0, k.dims(), &dev)?;
        k.slice_set(&noise, 0, 0)?;
        v.slice_set(&noise, 0, 0)?;
    }
    println!("\n| decode step, {context} tokens of context | ms |\n|---|---|");
    for shared in [false, true] {
        let tables: Vec<Vec<u32>> = (0..16)
            .map(|s| {
                (0..per)
                    .map(|b| match shared && b + 2 < per {
                        true => b as u32,
                        false => (s * per + b) as u32,
                    })
                    .collect()
            })
            .collect();
        for batch in [1usize, 16] {
            let what = match (batch, shared) {
                (1, true) => continue,
                (1, false) => "1 sequence".to_string(),
                (_, true) => format!("{batch} sequences sharing their prefix"),
                (_, false) => format!("{batch} sequences, distinct contexts"),
            };
            let steps: Vec<SequenceStep> = tables[..batch]
                .iter()
                .map(|t| SequenceStep {
                    num_cached: context,
                    num_new: 1,
                    block_table: t,
                })
                .collect();
            let meta = AttentionMetadata::build(&steps, BLOCK, &dev)?;
            if batch > 1 {
                attention_alone(&model, &kv, &meta, runs, &what)?;
            }
            let ids = Tensor::new((0..batch as u32).map(|i| i + 100).collect::<Vec<_>>(), &dev)?;
            let step = best_of(runs, || {
                Ok(model.decode_logits(&ids, &meta, &kv).map(drop)?)
            })?;
            println!("| {what} | {:.1} |", step * 1e3);
        }
    }
    Ok(())
}
