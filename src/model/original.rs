//! The original LLaVA checkpoint format (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`: the paper's v1
//! models, `liuhaotian/llava-v1.5-*` and the fine-tunes published the same way): a flat LlamaConfig
//! plus `mm_*` keys, decoder and projector weights only, and the CLIP tower as a separate CLIPModel
//! checkpoint named by `mm_vision_tower`. This module turns that into the runtime `LlavaConfig`.

use serde::Deserialize;
use std::path::PathBuf;

use super::checkpoint::resolve_checkpoint;
use super::config::{
    check_feature_layers, text_config, vision_config, Activation, FeatureSelectStrategy,
    LlavaConfig, RawTextConfig, RawVisionConfig, StorageDtype,
};
use super::ModelError;

/// What the original format adds to the runtime config.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalFormat {
    /// The CLIP checkpoint folder the vision weights and `preprocessor_config.json` come from.
    pub vision_tower: PathBuf,
    /// `mm_use_im_start_end`: `<im_start>` and `<im_end>` around each image (v1).
    pub use_im_start_end: bool,
    /// `image_aspect_ratio: pad`: expand to a square in the mean colour before the CLIP processor.
    pub pad_to_square: bool,
    /// The model's name as the original `get_model_name_from_path` derives it; the conversation
    /// template is inferred from it unless `conv_template` names one.
    pub model_name: String,
    /// `--conv-template`.
    pub conv_template: Option<String>,
}

/// Choices for original-format checkpoints that the checkpoint itself cannot make.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginalOptions {
    /// `--vision-tower`: a CLIP checkpoint (folder or hub id) in place of `mm_vision_tower`.
    pub vision_tower: Option<String>,
    /// `--conv-template`: a template of the original `conversation.py`.
    pub conv_template: Option<String>,
}

impl OriginalOptions {
    /// The flags that make sense only for the original format, for the error a llava-hf checkpoint gets.
    pub fn set_flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.vision_tower.is_some() {
            flags.push("--vision-tower");
        }
        if self.conv_template.is_some() {
            flags.push("--conv-template");
        }
        flags
    }
}

#[derive(Debug, Deserialize)]
struct RawOriginalConfig {
    architectures: Option<Vec<String>>,
    mm_vision_tower: Option<String>,
    /// Older v1 configs name the tower here.
    vision_tower: Option<String>,
    mm_hidden_size: Option<usize>,
    mm_projector_type: Option<String>,
    mm_vision_select_layer: Option<i64>,
    mm_vision_select_feature: Option<String>,
    mm_use_im_start_end: Option<bool>,
    image_aspect_ratio: Option<String>,
    torch_dtype: Option<StorageDtype>,
}

/// The class the original code registers its checkpoints under.
const ARCHITECTURE: &str = "LlavaLlamaForCausalLM";

/// Whether a `config.json` is in the original format: it names the original class, or carries the
/// `mm_vision_tower` key only the original writes. (Both formats say `model_type: "llava"`.)
pub fn is_original_config(json: &serde_json::Value) -> bool {
    let names_class = json
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter().any(|n| {
                n.as_str()
                    .is_some_and(|n| n.starts_with("Llava") && n.ends_with("ForCausalLM"))
            })
        });
    names_class || json.get("mm_vision_tower").is_some()
}

/// The name the original `get_model_name_from_path` gives `spec` (a folder or a hub id).
pub fn model_name_from_path(spec: &str) -> String {
    let parts: Vec<&str> = spec.trim_matches('/').split('/').collect();
    let last = parts.last().copied().unwrap_or_default();
    match parts.len() {
        n if n >= 2 && last.starts_with("checkpoint-") => format!("{}_{last}", parts[n - 2]),
        _ => last.to_owned(),
    }
}

/// The runtime config of an original-format checkpoint; the CLIP tower is resolved (and fetched from
/// the hub when it is an id) here, since its config decides the vision shapes.
pub fn load_config(
    spec: &str,
    json: &str,
    options: &OriginalOptions,
) -> Result<LlavaConfig, ModelError> {
    let raw: RawOriginalConfig =
        serde_json::from_str(json).map_err(|e| ModelError::Config(e.to_string()))?;
    let tower_spec = options
        .vision_tower
        .clone()
        .or(raw.mm_vision_tower)
        .or(raw.vision_tower)
        .ok_or_else(|| {
            ModelError::Config(
                "mm_vision_tower is missing; name the CLIP checkpoint with --vision-tower".into(),
            )
        })?;
    let tower = resolve_checkpoint(&tower_spec).map_err(|e| {
        ModelError::Checkpoint(format!(
            "the vision tower {tower_spec:?} (mm_vision_tower, or --vision-tower) cannot be loaded: {e}"
        ))
    })?;
    let tower_json = read_text(&tower.file("config.json"))?;
    config_with_tower(spec, json, &tower_json, tower.root, options)
}

/// The runtime config from the checkpoint's flat config and its tower (config and folder); a built-in
/// shape (`--load-format dummy`) calls this directly, with the fixture tower's folder.
pub fn config_with_tower(
    spec: &str,
    json: &str,
    tower_json: &str,
    tower_dir: PathBuf,
    options: &OriginalOptions,
) -> Result<LlavaConfig, ModelError> {
    let raw: RawOriginalConfig =
        serde_json::from_str(json).map_err(|e| ModelError::Config(e.to_string()))?;
    let mut config = config_from_parts(json, &raw, tower_json)?;
    config.original = Some(OriginalFormat {
        vision_tower: tower_dir,
        use_im_start_end: raw.mm_use_im_start_end.unwrap_or(false),
        pad_to_square: pad_to_square(raw.image_aspect_ratio.as_deref())?,
        model_name: model_name_from_path(spec),
        conv_template: options.conv_template.clone(),
    });
    Ok(config)
}

fn read_text(path: &std::path::Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_owned(),
        source: e,
    })
}

fn pad_to_square(aspect: Option<&str>) -> Result<bool, ModelError> {
    match aspect {
        None | Some("square") | Some("resize") => Ok(false),
        Some("pad") => Ok(true),
        Some("anyres") => Err(ModelError::Config(
            "image_aspect_ratio \"anyres\" is LLaVA-NeXT (1.6), which is not supported yet".into(),
        )),
        Some(other) => Err(ModelError::Config(format!(
            "image_aspect_ratio {other:?} is not supported (pad, or absent for resize and crop)"
        ))),
    }
}

/// Linear layers of a `mm_projector_type`: absent or `linear` is one, `mlpNx_gelu` is N.
fn projector_depth(kind: Option<&str>) -> Result<usize, ModelError> {
    let Some(kind) = kind else { return Ok(1) };
    if kind == "linear" {
        return Ok(1);
    }
    kind.strip_prefix("mlp")
        .and_then(|rest| rest.strip_suffix("x_gelu"))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| {
            ModelError::Config(format!(
                "mm_projector_type {kind:?} is not supported (linear or mlpNx_gelu)"
            ))
        })
}

/// The vision half of a CLIP checkpoint's config: a CLIPModel's `vision_config` (with an old
/// `vision_config_dict` laid over it, as transformers does) or a CLIPVisionModel's own config.
fn tower_vision_config(tower_json: &str) -> Result<RawVisionConfig, ModelError> {
    let json: serde_json::Value = serde_json::from_str(tower_json)
        .map_err(|e| ModelError::Config(format!("the vision tower's config.json: {e}")))?;
    let vision = match json.get("vision_config") {
        Some(serde_json::Value::Object(base)) => {
            let mut merged = base.clone();
            if let Some(serde_json::Value::Object(over)) = json.get("vision_config_dict") {
                merged.extend(over.clone());
            }
            serde_json::Value::Object(merged)
        }
        _ if json.get("model_type").and_then(|m| m.as_str()) == Some("clip_vision_model") => json,
        _ => return Err(ModelError::Config(
            "the vision tower's config.json is neither a CLIPModel nor a CLIPVisionModel config"
                .into(),
        )),
    };
    serde_json::from_value(vision)
        .map_err(|e| ModelError::Config(format!("the vision tower's vision_config: {e}")))
}

/// The runtime config from the checkpoint's flat config and its tower's config.
fn config_from_parts(
    json: &str,
    raw: &RawOriginalConfig,
    tower_json: &str,
) -> Result<LlavaConfig, ModelError> {
    if let Some(archs) = &raw.architectures {
        if !archs.iter().any(|a| a == ARCHITECTURE) {
            return Err(ModelError::Config(format!(
                "architectures {archs:?}: of the original format only {ARCHITECTURE} (a LLaMA decoder) is supported"
            )));
        }
    }
    let mut text_raw: RawTextConfig =
        serde_json::from_str(json).map_err(|e| ModelError::Config(e.to_string()))?;
    // The flat config says `model_type: "llava"` for the decoder's own fields.
    text_raw.model_type = None;
    let text = text_config(text_raw)?;
    let vision = vision_config(Some(tower_vision_config(tower_json)?))?;
    let layer = raw.mm_vision_select_layer.unwrap_or(-2);
    check_feature_layers("mm_vision_select_layer", &[layer], &vision)?;
    if let Some(mm_hidden) = raw.mm_hidden_size {
        if mm_hidden != vision.hidden_size {
            return Err(ModelError::Config(format!(
                "mm_hidden_size {mm_hidden} differs from the vision tower's hidden size {}",
                vision.hidden_size
            )));
        }
    }
    let feature_select_strategy = match raw.mm_vision_select_feature.as_deref() {
        None | Some("patch") => FeatureSelectStrategy::Default,
        Some("cls_patch") => FeatureSelectStrategy::Full,
        Some(other) => {
            return Err(ModelError::Config(format!(
                "mm_vision_select_feature {other:?} is not supported (patch or cls_patch)"
            )))
        }
    };
    Ok(LlavaConfig {
        text,
        vision,
        // Image rows are marked by `ImageSpan`s, not by an id; unk fills them in the token ids.
        image_token_id: 0,
        // nn.GELU() between the layers of mlpNx_gelu: the exact erf form.
        projector_hidden_act: Activation::Gelu,
        projector_bias: true,
        projector_depth: projector_depth(raw.mm_projector_type.as_deref())?,
        vision_feature_layers: vec![layer],
        feature_select_strategy,
        storage_dtype: raw.torch_dtype,
        original: None,
        anyres: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_follow_the_original_rule() {
        assert_eq!(
            model_name_from_path("liuhaotian/llava-v1.5-7b"),
            "llava-v1.5-7b"
        );
        assert_eq!(
            model_name_from_path("/models/llava-v1.5-13b/"),
            "llava-v1.5-13b"
        );
        assert_eq!(
            model_name_from_path("runs/llava-lora/checkpoint-500"),
            "llava-lora_checkpoint-500"
        );
    }

    #[test]
    fn projector_types() {
        assert_eq!(projector_depth(None).unwrap(), 1);
        assert_eq!(projector_depth(Some("linear")).unwrap(), 1);
        assert_eq!(projector_depth(Some("mlp2x_gelu")).unwrap(), 2);
        assert_eq!(projector_depth(Some("mlp3x_gelu")).unwrap(), 3);
        assert!(projector_depth(Some("identity")).is_err());
        assert!(projector_depth(Some("mlp0x_gelu")).is_err());
    }

    const TOWER: &str = r#"{"model_type": "clip", "vision_config": {"model_type": "clip_vision_model",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "image_size": 336, "patch_size": 14}}"#;

    fn config(flat: &str) -> Result<LlavaConfig, ModelError> {
        config_with_tower(
            "m",
            flat,
            TOWER,
            PathBuf::new(),
            &OriginalOptions::default(),
        )
    }

    #[test]
    fn select_feature_layer_and_tower_size() {
        let base = r#""hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 8"#;
        // 336 px / 14 = 24² = 576 patches; `cls_patch` keeps CLS.
        let c = config(&format!(
            r#"{{{base}, "mm_vision_select_feature": "cls_patch"}}"#
        ))
        .unwrap();
        assert_eq!(c.image_feature_count(), 577);
        assert_eq!(c.vision_feature_layers, vec![-2]);
        assert_eq!(c.projector_depth, 1);
        let c = config(&format!(
            r#"{{{base}, "mm_vision_select_layer": -1, "mm_hidden_size": 32}}"#
        ))
        .unwrap();
        assert_eq!(c.image_feature_count(), 576);
        assert_eq!(c.vision_feature_layers, vec![-1]);
        for bad in [
            r#""mm_vision_select_layer": -5"#,
            r#""mm_hidden_size": 1024"#,
            r#""mm_vision_select_feature": "cls""#,
            r#""architectures": ["LlavaMptForCausalLM"]"#,
        ] {
            assert!(config(&format!("{{{base}, {bad}}}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn aspect_ratios() {
        assert!(!pad_to_square(None).unwrap());
        assert!(pad_to_square(Some("pad")).unwrap());
        let err = pad_to_square(Some("anyres")).unwrap_err().to_string();
        assert!(err.contains("LLaVA-NeXT"), "{err}");
    }
}
