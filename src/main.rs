//! The `llava-server` command line. Every flag has an `LLAVA_SERVER_*` environment twin.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

use llava_server::engine::{self, EngineConfig};
use llava_server::frontend::{
    prompt::eos_token_ids, ChatMessage, ChoiceText, ImageProcessorConfig, MessagePart,
    PromptBuilder, Role,
};
use llava_server::model::{parse_device, parse_dtype, resolve_checkpoint, LlavaConfig, LlavaModel};
use llava_server::types::SamplingParams;

/// The tiny random-weight checkpoint shipped with the repository, used when no model is named.
const BUNDLED_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");

#[derive(Parser)]
#[command(
    name = "llava-server",
    version,
    about = "OpenAI-compatible inference server for LLaVA models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt (with optional images) and print only the generated text.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint: a local llava-hf folder or a hub id (default: the repository's tiny test fixture).
    #[arg(long, env = "LLAVA_SERVER_MODEL", default_value = BUNDLED_FIXTURE)]
    model: String,
    /// The user's text.
    #[arg(long)]
    prompt: String,
    /// Image files, placed before the text as the chat template does.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[arg(long, env = "LLAVA_SERVER_MAX_TOKENS", default_value_t = 64)]
    max_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, env = "LLAVA_SERVER_TEMPERATURE", default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, env = "LLAVA_SERVER_SEED")]
    seed: Option<u64>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "LLAVA_SERVER_DTYPE", default_value = "f32")]
    dtype: String,
    /// cpu or cuda:N.
    #[arg(long, env = "LLAVA_SERVER_DEVICE", default_value = "cpu")]
    device: String,
    /// Tokens per KV-cache block.
    #[arg(long, env = "LLAVA_SERVER_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
    };
    // Errors are for users: the whole cause chain on one line, exit status 1, no backtrace.
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    if args.block_size == 0 {
        anyhow::bail!("--block-size must be positive");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let checkpoint = resolve_checkpoint(&args.model)?;
    let config = LlavaConfig::from_file(&checkpoint.file("config.json"))?;
    let builder = PromptBuilder::from_checkpoint(&checkpoint.root, &config)?;
    let processor = ImageProcessorConfig::from_file(&checkpoint.file("preprocessor_config.json"))?;

    let mut images = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
        let image = processor
            .process_bytes(&bytes)
            .with_context(|| format!("image {}", path.display()))?;
        images.push(image);
    }
    let mut parts: Vec<MessagePart> = images.iter().map(|_| MessagePart::Image).collect();
    parts.push(MessagePart::Text(args.prompt.clone()));
    let messages = [ChatMessage {
        role: Role::User,
        parts,
    }];
    let prompt = builder.build(&messages, images, args.max_tokens)?;

    let started = std::time::Instant::now();
    let model = LlavaModel::load(&checkpoint, config, dtype, &device)?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let prompt_tokens = prompt.token_ids.len();
    // One request: a pool just large enough for it.
    let handle = engine::start(
        model,
        EngineConfig {
            block_size: args.block_size,
            num_kv_blocks: Some((prompt_tokens + args.max_tokens).div_ceil(args.block_size)),
            eos_token_ids: eos_token_ids(&checkpoint.root),
            ..EngineConfig::default()
        },
    )?;
    let started = std::time::Instant::now();
    let events = engine::collect_blocking(handle.submit(prompt, params)?)?;
    let mut text = ChoiceText::new(builder.tokenizer().clone(), true, Vec::new());
    let mut answer = String::new();
    for event in &events {
        answer.push_str(&text.push(&event.token_ids)?.text);
    }
    answer.push_str(&text.finish()?.text);
    tracing::info!(
        prompt_tokens,
        generated = events.len(),
        seconds = started.elapsed().as_secs_f64(),
        finish = ?events.last().and_then(|e| e.finish_reason),
        "generated"
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{answer}")?;
    Ok(())
}
