//! Serving benchmark (the GPU issue's scenarios), on any device: the card's copy bandwidth and GEMM
//! rate, S1 batch-1 decode against the weight-read floor, S2 one-image TTFT split into preprocessing,
//! CLIP and prefill, S4 text throughput, S5 image load. Prints a markdown table and writes it to
//! `--out` (default `benches/results/<date>-<device>.md`).
//!
//! GPU: `cargo bench --features cuda --bench serving -- --model llava-1.5-7b --load-format dummy
//!       --device cuda:0 --dtype bf16` (see benches/device/README.md).
//! CPU smoke run: `cargo bench --bench serving -- --model tests/fixtures/tiny --quick`.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use llava_server::engine::{self, DecodeGraphs, EngineConfig, EngineHandle};
use llava_server::frontend::{ChatMessage, ImageProcessorConfig, MessagePart, PromptBuilder, Role};
use llava_server::model::{load_model, parse_device, parse_dtype, LoadFormat};
use llava_server::types::{ProcessedImage, SamplingParams, TokenizedPrompt};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "llava-1.5-7b")]
    model: String,
    #[arg(long, default_value = "dummy")]
    load_format: LoadFormat,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Small request counts, for a smoke run on the CPU.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    out: Option<String>,
    #[arg(long, default_value = "s1,s2,s4,s4t,s5")]
    scenarios: String,
    /// Run the device correctness checks (kernels, bf16 end to end) before any timing.
    #[arg(long)]
    check: bool,
    /// No CUDA graphs for decode steps (to measure what they save).
    #[arg(long)]
    enforce_eager: bool,
    /// cargo bench passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn sync(device: &Device) {
    device.synchronize().expect("device sync");
}

/// Device copy bandwidth (read + write) in GB/s over a 512 MiB buffer (64 MiB on the CPU).
fn copy_bandwidth(device: &Device) -> f64 {
    let bytes = if device.is_cpu() { 64 << 20 } else { 512 << 20 };
    let t = Tensor::zeros(bytes / 4, DType::F32, device).unwrap();
    let _ = t.copy().unwrap();
    sync(device);
    let runs = 10;
    let started = Instant::now();
    for _ in 0..runs {
        let _ = t.copy().unwrap();
    }
    sync(device);
    2.0 * bytes as f64 * runs as f64 / started.elapsed().as_secs_f64() / 1e9
}

/// Square GEMM rate in TFLOP/s (8192³ on a GPU, 1024³ on the CPU) in the compute dtype.
fn gemm_rate(device: &Device, dtype: DType) -> f64 {
    let n = if device.is_cpu() { 1024 } else { 8192 };
    let a = Tensor::randn(0f32, 1f32, (n, n), device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let b = Tensor::randn(0f32, 1f32, (n, n), device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let _ = a.matmul(&b).unwrap();
    sync(device);
    let runs = if device.is_cpu() { 3 } else { 20 };
    let started = Instant::now();
    for _ in 0..runs {
        let _ = a.matmul(&b).unwrap();
    }
    sync(device);
    2.0 * (n as f64).powi(3) * runs as f64 / started.elapsed().as_secs_f64() / 1e12
}

fn random_prompt(len: usize, seed: u64) -> TokenizedPrompt {
    // Ordinary vocabulary ids (no specials, no image placeholder), deterministic per seed.
    let token_ids = (0..len as u64)
        .map(|i| 1000 + ((seed * 7919 + i * 104729) % 28000) as u32)
        .collect();
    TokenizedPrompt {
        token_ids,
        images: vec![],
        image_spans: vec![],
        cache_salt: None,
    }
}

/// A synthetic 336×336 RGB PNG, different per seed (so the image cache never helps).
fn synthetic_png(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(336, 336, |x, y| {
        image::Rgb([
            (x + seed) as u8,
            (y * 3 + seed) as u8,
            ((x ^ y) + seed * 7) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn image_prompt(builder: &PromptBuilder, image: ProcessedImage, words: usize) -> TokenizedPrompt {
    let text = "Describe every detail of this picture carefully ".repeat(words / 7 + 1);
    let text: String = text
        .split_whitespace()
        .take(words)
        .collect::<Vec<_>>()
        .join(" ");
    let msg = ChatMessage {
        role: Role::User,
        parts: vec![MessagePart::Image, MessagePart::Text(text)],
    };
    builder.build(&[msg], vec![image]).unwrap()
}

fn forced(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// As `forced`, at temperature 1 (the OpenAI API's default): tokens drawn on the device.
fn forced_sampled(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        ..forced(max_tokens)
    }
}

/// Per-request timings of a run of concurrent requests: (ttft, per-output-token, total) in seconds.
async fn run_requests(
    engine: &EngineHandle,
    prompts: Vec<TokenizedPrompt>,
    max_tokens: usize,
) -> (Vec<(f64, f64)>, usize, f64) {
    run_with(engine, prompts, forced(max_tokens)).await
}

async fn run_with(
    engine: &EngineHandle,
    prompts: Vec<TokenizedPrompt>,
    params: SamplingParams,
) -> (Vec<(f64, f64)>, usize, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = prompts
        .into_iter()
        .map(|p| {
            let mut stream = engine.submit(p, params.clone()).unwrap();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let mut first = None;
                let mut n = 0;
                while let Some(e) = stream.next().await {
                    e.unwrap();
                    n += 1;
                    first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                }
                let total = t0.elapsed().as_secs_f64();
                let ttft = first.unwrap_or(total);
                let tpot = if n > 1 {
                    (total - ttft) / (n - 1) as f64
                } else {
                    0.0
                };
                ((ttft, tpot), n)
            })
        })
        .collect();
    let mut timings = Vec::new();
    let mut tokens = 0;
    for t in tasks {
        let (timing, n) = t.await.unwrap();
        timings.push(timing);
        tokens += n;
    }
    (timings, tokens, started.elapsed().as_secs_f64())
}

#[cfg(feature = "cuda")]
mod device_checks;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    llava_server::model::fix_cpu_thread_count();
    let args = Args::parse();
    if args.check {
        #[cfg(feature = "cuda")]
        tokio::task::spawn_blocking(device_checks::run_all)
            .await
            .expect("device checks");
        #[cfg(not(feature = "cuda"))]
        panic!("--check needs a build with --features cuda");
        #[allow(unreachable_code)]
        if args.scenarios == "none" {
            return;
        }
    }
    let device = parse_device(&args.device).unwrap();
    let dtype = parse_dtype(&args.dtype).unwrap();
    let scenarios: Vec<&str> = args.scenarios.split(',').collect();
    let card = if device.is_cpu() {
        "cpu".to_owned()
    } else {
        std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.lines().next().unwrap_or("gpu").trim().replace(' ', "-"))
            .unwrap_or_else(|| "gpu".into())
    };
    let mut report = vec![
        format!(
            "# Serving benchmark: {} ({}, {:?}, {})",
            args.model,
            args.load_format_name(),
            dtype,
            card
        ),
        String::new(),
    ];
    let mut line = |s: String| {
        println!("{s}");
        report.push(s);
    };

    let bandwidth = copy_bandwidth(&device);
    let tflops = gemm_rate(&device, dtype);
    line(format!("| probe | value |\n|---|---|\n| copy bandwidth (read+write) | {bandwidth:.0} GB/s |\n| GEMM rate ({dtype:?}) | {tflops:.1} TFLOP/s |"));

    let started = Instant::now();
    let (model, assets) = load_model(&args.model, args.load_format, dtype, &device).unwrap();
    let load_secs = started.elapsed().as_secs_f64();
    let builder = PromptBuilder::from_checkpoint(&assets.root, &model.config).unwrap();
    let processor = ImageProcessorConfig::for_checkpoint(&assets.root, &model.config).unwrap();
    let t = &model.config.text;
    // Weights a decode step must read: the decoder without its embedding table (lm_head included).
    let decoder_params = t.num_hidden_layers
        * (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
            + t.num_attention_heads * t.head_dim * t.hidden_size
            + 3 * t.hidden_size * t.intermediate_size)
        + t.vocab_size * t.hidden_size;
    let weight_bytes = decoder_params * dtype.size_in_bytes();
    let floor_ms = weight_bytes as f64 / (bandwidth * 1e9) * 1e3;
    let engine = engine::start(
        model,
        EngineConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_num_encoder_tokens: 8192,
            kv_cache_memory: 1 << 30,
            // On the GPU the KV cache takes what 85% of its memory leaves (the server's default is 90%).
            gpu_memory_utilization: (!device.is_cpu()).then_some(0.85),
            decode_graphs: if args.enforce_eager {
                DecodeGraphs::Off
            } else {
                DecodeGraphs::Auto
            },
            ..EngineConfig::default()
        },
    )
    .unwrap();
    line(format!("\nmodel loaded in {load_secs:.1} s; decode weight bytes {:.2} GB → floor {floor_ms:.2} ms/token\n", weight_bytes as f64 / 1e9));
    line("| scenario | result | goal |\n|---|---|---|".into());

    if scenarios.contains(&"s1") {
        let n = if args.quick { 32 } else { 256 };
        let before = engine.metrics();
        let (timings, _, _) = run_requests(&engine, vec![random_prompt(32, 1)], n).await;
        let after = engine.metrics();
        let tpot_ms = timings[0].1 * 1e3;
        line(format!(
            "| S1 batch-1 decode, 32 in / {n} out ({} of {} steps from CUDA graphs) | {tpot_ms:.2} ms/token = {:.0}% of the floor's speed | ≥ 85% |",
            after.fixed_decode_steps - before.fixed_decode_steps,
            after.steps - before.steps,
            100.0 * floor_ms / tpot_ms
        ));
    }

    if scenarios.contains(&"s2") {
        let runs = if args.quick { 5 } else { 20 };
        let (mut pre, mut clip, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let png = synthetic_png(1000 + i);
            let t0 = Instant::now();
            let image = processor.process_bytes(&png).unwrap();
            let prompt = image_prompt(&builder, image, 50);
            pre.push(t0.elapsed().as_secs_f64());
            let before = engine.metrics();
            let (timings, _, _) = run_requests(&engine, vec![prompt], 1).await;
            let after = engine.metrics();
            clip.push((after.image_encode_micros - before.image_encode_micros) as f64 / 1e6);
            ttft.push(pre[i as usize] + timings[0].0);
        }
        let prefill: Vec<f64> = ttft
            .iter()
            .zip(&pre)
            .zip(&clip)
            .map(|((t, p), c)| t - p - c)
            .collect();
        let ms = |v: &mut Vec<f64>, p| percentile(v, p) * 1e3;
        let (mut pre, mut clip, mut prefill) = (pre, clip, prefill);
        line(format!(
            "| S2 one-image TTFT ({runs} runs) | p50 {:.1} ms, p99 {:.1} ms (p50: preprocess {:.1}, CLIP {:.1}, prefill {:.1}) | p50 ≤ 20 ms |",
            ms(&mut ttft.clone(), 0.5),
            ms(&mut ttft, 0.99),
            ms(&mut pre, 0.5),
            ms(&mut clip, 0.5),
            ms(&mut prefill, 0.5)
        ));
    }

    if scenarios.contains(&"s4") {
        let (count, out) = if args.quick { (32, 16) } else { (1000, 180) };
        let prompts = (0..count)
            .map(|i| random_prompt(200, 10 + i as u64))
            .collect();
        let (_, tokens, secs) = run_requests(&engine, prompts, out).await;
        line(format!(
            "| S4 throughput, {count} × (200 in, {out} out) | {:.0} output tok/s | ≥ 11k tok/s on H100 |",
            tokens as f64 / secs
        ));
    }

    if scenarios.contains(&"s4t") {
        let (count, out) = if args.quick { (32, 16) } else { (1000, 180) };
        let prompts = (0..count)
            .map(|i| random_prompt(200, 5000 + i as u64))
            .collect();
        let before = engine.metrics();
        let (_, tokens, secs) = run_with(&engine, prompts, forced_sampled(out)).await;
        let in_place = engine.metrics().tokens_chosen_in_place - before.tokens_chosen_in_place;
        line(format!(
            "| S4 at temperature 1, {count} × (200 in, {out} out) | {:.0} output tok/s ({:.0}% of tokens drawn without copying logits to the host) | as S4 |",
            tokens as f64 / secs,
            100.0 * in_place as f64 / tokens.max(1) as f64
        ));
    }

    if scenarios.contains(&"s5") {
        let (count, out) = if args.quick { (16, 16) } else { (500, 128) };
        let prompts: Vec<TokenizedPrompt> = (0..count)
            .map(|i| {
                image_prompt(
                    &builder,
                    processor.process_bytes(&synthetic_png(i)).unwrap(),
                    50,
                )
            })
            .collect();
        let (timings, _, secs) = run_requests(&engine, prompts, out).await;
        let mut ttft: Vec<f64> = timings.iter().map(|t| t.0 * 1e3).collect();
        let mut tpot: Vec<f64> = timings.iter().map(|t| t.1 * 1e3).collect();
        line(format!(
            "| S5 {count} × (1 image + 50 tokens → {out}) | {:.1} req/s; TTFT p50 {:.0} / p99 {:.0} ms; TPOT p50 {:.1} / p99 {:.1} ms | ≥ 25 req/s, TTFT ≤ 500 ms, TPOT ≤ 50 ms |",
            count as f64 / secs,
            percentile(&mut ttft, 0.5),
            percentile(&mut ttft, 0.99),
            percentile(&mut tpot, 0.5),
            percentile(&mut tpot, 0.99)
        ));
    }

    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| format!("benches/results/{}-{card}.md", date.trim()));
    std::fs::write(&out, report.join("\n") + "\n").unwrap();
    eprintln!("wrote {out}");
    engine.shutdown();
    std::thread::sleep(Duration::from_millis(10));
}

impl Args {
    fn load_format_name(&self) -> &'static str {
        match self.load_format {
            LoadFormat::Auto => "checkpoint weights",
            LoadFormat::Dummy => "dummy weights",
        }
    }
}
