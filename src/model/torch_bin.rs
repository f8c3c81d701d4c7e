//! PyTorch `.bin` weight files (`torch.save`'s zip of one pickle plus raw tensor storages), read without
//! running any pickle code: candle's pickle reader interprets the opcodes into plain values and never
//! imports or calls anything. On top of that we accept only what a state dict is — a dict from names to
//! tensors (plus torch's `_metadata` entry) — and refuse anything else, saying what was found.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::ModelError;

/// A state dict's pickle is a few hundred bytes per tensor; anything near this is not one.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

fn bad(path: &Path, why: impl std::fmt::Display) -> ModelError {
    ModelError::Weights(format!(
        "{} is not a PyTorch state dict: {why}",
        path.display()
    ))
}

/// What a pickle value is, in words, for error messages.
fn describe(obj: &Object) -> String {
    match obj {
        Object::Class {
            module_name,
            class_name,
        } => format!("a reference to {module_name}.{class_name}"),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("a call to {module_name}.{class_name}"),
            other => format!("a call to {}", describe(other)),
        },
        Object::Dict(_) => "a dict".into(),
        Object::List(_) => "a list".into(),
        Object::Tuple(_) => "a tuple".into(),
        Object::Unicode(_) => "a string".into(),
        Object::Int(_) | Object::Long(_) => "an integer".into(),
        Object::Float(_) => "a float".into(),
        Object::Bool(_) => "a bool".into(),
        Object::None => "None".into(),
        Object::Mark => "a mark".into(),
        Object::PersistentLoad(_) => "a bare storage".into(),
    }
}

/// Checks that `path` is a torch zip whose one pickle is a dict of tensors, then indexes it.
pub fn open_state_dict(path: &Path) -> Result<PthTensors, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(path, format!("not a torch zip archive ({e})")))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<Vec<String>, _>>()
        .map_err(|e| {
            bad(
                path,
                format!("a file name in the archive is unreadable ({e})"),
            )
        })?;
    let pickles: Vec<&String> = names.iter().filter(|n| n.ends_with("data.pkl")).collect();
    let [pickle] = pickles[..] else {
        return Err(bad(
            path,
            format!("the archive holds {} pickles, not one", pickles.len()),
        ));
    };
    let entry = zip
        .by_name(pickle)
        .map_err(|e| bad(path, format!("cannot read {pickle}: {e}")))?;
    if entry.size() > MAX_PICKLE_BYTES {
        return Err(bad(path, format!("its pickle is {} bytes", entry.size())));
    }
    let mut reader = BufReader::new(entry.take(MAX_PICKLE_BYTES));
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| bad(path, format!("its pickle does not parse ({e})")))?;
    let top = stack
        .finalize()
        .map_err(|e| bad(path, format!("its pickle is empty ({e})")))?;
    let Object::Dict(entries) = top else {
        return Err(bad(path, format!("its pickle holds {}", describe(&top))));
    };
    let dir = PathBuf::from(pickle.trim_end_matches(".pkl"));
    for (key, value) in entries {
        let Object::Unicode(name) = &key else {
            return Err(bad(path, format!("a key is {}", describe(&key))));
        };
        // torch keeps the module versions in the OrderedDict's `_metadata` attribute, which the
        // pickle's BUILD merges into the dict.
        if name == "_metadata" {
            continue;
        }
        let name = name.clone();
        let what = describe(&value);
        match value.into_tensor_info(key, &dir) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(bad(path, format!("{name:?} holds {what}, not a tensor"))),
            Err(e) => return Err(bad(path, format!("{name:?}: {e}"))),
        }
    }
    PthTensors::new(path, None).map_err(|e| bad(path, e))
}

/// The tensors of one or more `.bin` shards, by name, for a `VarBuilder`.
pub struct TorchBinWeights {
    shards: Vec<PthTensors>,
    by_name: HashMap<String, usize>,
}

impl TorchBinWeights {
    pub fn open(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = open_state_dict(file)?;
            for name in shard.tensor_infos().keys() {
                if by_name.insert(name.clone(), i).is_some() {
                    return Err(ModelError::Weights(format!(
                        "tensor {name} is in more than one shard ({})",
                        file.display()
                    )));
                }
            }
            shards.push(shard);
        }
        Ok(Self { shards, by_name })
    }

    fn shard(&self, name: &str) -> candle_core::Result<&PthTensors> {
        self.by_name
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| {
                candle_core::Error::CannotFindTensor {
                    path: name.to_owned(),
                }
                .bt()
            })
    }
}

impl SimpleBackend for TorchBinWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        SimpleBackend::get(self.shard(name)?, shape, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(self.shard(name)?, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}
