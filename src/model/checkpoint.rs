//! Finding a checkpoint's files: a local folder, or a hub id fetched into the hub cache (`hub`), and
//! its weight files: safetensors or PyTorch `.bin` pickles, one file or shards named by an index.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::hub::{HubConfig, HubRepo};
use super::ModelError;

/// A folder that holds a checkpoint (a local folder or the hub cache's snapshot): llava-hf, the
/// original LLaVA format, or the CLIP tower an original-format checkpoint names.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    pub root: PathBuf,
}

/// Files a hub download fetches when present; weights come from the index when sharded.
const HUB_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    // Original-format checkpoints: a SentencePiece model and the slow tokenizer's added tokens.
    "tokenizer.model",
    "added_tokens.json",
];

/// Where weights may be, in the order they are looked for: (index of shards, single file, format).
const WEIGHT_LAYOUTS: &[(&str, &str, WeightFormat)] = &[
    (
        "model.safetensors.index.json",
        "model.safetensors",
        WeightFormat::Safetensors,
    ),
    (
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
        WeightFormat::TorchBin,
    ),
];

/// How a checkpoint's weight files are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `torch.save` zips, read by `torch_bin` without running pickle code.
    TorchBin,
}

/// A checkpoint's weight files, every one present.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    pub format: WeightFormat,
    pub files: Vec<PathBuf>,
}

/// A local folder when `spec` names one, otherwise a hub id downloaded into the hub cache.
pub fn resolve_checkpoint(spec: &str) -> Result<CheckpointDir, ModelError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(CheckpointDir {
            root: path.to_owned(),
        });
    }
    if path.exists() {
        return Err(ModelError::Checkpoint(format!(
            "{spec} is a file; --model takes a checkpoint folder or a hub id"
        )));
    }
    if spec.split('/').count() != 2 || spec.starts_with('.') || spec.contains("..") {
        return Err(ModelError::Checkpoint(format!(
            "{spec} is neither a local folder nor a hub id of the form owner/name"
        )));
    }
    download_from_hub(spec)
}

fn download_from_hub(repo_id: &str) -> Result<CheckpointDir, ModelError> {
    let cfg = HubConfig::from_env();
    if !cfg.offline {
        tracing::info!(repo = repo_id, endpoint = %cfg.endpoint, "fetching checkpoint from the hub");
    }
    let repo = HubRepo::open(repo_id, &cfg)?;
    // Only files the revision lists are fetched: no probing for optional ones.
    if !repo.has("config.json") {
        return Err(ModelError::Hub {
            repo: repo_id.to_owned(),
            message: "the repository has no config.json: not a checkpoint".into(),
        });
    }
    for name in HUB_FILES {
        if repo.has(name) {
            repo.fetch(name)?;
        }
    }
    // The first layout the repository has, as `weights()` looks for them on disk.
    let layout = WEIGHT_LAYOUTS
        .iter()
        .find(|(index, single, _)| repo.has(index) || repo.has(single));
    match layout {
        Some((index, _, _)) if repo.has(index) => {
            let index = repo.fetch(index)?;
            for shard in shard_names(&index)? {
                repo.fetch(&shard)?;
            }
        }
        Some((_, single, _)) => {
            repo.fetch(single)?;
        }
        None => {
            return Err(ModelError::Hub {
                repo: repo_id.to_owned(),
                message: "the repository has neither safetensors nor pytorch_model.bin weights"
                    .into(),
            })
        }
    }
    Ok(CheckpointDir {
        root: repo.snapshot(),
    })
}

fn shard_names(index_path: &Path) -> Result<BTreeSet<String>, ModelError> {
    let text = std::fs::read_to_string(index_path).map_err(|e| ModelError::Io {
        path: index_path.to_owned(),
        source: e,
    })?;
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        ModelError::Checkpoint(format!("{} is not valid JSON: {e}", index_path.display()))
    })?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            ModelError::Checkpoint(format!("{} has no weight_map", index_path.display()))
        })?;
    map.values()
        .map(|v| {
            v.as_str().map(str::to_owned).ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "{}: weight_map values must be file names",
                    index_path.display()
                ))
            })
        })
        .collect()
}

impl CheckpointDir {
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The weight files: safetensors when present, else PyTorch `.bin`; sharded when an index names
    /// the shards, every one of which must exist.
    pub fn weights(&self) -> Result<WeightFiles, ModelError> {
        for &(index, single, format) in WEIGHT_LAYOUTS {
            let index_path = self.file(index);
            if index_path.is_file() {
                let files: Vec<PathBuf> = shard_names(&index_path)?
                    .into_iter()
                    .map(|name| self.file(&name))
                    .collect();
                if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                    return Err(ModelError::Checkpoint(format!(
                        "shard {} named by {index} is missing",
                        missing.display()
                    )));
                }
                return Ok(WeightFiles { format, files });
            }
            let single = self.file(single);
            if single.is_file() {
                return Ok(WeightFiles {
                    format,
                    files: vec![single],
                });
            }
        }
        Err(ModelError::Checkpoint(format!(
            "{} has no weights (model.safetensors, pytorch_model.bin or a sharded index of either)",
            self.root.display()
        )))
    }
}
