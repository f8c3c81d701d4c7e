//! The `llava-server` command line: `serve`, `generate`, `run-batch`, `print-openapi`. Every flag has
//! an `LLAVA_SERVER_*` environment twin.

mod cli;

use anyhow::Context;
use clap::Parser;
use std::io::Write;

use cli::{Cli, Command, GenerateArgs, RunBatchArgs, ServeArgs};
use llava_server::api;
use llava_server::engine::{self, EngineConfig};
use llava_server::frontend::{
    prompt::eos_token_ids, ChatMessage, ChoiceText, ImageProcessorConfig, MessagePart,
    PromptBuilder, Role,
};
use llava_server::model::{load_model_with, parse_device, parse_dtype};
use llava_server::types::SamplingParams;

fn main() {
    // Before the async runtime and any thread pool start.
    llava_server::model::fix_cpu_thread_count();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_async(serve(args)),
        Command::RunBatch(args) => run_async(run_batch(args)),
        Command::PrintOpenapi => {
            println!("{}", api::openapi::openapi_json());
            Ok(())
        }
    };
    // Errors are for users: the whole cause chain on one line, exit status 1, no backtrace.
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_async(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(f);
    // Dropping the runtime would wait for blocking work still running, e.g. a model load that
    // SIGTERM interrupted: the process leaves now instead.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = args.into_options()?;
    let server = api::server::spawn(opts, api::server::termination_signal()).await?;
    eprintln!("llava-server listening on http://{}", server.addr);
    server.task.await.context("server task panicked")?
}

async fn run_batch(args: RunBatchArgs) -> anyhow::Result<()> {
    let opts = args.serve.into_options()?;
    let served = tokio::task::spawn_blocking(move || {
        api::server::load_served_model(&opts, opts.engine.clone())
            .map(|m| (m, opts.api, opts.media))
    })
    .await
    .context("model loader panicked")??;
    let (model, api_config, media) = served;
    api::batch::run_batch(model, api_config, media, &args.input, &args.output).await
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    if args.block_size == 0 {
        anyhow::bail!("--block-size must be positive");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let started = std::time::Instant::now();
    let (model, checkpoint) = load_model_with(
        &args.model,
        args.load_format,
        dtype,
        &device,
        &args.original.options(),
    )?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
    let builder = PromptBuilder::from_checkpoint(&checkpoint.root, &model.config)?;
    let processor = ImageProcessorConfig::for_checkpoint(&checkpoint.root, &model.config)?;

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
    // The engine checks that prompt and max_tokens fit the context.
    let prompt = builder.build(&messages, images)?;

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
            // One sequence: on a GPU, one decode graph to capture rather than fifteen.
            max_num_seqs: 1,
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
