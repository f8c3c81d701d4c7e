//! Serving: bind first (so `/health` answers 503 while the model loads), load the model on a blocking
//! thread, then serve until SIGTERM/SIGINT; on a signal stop accepting, refuse new work with 503 and
//! let in-flight requests finish for up to the shutdown timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::listener::{serve_connections, BoundedListener};
use super::state::{ApiConfig, AppState, ServedModel, SharedState};
use crate::engine::{self, EngineConfig};
use crate::frontend::media::{MediaFetcher, MediaPolicy};
use crate::frontend::prompt::eos_token_ids;
use crate::frontend::structured::StructuredOutputs;
use crate::frontend::{ImageProcessorConfig, PromptBuilder};
use crate::model::{load_model_with, parse_device, parse_dtype, LoadFormat, OriginalOptions};

/// Everything `serve` needs, as the CLI resolved it.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model: String,
    pub load_format: LoadFormat,
    pub dtype: String,
    /// Decoder linear weights in f16 on the CPU (`--cpu-f16-weights`).
    pub cpu_f16_weights: bool,
    /// `--vision-tower` and `--conv-template` (original-format checkpoints).
    pub original: OriginalOptions,
    pub device: String,
    pub host: String,
    pub port: u16,
    pub api: ApiConfig,
    pub media: MediaPolicy,
    pub engine: EngineConfig,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    /// How long a response write may stall before its connection is closed.
    pub write_timeout: Duration,
    /// How long a client may take to send a request head (or leave a keep-alive connection idle).
    pub header_read_timeout: Duration,
}

/// Loads the model (real or dummy weights), tokenizer, template and image processor, and starts the engine.
pub fn load_served_model(
    opts: &ServeOptions,
    mut engine_config: EngineConfig,
) -> anyhow::Result<ServedModel> {
    let cpu_f16_weights = opts.cpu_f16_weights;
    let device = parse_device(&opts.device)?;
    let dtype = parse_dtype(&opts.dtype)?;
    let (mut model, assets) = load_model_with(
        &opts.model,
        opts.load_format,
        dtype,
        &device,
        &opts.original,
    )?;
    if cpu_f16_weights {
        anyhow::ensure!(
            device.is_cpu() && dtype == candle_core::DType::F32,
            "--cpu-f16-weights needs --device cpu and --dtype f32"
        );
        model.store_decoder_weights_f16()?;
    }
    let builder = PromptBuilder::from_checkpoint(&assets.root, &model.config)?;
    let processor = ImageProcessorConfig::for_checkpoint(&assets.root, &model.config)?;
    let vocab_size = model.config.text.vocab_size;
    engine_config.eos_token_ids = eos_token_ids(&assets.root);
    let structured = StructuredOutputs::for_tokenizer(
        builder.tokenizer(),
        vocab_size,
        engine_config.eos_token_ids.first().copied().unwrap_or(2),
    )?;
    let engine = engine::start(model, engine_config)?;
    let max_model_len = engine.context_limit().0;
    Ok(ServedModel {
        engine,
        builder: Arc::new(builder),
        structured: Arc::new(structured),
        processor: Arc::new(processor),
        max_model_len,
        vocab_size,
    })
}

/// A server running in this process (tests and `serve` both use it).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: SharedState,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Binds, starts loading the model and serves until `shutdown` resolves.
pub async fn spawn(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    let media = MediaFetcher::new(opts.media.clone()).context("media fetcher")?;
    let state: SharedState = Arc::new(AppState::new(opts.api.clone(), media));
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    let addr = listener.local_addr()?;
    let listener = BoundedListener::new(listener, opts.max_connections, opts.write_timeout);
    tracing::info!(%addr, "listening; loading the model");
    let loader = {
        let state = state.clone();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let served = load_served_model(&opts, opts.engine.clone())?;
            let _ = state.model.set(served);
            tracing::info!(model = %opts.api.served_model_name, "model loaded; ready");
            Ok(())
        })
    };
    let app = super::router(state.clone());
    let drain_state = state.clone();
    let watched_state = state.clone();
    let timeout = opts.shutdown_timeout;
    let task = tokio::spawn(async move {
        // Dropped when this task ends, that is when the server has drained: the deadline below
        // then stands down instead of ending a process that outlives this server (tests run many).
        let (_drained, drained) = tokio::sync::oneshot::channel::<()>();
        let graceful = async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            if let Some(model) = drain_state.model.get() {
                model.engine.shutdown();
            }
            // In-flight requests get `timeout`; after that the process leaves regardless, and says
            // with its exit status that requests were cut off.
            tokio::spawn(async move {
                tokio::select! {
                    _ = drained => return,
                    () = tokio::time::sleep(timeout) => {}
                }
                // Logging must not stand between the timeout and the exit (a closed log pipe can
                // make the write fail).
                let _ = std::panic::catch_unwind(|| {
                    tracing::warn!("shutdown timeout reached with requests still running; exiting")
                });
                std::process::exit(1);
            });
        };
        let server = serve_connections(listener, app, opts.header_read_timeout, graceful);
        tokio::pin!(server);
        // A model that fails to load ends the server with that error.
        tokio::select! {
            () = &mut server => return Ok(()),
            loaded = loader => loaded.context("model loader panicked")??,
        }
        // So does an engine that stopped on faults: `/health` already says 503, and a non-zero exit
        // lets the supervisor (systemd, Kubernetes) restart the process.
        tokio::select! {
            () = &mut server => Ok(()),
            () = engine_failure(watched_state) => {
                anyhow::bail!("the engine stopped after repeated faults; exiting so that a supervisor restarts the server")
            }
        }
    });
    Ok(RunningServer { addr, state, task })
}

/// Resolves once the served model's engine has failed.
async fn engine_failure(state: SharedState) {
    loop {
        if state.model.get().is_some_and(|m| m.engine.has_failed()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
