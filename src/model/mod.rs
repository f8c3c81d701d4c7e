//! The LLaVA model on candle: HF configs, checkpoint loading, the CLIP vision tower, the projector and a
//! LLaMA decoder that runs flattened tokens of many sequences over a paged KV cache.
//! Nothing here knows about HTTP, the scheduler or the engine loop.

pub mod anyres;
pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod cpu_attention;
pub mod cpu_kernels;
pub mod cpu_math;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
pub mod decode_attention;
pub mod dummy;
pub mod hub;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod original;
pub mod packed_gemm;
pub mod projector;
pub mod sampling;
pub mod small_gemm;
pub mod static_decode;
pub mod torch_bin;

pub use attention::{AttentionMetadata, SequenceAttention};
pub use checkpoint::{resolve_checkpoint, CheckpointDir};
pub use config::LlavaConfig;
pub use kv_cache::KvCache;
pub use llava::{ForwardInput, LlavaModel};
pub use original::OriginalOptions;

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("cannot fetch {repo} from the Hugging Face hub: {message}")]
    Hub { repo: String, message: String },
    #[error("weights: {0}")]
    Weights(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A GPU's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: usize,
    pub total: usize,
}

/// How weights are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// From the checkpoint's safetensors.
    Auto,
    /// Random weights of the checkpoint's (or a built-in) shapes.
    Dummy,
}

impl std::str::FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "safetensors" => Ok(LoadFormat::Auto),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(format!("unknown load format {other:?}: use auto or dummy")),
        }
    }
}

/// Where the tokenizer, template and processor config of built-in dummy shapes come from: the
/// repository's tiny fixture (the real LLaMA tokenizer and llava-hf's files), found from the working
/// directory first (the device machine runs from a copy of the repository), else from the build tree.
fn dummy_assets(fixture: &str) -> std::path::PathBuf {
    let relative = std::path::Path::new("tests/fixtures").join(fixture);
    if relative.is_dir() {
        return relative;
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Loads a model for serving or generation: `spec` is a checkpoint (folder or hub id), or with
/// `LoadFormat::Dummy` also a built-in shape name. Returns the model, its config and the folder that
/// holds the tokenizer and processor files.
/// Fixes the CPU thread count candle's matrix products use, once, before any thread starts.
///
/// candle asks for it on every CPU matmul, and unless `RAYON_NUM_THREADS` is set it counts the
/// physical cores anew each time, which reads and parses `/proc/cpuinfo` (≈ 37 µs here, hundreds of
/// times per decode step). Setting the variable to the count candle would find keeps its choice and
/// makes the lookup an environment read. A count the user set is kept.
pub fn fix_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

pub fn load_model(
    spec: &str,
    format: LoadFormat,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<(LlavaModel, CheckpointDir), ModelError> {
    load_model_with(spec, format, dtype, device, &OriginalOptions::default())
}

/// `load_model` with the choices an original-format checkpoint may need (`--vision-tower`,
/// `--conv-template`); a llava-hf checkpoint refuses them.
pub fn load_model_with(
    spec: &str,
    format: LoadFormat,
    dtype: candle_core::DType,
    device: &candle_core::Device,
    original: &OriginalOptions,
) -> Result<(LlavaModel, CheckpointDir), ModelError> {
    if format == LoadFormat::Dummy {
        if let Some(json) = dummy::builtin_config(spec) {
            let config = LlavaConfig::from_json(&json)?;
            let assets = CheckpointDir {
                root: dummy_assets(dummy::builtin_assets(spec)),
            };
            return Ok((LlavaModel::dummy(config, dtype, device)?, assets));
        }
        if let Some((flat, tower)) = dummy::builtin_original_config(spec) {
            // The tokenizer, and the tower's preprocessor, of the original-format fixtures.
            let tower_dir = dummy_assets("original/clip-336");
            let config = original::config_with_tower(spec, &flat, &tower, tower_dir, original)?;
            let assets = CheckpointDir {
                root: dummy_assets(dummy::builtin_assets(spec)),
            };
            return Ok((LlavaModel::dummy(config, dtype, device)?, assets));
        }
    }
    let checkpoint = resolve_checkpoint(spec)?;
    let config = load_config(&checkpoint, spec, original)?;
    let model = match format {
        LoadFormat::Auto => LlavaModel::load(&checkpoint, config, dtype, device)?,
        LoadFormat::Dummy => LlavaModel::dummy(config, dtype, device)?,
    };
    Ok((model, checkpoint))
}

/// The runtime config of a checkpoint in either format.
pub fn load_config(
    checkpoint: &CheckpointDir,
    spec: &str,
    original: &OriginalOptions,
) -> Result<LlavaConfig, ModelError> {
    let path = checkpoint.file("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
        path: path.clone(),
        source: e,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    if original::is_original_config(&json) {
        return original::load_config(spec, &text, original).map_err(|e| in_file(e, &path));
    }
    if let Some(flag) = original.set_flags().first() {
        return Err(ModelError::Config(format!(
            "{flag} applies to original-format LLaVA checkpoints; {spec} is a llava-hf checkpoint"
        )));
    }
    LlavaConfig::from_file(&path)
}

fn in_file(e: ModelError, path: &std::path::Path) -> ModelError {
    match e {
        ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
        other => other,
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<candle_core::Device, ModelError> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|_| ModelError::Config(format!("bad device {s:?}: want cuda:N")))?
                .unwrap_or(0);
            let device = candle_core::Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            if let candle_core::Device::Cuda(cuda) = &device {
                // SAFETY: cudarc synchronises through these per-allocation events only once a second
                // stream is created with `new_stream`, which nothing here does; until then each tensor
                // creates and destroys two events for nothing, hundreds of driver calls per step.
                unsafe { cuda.disable_event_tracking() };
            }
            Ok(device)
        }
        other => Err(ModelError::Config(format!(
            "unknown device {other:?}: use cpu or cuda:N"
        ))),
    }
}

/// Parses a compute dtype name as the CLI takes it.
pub fn parse_dtype(name: &str) -> Result<candle_core::DType, ModelError> {
    match name {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        other => Err(ModelError::Config(format!(
            "unknown dtype {other:?}: use f32, f16 or bf16"
        ))),
    }
}
