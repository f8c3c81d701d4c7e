//! Engine benchmark on the CPU (tiny fixture): mixed image and text requests through the batched
//! engine, then a decode phase at 256 running sequences where the per-step split between model work
//! and bookkeeping (scheduler, runner input preparation, update) is measured.
//!
//! Run: `cargo bench --bench engine` (prints a table; no assertions).

use std::path::Path;
use std::time::{Duration, Instant};

use llava_server::engine::{self, EngineConfig, EngineHandle, MetricsSnapshot, RequestStream};
use llava_server::frontend::{ChatMessage, ImageProcessorConfig, MessagePart, PromptBuilder, Role};
use llava_server::model::{resolve_checkpoint, LlavaConfig, LlavaModel};
use llava_server::types::{SamplingParams, TokenizedPrompt};

fn prompts(dir: &Path, builder: &PromptBuilder) -> (TokenizedPrompt, Vec<TokenizedPrompt>) {
    let processor = ImageProcessorConfig::from_file(&dir.join("preprocessor_config.json")).unwrap();
    let image_dir = dir.parent().unwrap().join("images");
    let image_prompt = |file: &str| {
        let img = processor
            .process_bytes(&std::fs::read(image_dir.join(file)).unwrap())
            .unwrap();
        let msg = ChatMessage {
            role: Role::User,
            parts: vec![
                MessagePart::Image,
                MessagePart::Text("Describe the picture.".into()),
            ],
        };
        builder.build(&[msg], vec![img]).unwrap()
    };
    let text = |i: usize| {
        let msg = ChatMessage {
            role: Role::User,
            parts: vec![MessagePart::Text(format!(
                "Tell me story number {i} about llamas."
            ))],
        };
        builder.build(&[msg], vec![]).unwrap()
    };
    let images = [
        "scene_640x480.png",
        "scene_336x336.png",
        "scene_200x300.png",
        "gray_300x200.png",
    ];
    let mixed = (0..64)
        .map(|i| {
            if i % 2 == 0 {
                image_prompt(images[(i / 2) % 4])
            } else {
                text(i)
            }
        })
        .collect();
    (text(0), mixed)
}

fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn drain(streams: Vec<RequestStream>) -> usize {
    streams
        .into_iter()
        .map(|s| engine::collect_blocking(s).unwrap().len())
        .sum()
}

fn per_step(a: &MetricsSnapshot, b: &MetricsSnapshot) -> String {
    let steps = (b.steps - a.steps).max(1) as f64;
    let ms = |x: u64, y: u64| (y - x) as f64 / steps / 1000.0;
    let step = ms(a.step_micros, b.step_micros);
    let bookkeeping = ms(a.schedule_micros, b.schedule_micros)
        + ms(a.prepare_micros, b.prepare_micros)
        + ms(a.update_micros, b.update_micros);
    format!(
        "| {:.0} | {step:.2} | {:.3} | {:.3} | {:.2} | {:.2} | {:.3} | {:.1}% |",
        steps,
        ms(a.schedule_micros, b.schedule_micros),
        ms(a.prepare_micros, b.prepare_micros),
        ms(a.forward_micros, b.forward_micros),
        ms(a.sample_micros, b.sample_micros),
        ms(a.update_micros, b.update_micros),
        100.0 * bookkeeping / step
    )
}

fn wait_for(engine: &EngineHandle, what: impl Fn(&MetricsSnapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !what(&engine.metrics()) {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    llava_server::model::fix_cpu_thread_count();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let checkpoint = resolve_checkpoint(dir.to_str().unwrap()).unwrap();
    let config = LlavaConfig::from_file(&checkpoint.file("config.json")).unwrap();
    let builder = PromptBuilder::from_checkpoint(&dir, &config).unwrap();
    let model = LlavaModel::load(
        &checkpoint,
        config,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (text_prompt, mixed) = prompts(&dir, &builder);
    let engine = engine::start(
        model,
        EngineConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            num_kv_blocks: Some(8192),
            ..EngineConfig::default()
        },
    )
    .unwrap();

    println!("| phase | steps | step ms | schedule ms | prepare ms | forward ms | sample ms | update ms | bookkeeping |");
    println!("|---|---|---|---|---|---|---|---|---|");

    // Phase 1: 64 mixed requests (half with an image, 595-token prompts), 32 tokens each.
    let a = engine.metrics();
    let started = Instant::now();
    let streams: Vec<_> = mixed
        .iter()
        .map(|p| engine.submit(p.clone(), params(32)).unwrap())
        .collect();
    let generated = drain(streams);
    let secs = started.elapsed().as_secs_f64();
    let b = engine.metrics();
    println!("| 64 mixed requests {}", per_step(&a, &b));

    // Phase 2: 256 text requests decoding together; measure only while all 256 run.
    let streams: Vec<_> = (0..256)
        .map(|_| engine.submit(text_prompt.clone(), params(200)).unwrap())
        .collect();
    wait_for(&engine, |m| m.running == 256 && m.waiting == 0);
    let c = engine.metrics();
    wait_for(&engine, |m| m.steps >= c.steps + 50);
    let d = engine.metrics();
    println!("| decode at 256 running {}", per_step(&c, &d));
    let decode_tokens = d.generated_tokens - c.generated_tokens;
    let decode_secs = (d.step_micros - c.step_micros) as f64 / 1e6;
    drop(streams);

    println!();
    println!(
        "mixed: {generated} output tokens in {secs:.2} s = {:.1} tok/s; images encoded {} (cache hits {}), prefix-cache hit tokens {}",
        generated as f64 / secs,
        b.images_encoded - a.images_encoded,
        b.image_cache_hits - a.image_cache_hits,
        b.prefix_hit_tokens - a.prefix_hit_tokens,
    );
    println!(
        "decode at 256 running: {:.1} tok/s over {} steps",
        decode_tokens as f64 / decode_secs,
        d.steps - c.steps
    );
}
