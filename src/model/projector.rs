//! The multi-modal projector: CLIP features → decoder embedding space (`linear_1 → act → linear_2`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::LlavaConfig;
use super::layers::{activate, Linear};

pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: super::config::Activation,
}

impl Projector {
    pub fn load(vb: VarBuilder, cfg: &LlavaConfig) -> candle_core::Result<Self> {
        let in_dim = cfg.vision.hidden_size * cfg.vision_feature_layers.len();
        let out_dim = cfg.text.hidden_size;
        Ok(Self {
            linear_1: Linear::load(vb.pp("linear_1"), in_dim, out_dim, cfg.projector_bias)?,
            linear_2: Linear::load(vb.pp("linear_2"), out_dim, out_dim, cfg.projector_bias)?,
            act: cfg.projector_hidden_act,
        })
    }

    pub fn forward(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let h = activate(self.act, &self.linear_1.forward(features)?)?;
        self.linear_2.forward(&h)
    }
}
