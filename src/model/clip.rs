//! The CLIP vision tower (HF `CLIPVisionModel`): patch embedding, class token, learned positions,
//! `pre_layrnorm` (sic, the checkpoint's name) and pre-norm encoder layers. Only the layers up to the
//! deepest one the config selects are loaded and run; `post_layernorm` is never used by LLaVA.

use candle_core::{Module, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use super::attention::full_attention;
use super::config::{Activation, VisionConfig};
use super::cpu_attention::merged_qkv_attention;
use super::layers::{activate, layer_norm, Linear};

struct EncoderLayer {
    layer_norm1: LayerNorm,
    /// q, k and v projections stacked: one GEMM instead of three.
    qkv_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    heads: usize,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &VisionConfig) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: layer_norm(vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            qkv_proj: Linear::load_merged(
                &[
                    (attn.pp("q_proj"), d),
                    (attn.pp("k_proj"), d),
                    (attn.pp("v_proj"), d),
                ],
                d,
                true,
            )?,
            out_proj: Linear::load(attn.pp("out_proj"), d, d, true)?,
            layer_norm2: layer_norm(vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            fc1: Linear::load(mlp.pp("fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(mlp.pp("fc2"), cfg.intermediate_size, d, true)?,
            act: cfg.hidden_act,
            heads: cfg.num_attention_heads,
        })
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.qkv_proj,
            &mut self.out_proj,
            &mut self.fc1,
            &mut self.fc2,
        ]
    }

    /// `x`: `[batch, tokens, hidden]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let h = self.layer_norm1.forward(x)?;
        let qkv = self.qkv_proj.forward(&h)?;
        let scale = (head_dim as f64).powf(-0.5);
        let attn = match merged_qkv_attention(&qkv, self.heads, scale as f32)? {
            Some(attn) => attn,
            None => {
                let split = |part: usize| -> candle_core::Result<Tensor> {
                    qkv.narrow(2, part * d, d)?
                        .reshape((b, t, self.heads, head_dim))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                full_attention(&q, &k, &v, scale)?
                    .transpose(1, 2)?
                    .reshape((b, t, d))?
            }
        };
        let x = (x + self.out_proj.forward(&attn)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self
            .fc2
            .forward(&activate(self.act, &self.fc1.forward(&h)?)?)?;
        x + h
    }
}

pub struct ClipVisionTower {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    /// Hidden-state indices to return (0 = embeddings after `pre_layrnorm`, k = after k layers).
    feature_states: Vec<usize>,
    cfg: VisionConfig,
}

impl ClipVisionTower {
    /// `feature_layers` as in the config (negative counts from the end of `hidden_states`).
    pub fn load(
        vb: VarBuilder,
        cfg: &VisionConfig,
        feature_layers: &[i64],
    ) -> candle_core::Result<Self> {
        let num_states = cfg.num_hidden_layers as i64 + 1;
        let feature_states: Vec<usize> = feature_layers
            .iter()
            .map(|&l| (if l < 0 { num_states + l } else { l }) as usize)
            .collect();
        let deepest = feature_states.iter().copied().max().unwrap_or(0);
        let emb = vb.pp("embeddings");
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let patch_weight = emb
            .pp("patch_embedding")
            .get((d, cfg.num_channels, p, p), "weight")?
            .reshape((d, cfg.num_channels * p * p))?;
        let enc = vb.pp("encoder").pp("layers");
        let layers = (0..deepest)
            .map(|i| EncoderLayer::load(enc.pp(i), cfg))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            patch_weight,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.num_patches() + 1, d), "weight")?,
            pre_layrnorm: layer_norm(vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers,
            feature_states,
            cfg: cfg.clone(),
        })
    }

    /// See `Linear::store_transposed`.
    pub fn store_weights_transposed(&mut self) -> candle_core::Result<()> {
        self.layers
            .iter_mut()
            .flat_map(EncoderLayer::linears_mut)
            .try_for_each(Linear::store_transposed)
    }

    /// See `Linear::store_packed`.
    pub fn store_weights_packed(&mut self) -> candle_core::Result<()> {
        self.layers
            .iter_mut()
            .flat_map(EncoderLayer::linears_mut)
            .try_for_each(Linear::store_packed)
    }

    /// Patch embedding as one matmul: a stride-`p` convolution without bias is exactly this.
    fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if h != self.cfg.image_size || w != self.cfg.image_size || c != self.cfg.num_channels {
            candle_core::bail!(
                "pixel values {:?} do not match the vision tower's {}×{}×{}",
                pixels.shape(),
                self.cfg.num_channels,
                self.cfg.image_size,
                self.cfg.image_size
            );
        }
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let d = self.cfg.hidden_size;
        let patch_embeds = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, gh * gw, d))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &patch_embeds], 1)?;
        x.broadcast_add(&self.position_embedding.unsqueeze(0)?)
    }

    /// The selected hidden states, concatenated on the feature axis: `[batch, patches + 1, hidden × n]`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.pre_layrnorm.forward(&self.embed(pixels)?)?;
        let mut states = vec![None; self.layers.len() + 1];
        let wanted = |i: usize| self.feature_states.contains(&i);
        if wanted(0) {
            states[0] = Some(x.clone());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if wanted(i + 1) {
                states[i + 1] = Some(x.clone());
            }
        }
        let selected: Vec<Tensor> = self
            .feature_states
            .iter()
            .map(|&i| states[i].clone().expect("every selected state was kept"))
            .collect();
        Tensor::cat(&selected, D::Minus1)
    }
}
