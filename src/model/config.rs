//! HF `config.json` of a llava-hf checkpoint, read in both the transformers-4 style (sparse, relying on
//! LlamaConfig / CLIPVisionConfig defaults) and the transformers-5 style (`dtype`, `rope_parameters`), then
//! turned into the runtime config the model is built from. Strings become enums here, once.

use serde::Deserialize;
use std::path::Path;

use super::ModelError;

/// An activation function named by a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    /// HF's "gelu" is the exact erf form.
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "relu")]
    Relu,
}

/// Which CLIP hidden states feed the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSelectStrategy {
    /// Drop the CLS token.
    Default,
    /// Keep the CLS token.
    Full,
}

/// `vision_feature_layer`: one hidden-state index or several (concatenated on the feature axis).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayers {
    One(i64),
    Many(Vec<i64>),
}

impl FeatureLayers {
    pub fn as_slice(&self) -> &[i64] {
        match self {
            FeatureLayers::One(i) => std::slice::from_ref(i),
            FeatureLayers::Many(v) => v,
        }
    }
}

/// Storage dtype named by `torch_dtype` (transformers 4) or `dtype` (transformers 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum StorageDtype {
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float16")]
    F16,
    #[serde(rename = "bfloat16")]
    Bf16,
}

#[derive(Debug, Clone, Deserialize)]
struct RawRopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

/// The decoder part of the config as written on disk; every field optional so LlamaConfig defaults apply.
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct RawTextConfig {
    pub(super) model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<Activation>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    /// Mistral's; only `null` (absent means MistralConfig's default, 4096) is LLaMA-shaped.
    #[serde(default, deserialize_with = "present_value")]
    sliding_window: Option<serde_json::Value>,
}

/// A field that is present, even as `null`, is `Some` (absent stays `None` through `default`).
fn present_value<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// The CLIP vision part as written on disk; every field optional so CLIPVisionConfig defaults apply.
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct RawVisionConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<Activation>,
    layer_norm_eps: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawLlavaConfig {
    model_type: Option<String>,
    text_config: Option<RawTextConfig>,
    vision_config: Option<RawVisionConfig>,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    projector_hidden_act: Option<Activation>,
    multimodal_projector_bias: Option<bool>,
    vision_feature_layer: Option<FeatureLayers>,
    vision_feature_select_strategy: Option<FeatureSelectStrategy>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<StorageDtype>,
    dtype: Option<StorageDtype>,
    /// LLaVA-NeXT's grid resolutions, (height, width) pairs.
    image_grid_pinpoints: Option<Vec<Vec<usize>>>,
}

/// Runtime config of the LLaMA decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
}

/// Runtime config of the CLIP vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// Runtime config of the whole LLaVA model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub projector_hidden_act: Activation,
    pub projector_bias: bool,
    /// Linear layers of the projector: 2 for llava-hf and `mlp2x_gelu`, 1 for v1's `linear`.
    pub projector_depth: usize,
    pub vision_feature_layers: Vec<i64>,
    pub feature_select_strategy: FeatureSelectStrategy,
    pub storage_dtype: Option<StorageDtype>,
    /// Set for checkpoints in the original LLaVA format (`original`).
    pub original: Option<super::original::OriginalFormat>,
    /// Set for LLaVA-NeXT (`llava_next`): images are tiled and packed (`anyres`).
    pub anyres: Option<super::anyres::AnyRes>,
}

impl LlavaConfig {
    /// Image features (placeholder tokens) per image (per tile for LLaVA-NeXT): one per patch, plus
    /// CLS under the `full` strategy.
    pub fn image_feature_count(&self) -> usize {
        let cls = match self.feature_select_strategy {
            FeatureSelectStrategy::Default => 0,
            FeatureSelectStrategy::Full => 1,
        };
        self.vision.num_patches() + cls
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_json(json: &str) -> Result<Self, ModelError> {
        let raw: RawLlavaConfig =
            serde_json::from_str(json).map_err(|e| ModelError::Config(e.to_string()))?;
        let next = match raw.model_type.as_deref() {
            None | Some("llava") => false,
            Some("llava_next") => true,
            Some(mt) => {
                return Err(ModelError::Config(format!(
                "model_type is {mt:?}; only \"llava\" and \"llava_next\" checkpoints are supported"
            )))
            }
        };
        let text = text_config(raw.text_config.unwrap_or_default())?;
        let vision = vision_config(raw.vision_config)?;
        let vision_feature_layers = raw
            .vision_feature_layer
            .unwrap_or(FeatureLayers::One(-2))
            .as_slice()
            .to_vec();
        check_feature_layers("vision_feature_layer", &vision_feature_layers, &vision)?;
        let mut text = text;
        // A top-level tie_word_embeddings (the hub writes it there) overrides the text default.
        if let Some(tie) = raw.tie_word_embeddings {
            text.tie_word_embeddings = tie;
        }
        let mut config = LlavaConfig {
            text,
            vision,
            image_token_id: raw.image_token_index.unwrap_or(32000),
            projector_hidden_act: raw.projector_hidden_act.unwrap_or(Activation::Gelu),
            projector_bias: raw.multimodal_projector_bias.unwrap_or(true),
            projector_depth: 2,
            vision_feature_layers,
            feature_select_strategy: raw
                .vision_feature_select_strategy
                .unwrap_or(FeatureSelectStrategy::Default),
            storage_dtype: raw.dtype.or(raw.torch_dtype),
            original: None,
            anyres: None,
        };
        if next {
            config.anyres = Some(super::anyres::anyres_config(
                raw.image_grid_pinpoints,
                &config,
            )?);
        }
        Ok(config)
    }
}

/// Each feature layer indexes CLIP's hidden states (embeddings + one per layer), from either end;
/// `field` names the config key in errors.
pub(super) fn check_feature_layers(
    field: &str,
    layers: &[i64],
    vision: &VisionConfig,
) -> Result<(), ModelError> {
    let num_states = vision.num_hidden_layers as i64 + 1;
    for &layer in layers {
        if layer >= num_states || layer < -num_states {
            return Err(ModelError::Config(format!(
                "{field} {layer} is out of range for {} CLIP layers",
                vision.num_hidden_layers
            )));
        }
    }
    Ok(())
}

fn positive(name: &str, v: usize) -> Result<usize, ModelError> {
    if v == 0 {
        return Err(ModelError::Config(format!("{name} must be positive")));
    }
    Ok(v)
}

/// LlamaConfig defaults (transformers) for every field the file leaves out.
pub(super) fn text_config(raw: RawTextConfig) -> Result<TextConfig, ModelError> {
    let mistral = match raw.model_type.as_deref() {
        None | Some("llama") => false,
        Some("mistral") => true,
        Some(mt) => {
            return Err(ModelError::Config(format!(
                "text_config.model_type is {mt:?}; only \"llama\" and \"mistral\" decoders are supported"
            )))
        }
    };
    if mistral {
        match &raw.sliding_window {
            Some(serde_json::Value::Null) => {}
            Some(window) => {
                return Err(ModelError::Config(format!(
                    "text_config.sliding_window is {window}: sliding-window attention is not supported (only null)"
                )))
            }
            None => {
                return Err(ModelError::Config(
                    "text_config.sliding_window is absent, which means MistralConfig's 4096: sliding-window attention is not supported (only null)".into(),
                ))
            }
        }
    }
    // MistralConfig's defaults where they differ from LlamaConfig's.
    let (default_intermediate, default_kv, default_positions) = if mistral {
        (14336, Some(8), 4096 * 32)
    } else {
        (11008, None, 2048)
    };
    let hidden_size = positive("text_config.hidden_size", raw.hidden_size.unwrap_or(4096))?;
    let heads = positive(
        "text_config.num_attention_heads",
        raw.num_attention_heads.unwrap_or(32),
    )?;
    let kv_heads = positive(
        "text_config.num_key_value_heads",
        raw.num_key_value_heads.or(default_kv).unwrap_or(heads),
    )?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(ModelError::Config(format!(
            "text_config.num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )));
    }
    let head_dim = positive(
        "text_config.head_dim",
        raw.head_dim.unwrap_or(hidden_size / heads),
    )?;
    if !head_dim.is_multiple_of(2) {
        return Err(ModelError::Config(format!(
            "text_config head_dim {head_dim} must be even for rotary embeddings"
        )));
    }
    let mut rope_theta = raw.rope_theta.unwrap_or(10000.0);
    if let Some(params) = &raw.rope_parameters {
        if let Some(t) = params.rope_theta {
            rope_theta = t;
        }
        check_rope_type(params.rope_type.as_deref())?;
    }
    if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|v| v.as_str());
        check_rope_type(kind)?;
    }
    Ok(TextConfig {
        vocab_size: positive("text_config.vocab_size", raw.vocab_size.unwrap_or(32000))?,
        hidden_size,
        intermediate_size: positive(
            "text_config.intermediate_size",
            raw.intermediate_size.unwrap_or(default_intermediate),
        )?,
        num_hidden_layers: positive(
            "text_config.num_hidden_layers",
            raw.num_hidden_layers.unwrap_or(32),
        )?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        hidden_act: raw.hidden_act.unwrap_or(Activation::Silu),
        max_position_embeddings: positive(
            "text_config.max_position_embeddings",
            raw.max_position_embeddings.unwrap_or(default_positions),
        )?,
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        attention_bias: raw.attention_bias.unwrap_or(false),
        mlp_bias: raw.mlp_bias.unwrap_or(false),
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
    })
}

fn check_rope_type(kind: Option<&str>) -> Result<(), ModelError> {
    match kind {
        None | Some("default") => Ok(()),
        Some(other) => Err(ModelError::Config(format!(
            "rope type {other:?} is not supported (only \"default\")"
        ))),
    }
}

/// CLIPVisionConfig defaults, or LlavaConfig's own vision defaults (CLIP ViT-L/14-336) when the whole
/// `vision_config` is missing.
pub(super) fn vision_config(raw: Option<RawVisionConfig>) -> Result<VisionConfig, ModelError> {
    let (raw, base) = match raw {
        Some(raw) => (
            raw,
            VisionConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                num_channels: 3,
                image_size: 224,
                patch_size: 32,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
        ),
        None => (
            RawVisionConfig::default(),
            VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                num_channels: 3,
                image_size: 336,
                patch_size: 14,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
        ),
    };
    if let Some(mt) = &raw.model_type {
        if mt != "clip_vision_model" {
            return Err(ModelError::Config(format!(
                "vision_config.model_type is {mt:?}; only \"clip_vision_model\" is supported"
            )));
        }
    }
    let cfg = VisionConfig {
        hidden_size: positive(
            "vision_config.hidden_size",
            raw.hidden_size.unwrap_or(base.hidden_size),
        )?,
        intermediate_size: positive(
            "vision_config.intermediate_size",
            raw.intermediate_size.unwrap_or(base.intermediate_size),
        )?,
        num_hidden_layers: positive(
            "vision_config.num_hidden_layers",
            raw.num_hidden_layers.unwrap_or(base.num_hidden_layers),
        )?,
        num_attention_heads: positive(
            "vision_config.num_attention_heads",
            raw.num_attention_heads.unwrap_or(base.num_attention_heads),
        )?,
        num_channels: positive(
            "vision_config.num_channels",
            raw.num_channels.unwrap_or(base.num_channels),
        )?,
        image_size: positive(
            "vision_config.image_size",
            raw.image_size.unwrap_or(base.image_size),
        )?,
        patch_size: positive(
            "vision_config.patch_size",
            raw.patch_size.unwrap_or(base.patch_size),
        )?,
        hidden_act: raw.hidden_act.unwrap_or(base.hidden_act),
        layer_norm_eps: raw.layer_norm_eps.unwrap_or(base.layer_norm_eps),
    };
    if !cfg.image_size.is_multiple_of(cfg.patch_size) {
        return Err(ModelError::Config(format!(
            "vision_config.image_size {} is not a multiple of patch_size {}",
            cfg.image_size, cfg.patch_size
        )));
    }
    if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(ModelError::Config(format!(
            "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
            cfg.hidden_size, cfg.num_attention_heads
        )));
    }
    Ok(cfg)
}
