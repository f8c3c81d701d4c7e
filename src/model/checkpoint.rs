//! Finding a checkpoint's files: a local folder, or a hub id fetched into the hub cache (`hub`), and
//! the list of safetensors files (one file, or shards named by an index).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::hub::{HubConfig, HubRepo};
use super::ModelError;

/// A folder that holds a llava-hf checkpoint (a local folder or the hub cache's snapshot).
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
];
const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

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
            message: "the repository has no config.json: not a llava-hf checkpoint".into(),
        });
    }
    for name in HUB_FILES {
        if repo.has(name) {
            repo.fetch(name)?;
        }
    }
    if repo.has(INDEX_FILE) {
        let index = repo.fetch(INDEX_FILE)?;
        for shard in shard_names(&index)? {
            repo.fetch(&shard)?;
        }
    } else {
        repo.fetch(SINGLE_FILE)?;
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

    /// The safetensors files holding the weights; every shard the index names must exist.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>, ModelError> {
        let index = self.file(INDEX_FILE);
        if index.is_file() {
            let files: Vec<PathBuf> = shard_names(&index)?
                .into_iter()
                .map(|name| self.file(&name))
                .collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(ModelError::Checkpoint(format!(
                    "shard {} named by {INDEX_FILE} is missing",
                    missing.display()
                )));
            }
            return Ok(files);
        }
        let single = self.file(SINGLE_FILE);
        if single.is_file() {
            return Ok(vec![single]);
        }
        Err(ModelError::Checkpoint(format!(
            "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
            self.root.display()
        )))
    }
}
