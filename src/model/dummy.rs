//! `--load-format dummy`: random weights of a checkpoint's shapes, made on the device, so that speed can
//! be measured without downloading weights (as vLLM's `--load-format dummy`). Built-in shapes name the
//! real LLaVA-1.5 configs; the tokenizer and processor files come from the repository's fixture.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// Names of the built-in shapes accepted in place of a checkpoint with `--load-format dummy`.
pub const BUILTIN_SHAPES: &[&str] = &["llava-1.5-7b", "llava-1.5-13b"];

/// The hub config of a built-in shape (llava-hf/llava-1.5-{7b,13b}-hf, sparse as on the hub).
pub fn builtin_config(name: &str) -> Option<String> {
    let (hidden, intermediate, layers, heads) = match name {
        "llava-1.5-7b" => (4096, 11008, 32, 32),
        "llava-1.5-13b" => (5120, 13824, 40, 40),
        _ => return None,
    };
    Some(format!(
        r#"{{
  "model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
  "tie_word_embeddings": false, "torch_dtype": "float16", "vision_feature_layer": -2,
  "vision_feature_select_strategy": "default", "vocab_size": 32064,
  "text_config": {{"model_type": "llama", "hidden_size": {hidden}, "intermediate_size": {intermediate},
    "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05, "vocab_size": 32064}},
  "vision_config": {{"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
    "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
    "projection_dim": 768}}
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
        let c = LlavaConfig::from_json(&builtin_config(name).unwrap()).unwrap();
        let t = &c.text;
        let layer = 4 * t.hidden_size * t.hidden_size
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
        assert!(builtin_config("llava-2").is_none());
    }
}
