//! The LLaVA model on candle: HF configs, checkpoint loading, the CLIP vision tower, the projector and a
//! LLaMA decoder that runs flattened tokens of many sequences over a paged KV cache.
//! Nothing here knows about HTTP, the scheduler or the engine loop.

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod projector;

pub use attention::{AttentionMetadata, SequenceAttention};
pub use checkpoint::{resolve_checkpoint, CheckpointDir};
pub use config::LlavaConfig;
pub use kv_cache::KvCache;
pub use llava::{ForwardInput, LlavaModel};

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
            Ok(candle_core::Device::new_cuda(ordinal)?)
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
