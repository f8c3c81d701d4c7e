//! The LLaMA decoder over a flattened batch: `[num_tokens, hidden]` rows from many sequences, rotary
//! positions per token, K/V written into and read from the paged cache through `AttentionMetadata`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::attention::{paged_attention, write_kv, AttentionMetadata, KernelMetadata};
use super::config::{Activation, TextConfig};
use super::kv_cache::KvCache;
use super::layers::{gated_activation, Linear, RmsNorm};

/// cos/sin tables for every position up to the context limit, computed in f32 as HF does.
struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
    /// `[max_positions, head_dim]` f32, cos then sin: the fused rotary kernel's table.
    cos_sin: Tensor,
}

impl RotaryTables {
    fn new(cfg: &TextConfig, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        Ok(Self {
            cos_sin: Tensor::cat(&[&cos, &sin], 1)?,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }

    /// The cos and sin rows of the given positions, selected once per step for every layer.
    fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }

    /// Rotates `[num_tokens, heads, head_dim]` (HF's rotate-half layout) by rows from `at`.
    fn apply(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
    }
}

/// One layer. q/k/v and gate/up are loaded merged (one GEMM each, outputs side by side in a row):
/// fewer launches per step, and wider GEMMs for small decode batches.
struct DecoderLayer {
    input_layernorm: RmsNorm,
    qkv_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &TextConfig) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), d, cfg.rms_norm_eps)?,
            qkv_proj: Linear::load_merged(
                &[
                    (attn.pp("q_proj"), q_dim),
                    (attn.pp("k_proj"), kv_dim),
                    (attn.pp("v_proj"), kv_dim),
                ],
                d,
                ab,
            )?,
            o_proj: Linear::load(attn.pp("o_proj"), q_dim, d, ab)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                d,
                cfg.rms_norm_eps,
            )?,
            gate_up_proj: Linear::load_merged(
                &[
                    (mlp.pp("gate_proj"), cfg.intermediate_size),
                    (mlp.pp("up_proj"), cfg.intermediate_size),
                ],
                d,
                mb,
            )?,
            down_proj: Linear::load(mlp.pp("down_proj"), cfg.intermediate_size, d, mb)?,
        })
    }
}

pub struct LlamaDecoder {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: RotaryTables,
    cfg: TextConfig,
}

impl LlamaDecoder {
    /// `model_vb` points at the `model.` prefix (embeddings, layers, norm); `lm_head_vb` at `lm_head`.
    pub fn load(
        model_vb: VarBuilder,
        lm_head_vb: VarBuilder,
        cfg: &TextConfig,
    ) -> candle_core::Result<Self> {
        let embed_tokens = model_vb
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weight(embed_tokens.clone())
        } else {
            Linear::load(lm_head_vb, cfg.hidden_size, cfg.vocab_size, false)?
        };
        let layers_vb = model_vb.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(layers_vb.pp(i), cfg))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            norm: RmsNorm::load(model_vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            rotary: RotaryTables::new(cfg, embed_tokens.dtype(), embed_tokens.device())?,
            embed_tokens,
            layers,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings `[num_tokens, hidden]` for `[num_tokens]` u32 ids.
    pub fn embed(&self, token_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_tokens.index_select(token_ids, 0)
    }

    /// Whether steps should run through our fused kernels (built with `cuda`, on a GPU, head dim 64 or
    /// 128); otherwise the reference path of candle ops runs.
    pub fn uses_kernels(&self) -> bool {
        cfg!(feature = "cuda")
            && self.embed_tokens.device().is_cuda()
            && matches!(self.cfg.head_dim, 64 | 128)
    }

    /// Runs every layer over `[num_tokens, hidden]` input embeddings, writing K/V into `kv_cache`;
    /// returns the final hidden states before the last norm.
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        meta: &AttentionMetadata,
        kv_cache: &KvCache,
    ) -> candle_core::Result<Tensor> {
        if let Some(kernel) = &meta.kernel {
            return self.forward_fused(embeds, meta, kernel, kv_cache);
        }
        let cfg = &self.cfg;
        let n = meta.num_tokens;
        let scale = (cfg.head_dim as f64).powf(-0.5);
        let mut x = embeds.clone();
        let rotation = self.rotary.at(&meta.positions)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let qkv = layer.qkv_proj.forward(&h)?;
            let (qd, kvd) = (
                cfg.num_attention_heads * cfg.head_dim,
                cfg.num_key_value_heads * cfg.head_dim,
            );
            let part = |start: usize, width: usize, heads: usize| {
                qkv.narrow(1, start, width)?
                    .contiguous()?
                    .reshape((n, heads, cfg.head_dim))
            };
            let q = part(0, qd, cfg.num_attention_heads)?;
            let k = part(qd, kvd, cfg.num_key_value_heads)?;
            let v = part(qd + kvd, kvd, cfg.num_key_value_heads)?;
            let q = RotaryTables::apply(&q, &rotation)?;
            let k = RotaryTables::apply(&k, &rotation)?;
            let (key_cache, value_cache) = kv_cache.layer(i);
            write_kv(
                key_cache,
                value_cache,
                &k,
                &v.contiguous()?,
                &meta.slot_mapping,
            )?;
            let attn = paged_attention(
                &q,
                key_cache,
                value_cache,
                meta,
                cfg.num_key_value_heads,
                scale,
            )?;
            x = (x + layer.o_proj.forward(&attn)?)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            let gate_up = layer.gate_up_proj.forward(&h)?;
            let inter = cfg.intermediate_size;
            let mlp =
                layer
                    .down_proj
                    .forward(&gated_activation(cfg.hidden_act, &gate_up, inter)?)?;
            x = (x + mlp)?;
        }
        Ok(x)
    }

    /// The same computation through the fused kernels: residual add + norm in one op, rotary at
    /// explicit positions, K/V written by slot, paged attention read through block tables.
    fn forward_fused(
        &self,
        embeds: &Tensor,
        meta: &AttentionMetadata,
        kernel: &KernelMetadata,
        kv_cache: &KvCache,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let n = meta.num_tokens;
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let scale = (d as f32).powf(-0.5);
        let eps = cfg.rms_norm_eps as f32;
        let paged = llava_kernels::PagedLayout {
            block_tables: kernel.block_tables.clone(),
            block_size: kernel.block_size,
            num_kv_heads: kv_heads,
        };
        let mut x = embeds.clone();
        let mut residual: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (h, res) = match residual.take() {
                None => (layer.input_layernorm.forward(&x)?, x.clone()),
                Some(r) => {
                    llava_kernels::add_rms_norm(&x, &r, layer.input_layernorm.weight(), eps)?
                }
            };
            let qkv = layer.qkv_proj.forward(&h)?;
            let (q, k) = llava_kernels::rotary_qk(
                &qkv,
                &self.rotary.cos_sin,
                &meta.positions,
                heads,
                kv_heads,
            )?;
            let (key_cache, value_cache) = kv_cache.layer(i);
            llava_kernels::write_kv(
                key_cache,
                &k.reshape((n, kv_heads * d))?,
                &meta.slot_mapping,
            )?;
            let v = qkv.narrow(1, (heads + kv_heads) * d, kv_heads * d)?;
            llava_kernels::write_kv(value_cache, &v, &meta.slot_mapping)?;
            let attn = if kernel.all_decode {
                llava_kernels::decode_attention(
                    &q,
                    key_cache,
                    value_cache,
                    &kernel.context_lens,
                    kernel.max_context,
                    &paged,
                    scale,
                )?
            } else {
                llava_kernels::prefill_attention(
                    &q,
                    key_cache,
                    value_cache,
                    &meta.positions,
                    &kernel.token_seq,
                    &kernel.prefill,
                    &paged,
                    scale,
                )?
            };
            let o = layer.o_proj.forward(&attn.reshape((n, heads * d))?)?;
            let (h, res) = llava_kernels::add_rms_norm(
                &o,
                &res,
                layer.post_attention_layernorm.weight(),
                eps,
            )?;
            let gate_up = layer.gate_up_proj.forward(&h)?;
            let act = match cfg.hidden_act {
                Activation::Silu => llava_kernels::silu_mul(&gate_up)?,
                other => gated_activation(other, &gate_up, cfg.intermediate_size)?,
            };
            x = layer.down_proj.forward(&act)?;
            residual = Some(res);
        }
        match residual {
            Some(r) => x + r,
            None => Ok(x),
        }
    }

    /// Every linear weight of the decoder (and the lm_head) stored in f16 from now on; see
    /// `Linear::store_weight_f16`.
    pub fn store_weights_f16(&mut self) -> candle_core::Result<()> {
        self.linears_mut().try_for_each(Linear::store_weight_f16)
    }

    /// Every linear weight of the decoder (and the lm_head) packed for the CPU kernel that serves
    /// both prefill and decode, where this CPU runs it; see `Linear::store_packed`. For f32 models.
    pub fn store_weights_packed(&mut self) -> candle_core::Result<()> {
        self.linears_mut().try_for_each(Linear::store_packed)
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|layer| {
                [
                    &mut layer.qkv_proj,
                    &mut layer.o_proj,
                    &mut layer.gate_up_proj,
                    &mut layer.down_proj,
                ]
            })
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// Final norm and lm_head for the given rows of hidden states: `[rows, vocab]`.
    pub fn logits(&self, hidden_rows: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden_rows)?)
    }
}
