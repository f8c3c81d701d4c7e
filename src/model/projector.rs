//! The multi-modal projector: CLIP features → decoder embedding space. llava-hf names its two layers
//! `linear_1 → act → linear_2`; the original format keeps the `nn.Sequential` indices (`0`, `2`, … for
//! `mlpNx_gelu`, the activations sitting at the odd indices) or, for v1's single `linear` projector, the
//! bare `mm_projector` weight.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::LlavaConfig;
use super::layers::{activate, Linear};

pub struct Projector {
    /// `act` runs between consecutive layers, not after the last.
    layers: Vec<Linear>,
    act: super::config::Activation,
}

impl Projector {
    pub fn load(vb: VarBuilder, cfg: &LlavaConfig) -> candle_core::Result<Self> {
        let in_dim = cfg.vision.hidden_size * cfg.vision_feature_layers.len();
        let out_dim = cfg.text.hidden_size;
        let depth = cfg.projector_depth;
        let mut layers = Vec::with_capacity(depth);
        for i in 0..depth {
            let layer_vb = match (&cfg.original, depth) {
                (None, _) => vb.pp(format!("linear_{}", i + 1)),
                (Some(_), 1) => vb.clone(),
                (Some(_), _) => vb.pp((2 * i).to_string()),
            };
            let input = if i == 0 { in_dim } else { out_dim };
            layers.push(Linear::load(layer_vb, input, out_dim, cfg.projector_bias)?);
        }
        Ok(Self {
            layers,
            act: cfg.projector_hidden_act,
        })
    }

    /// See `Linear::store_transposed`.
    pub fn store_weights_transposed(&mut self) -> candle_core::Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(Linear::store_transposed)
    }

    /// See `Linear::store_packed`.
    pub fn store_weights_packed(&mut self) -> candle_core::Result<()> {
        self.layers.iter_mut().try_for_each(Linear::store_packed)
    }

    pub fn forward(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.layers[0].forward(features)?;
        for layer in &self.layers[1..] {
            h = layer.forward(&activate(self.act, &h)?)?;
        }
        Ok(h)
    }
}
