//! `--load-format dummy`: random weights of a checkpoint's shapes, made on the device, so that speed can
//! be measured without downloading weights (as vLLM's `--load-format dummy`). Built-in shapes name the
//! real LLaVA-1.5 configs; the tokenizer and processor files come from the repository's fixture.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Names of the built-in shapes accepted in place of a checkpoint with `--load-format dummy`: llava-hf
/// shapes, and the original-format checkpoints under their hub ids.
pub const BUILTIN_SHAPES: &[&str] = &[
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-mid",
    "liuhaotian/llava-v1.5-7b",
    "liuhaotian/llava-v1.5-13b",
    "llava-v1.6-mistral-7b",
    "llava-v1.6-34b",
];

/// The folder under `tests/fixtures` a built-in shape takes its tokenizer, template and processor
/// files from.
pub fn builtin_assets(name: &str) -> &'static str {
    match name {
        "llava-v1.6-mistral-7b" | "llava-v1.6-34b" => "next_assets",
        n if n.starts_with("liuhaotian/") => "original/llava-v1.5-tiny",
        _ => "tiny",
    }
}

/// llava-hf/llava-v1.6-mistral-7b-hf and llava-hf/llava-v1.6-34b-hf (Yi-34B, LLaMA-shaped), as their
/// hub configs give the shapes; CLIP ViT-L/14-336 and the standard pinpoints.
fn builtin_next_config(name: &str) -> Option<String> {
    let text = match name {
        "llava-v1.6-mistral-7b" => {
            r#"{"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": null, "vocab_size": 32064}"#
        }
        "llava-v1.6-34b" => {
            r#"{"model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480,
    "num_hidden_layers": 60, "num_attention_heads": 56, "num_key_value_heads": 8,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0,
    "vocab_size": 64064}"#
        }
        _ => return None,
    };
    Some(format!(
        r#"{{
  "model_type": "llava_next", "image_token_index": 32000, "projector_hidden_act": "gelu",
  "tie_word_embeddings": false, "torch_dtype": "float16", "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default",
  "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
  "text_config": {text},
  "vision_config": {{"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
    "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
    "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}}
}}"#
    ))
}

/// The flat `config.json` of an original-format built-in shape (as `liuhaotian/llava-v1.5-{7b,13b}`
/// publish it) and the `config.json` of its CLIP tower (`openai/clip-vit-large-patch14-336`, vision
/// half).
pub fn builtin_original_config(name: &str) -> Option<(String, String)> {
    let (hidden, intermediate, layers, heads) = match name {
        "liuhaotian/llava-v1.5-7b" => (4096, 11008, 32, 32),
        "liuhaotian/llava-v1.5-13b" => (5120, 13824, 40, 40),
        _ => return None,
    };
    let flat = format!(
        r#"{{
  "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
  "hidden_size": {hidden}, "intermediate_size": {intermediate}, "num_hidden_layers": {layers},
  "num_attention_heads": {heads}, "num_key_value_heads": {heads}, "max_position_embeddings": 4096,
  "rms_norm_eps": 1e-05, "vocab_size": 32000, "tie_word_embeddings": false, "torch_dtype": "float16",
  "image_aspect_ratio": "pad", "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
  "mm_use_im_patch_token": false, "mm_use_im_start_end": false, "mm_vision_select_feature": "patch",
  "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336"
}}"#
    );
    let tower = r#"{"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": {
  "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
  "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
  "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}}"#;
    Some((flat, tower.to_owned()))
}

/// Decoder and vision tower sizes of a built-in shape.
struct Shapes {
    text: (usize, usize, usize, usize),
    /// (hidden, intermediate, layers, heads, projection_dim, activation)
    vision: (usize, usize, usize, usize, usize, &'static str),
}

/// The hub config of a built-in shape: llava-hf/llava-1.5-{7b,13b}-hf, sparse as on the hub, and
/// `llava-mid`, the 307.6 M-parameter checkpoint the CPU speed comparisons use (CLIP-B-sized vision
/// tower at 336 px, a 12-layer 1024-wide LLaMA).
pub fn builtin_config(name: &str) -> Option<String> {
    if let Some(next) = builtin_next_config(name) {
        return Some(next);
    }
    let clip_large = (1024, 4096, 24, 16, 768, "quick_gelu");
    let shapes = match name {
        "llava-1.5-7b" => Shapes {
            text: (4096, 11008, 32, 32),
            vision: clip_large,
        },
        "llava-1.5-13b" => Shapes {
            text: (5120, 13824, 40, 40),
            vision: clip_large,
        },
        "llava-mid" => Shapes {
            text: (1024, 2816, 12, 16),
            vision: (768, 3072, 12, 12, 512, "quick_gelu"),
        },
        _ => return None,
    };
    let (hidden, intermediate, layers, heads) = shapes.text;
    let (v_hidden, v_intermediate, v_layers, v_heads, projection, act) = shapes.vision;
    Some(format!(
        r#"{{
  "model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
  "tie_word_embeddings": false, "torch_dtype": "float16", "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default", "vocab_size": 32064,
  "text_config": {{"model_type": "llama", "hidden_size": {hidden}, "intermediate_size": {intermediate},
    "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "vocab_size": 32064}},
  "vision_config": {{"model_type": "clip_vision_model", "hidden_size": {v_hidden}, "image_size": 336,
    "intermediate_size": {v_intermediate}, "num_attention_heads": {v_heads}, "num_hidden_layers": {v_layers},
    "patch_size": 14, "projection_dim": {projection}, "hidden_act": "{act}"}}
}}"#
    ))
}

/// Random weights: N(0, 0.02) for matrices and embeddings, ones for norm scales, zeros for biases
/// (so activations stay in a sane range through many layers).
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_norm = name.contains("norm") && name.ends_with("weight");
        if is_norm {
            Tensor::ones(s, dtype, dev)
        } else if name.ends_with("bias") {
            Tensor::zeros(s, dtype, dev)
        } else {
            Tensor::randn(0f32, 0.02f32, s, dev)?.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("dummy weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::LlavaConfig;

    fn params(name: &str) -> usize {
        params_of(&LlavaConfig::from_json(&builtin_config(name).unwrap()).unwrap())
    }

    fn params_of(c: &LlavaConfig) -> usize {
        let t = &c.text;
        let kv = t.num_key_value_heads * t.head_dim;
        let layer = 2 * t.hidden_size * t.hidden_size
            + 2 * t.hidden_size * kv
            + 3 * t.hidden_size * t.intermediate_size
            + 2 * t.hidden_size;
        let decoder =
            t.num_hidden_layers * layer + 2 * t.vocab_size * t.hidden_size + t.hidden_size;
        let v = &c.vision;
        let vlayer = 4 * (v.hidden_size * v.hidden_size + v.hidden_size)
            + 2 * v.hidden_size * v.intermediate_size
            + v.intermediate_size
            + v.hidden_size
            + 4 * v.hidden_size;
        let vision = v.num_hidden_layers * vlayer
            + 3 * 14 * 14 * v.hidden_size
            + (577 + 1) * v.hidden_size
            + 4 * v.hidden_size;
        let projector =
            v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size + 2 * t.hidden_size;
        decoder + vision + projector
    }

    #[test]
    fn builtin_shapes_have_the_published_sizes() {
        // LLaVA-1.5-7B has 7.06 B parameters, 13B 13.35 B (both including the 0.30 B CLIP ViT-L).
        let p7 = params("llava-1.5-7b") as f64 / 1e9;
        let p13 = params("llava-1.5-13b") as f64 / 1e9;
        assert!((p7 - 7.06).abs() < 0.02, "{p7}");
        assert!((p13 - 13.35).abs() < 0.03, "{p13}");
        // LLaVA-NeXT: 7.57 B (Mistral-7B + CLIP-L + projector), 34.8 B (Yi-34B), as the hub pages give them.
        let mistral = params("llava-v1.6-mistral-7b") as f64 / 1e9;
        let yi = params("llava-v1.6-34b") as f64 / 1e9;
        assert!((mistral - 7.57).abs() < 0.02, "{mistral}");
        assert!((yi - 34.75).abs() < 0.05, "{yi}");
        // The CPU comparisons' mid checkpoint: 307.6 M parameters.
        let mid = params("llava-mid") as f64 / 1e6;
        assert!((mid - 307.6).abs() < 0.1, "{mid}");
        assert!(builtin_config("llava-2").is_none());
    }

    #[test]
    fn original_builtin_shapes_have_the_published_sizes() {
        for (name, billions) in [
            ("liuhaotian/llava-v1.5-7b", 7.06),
            ("liuhaotian/llava-v1.5-13b", 13.35),
        ] {
            let (flat, tower) = builtin_original_config(name).unwrap();
            let c = crate::model::original::config_with_tower(
                name,
                &flat,
                &tower,
                std::path::PathBuf::new(),
                &Default::default(),
            )
            .unwrap();
            let p = params_of(&c) as f64 / 1e9;
            assert!((p - billions).abs() < 0.03, "{name}: {p}");
            assert_eq!(c.projector_depth, 2);
            assert_eq!(c.image_feature_count(), 576);
            let original = c.original.unwrap();
            assert!(original.pad_to_square && !original.use_im_start_end);
            assert_eq!(original.model_name, name.trim_start_matches("liuhaotian/"));
        }
    }
}
