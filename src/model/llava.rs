//! LLaVA glue: loads the three parts from a checkpoint, turns pixel values into image features, and runs
//! one batched forward step in which image features replace the embeddings of their placeholder tokens.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::anyres::ImageGeometry;
use super::attention::AttentionMetadata;
use super::checkpoint::{CheckpointDir, WeightFiles, WeightFormat};
use super::clip::ClipVisionTower;
use super::config::{FeatureSelectStrategy, LlavaConfig};
use super::kv_cache::{KvCache, KvCacheShape};
use super::llama::LlamaDecoder;
use super::projector::Projector;
use super::torch_bin::TorchBinWeights;
use super::ModelError;

/// Tensor-name prefixes of the two layouts llava-hf checkpoints exist in (the original format's are
/// in `LlavaModel::load`).
struct NameLayout {
    vision: &'static str,
    projector: &'static str,
    decoder: &'static str,
    lm_head: &'static str,
    /// LLaVA-NeXT's `image_newline` vector.
    image_newline: &'static str,
}

/// The hub's transformers-4 layout (`language_model.model.*`).
const HUB_LAYOUT: NameLayout = NameLayout {
    vision: "vision_tower.vision_model",
    projector: "multi_modal_projector",
    decoder: "language_model.model",
    lm_head: "language_model.lm_head",
    image_newline: "image_newline",
};
/// The layout newer transformers save (`model.language_model.*`).
const NESTED_LAYOUT: NameLayout = NameLayout {
    vision: "model.vision_tower.vision_model",
    projector: "model.multi_modal_projector",
    decoder: "model.language_model",
    lm_head: "lm_head",
    image_newline: "model.image_newline",
};

/// Where each part's weights are.
struct Parts<'a> {
    /// The root, for tensors outside the parts (`image_newline`).
    root: VarBuilder<'a>,
    image_newline: &'static str,
    vision: VarBuilder<'a>,
    projector: VarBuilder<'a>,
    decoder: VarBuilder<'a>,
    lm_head: VarBuilder<'a>,
}

/// A `VarBuilder` over a checkpoint's weight files, whichever format they are in.
fn var_builder(
    weights: &WeightFiles,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    match weights.format {
        // SAFETY: the files are memory-mapped read-only; a checkpoint changed on disk while we run
        // is outside what we defend against (as everywhere safetensors are mmapped).
        WeightFormat::Safetensors => {
            unsafe { VarBuilder::from_mmaped_safetensors(&weights.files, dtype, device) }
                .map_err(|e| ModelError::Weights(e.to_string()))
        }
        WeightFormat::TorchBin => {
            let tensors = TorchBinWeights::open(&weights.files)?;
            Ok(VarBuilder::from_backend(
                Box::new(tensors),
                dtype,
                device.clone(),
            ))
        }
    }
}

/// One forward step's inputs: flattened tokens of all scheduled sequences.
pub struct ForwardInput<'a> {
    /// `[num_tokens]` u32 token ids; image placeholders included.
    pub token_ids: &'a Tensor,
    /// Image features `[rows, hidden]` and the flattened-batch row each replaces (`[rows]` u32).
    pub image_rows: Option<(&'a Tensor, &'a Tensor)>,
    pub attention: &'a AttentionMetadata,
    /// Rows of the batch whose logits are wanted (usually each sequence's last token), `[k]` u32.
    pub logits_rows: &'a Tensor,
}

pub struct LlavaModel {
    pub config: LlavaConfig,
    vision: ClipVisionTower,
    projector: Projector,
    decoder: LlamaDecoder,
    /// LLaVA-NeXT: the row appended after each row of an image's unpadded feature grid.
    image_newline: Option<Tensor>,
    dtype: DType,
    device: Device,
}

impl LlavaModel {
    /// Loads weights (safetensors memory-mapped, `.bin` read through) into `dtype` on `device`; an
    /// original-format checkpoint's vision weights come from its CLIP tower's checkpoint.
    pub fn load(
        checkpoint: &CheckpointDir,
        config: LlavaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = var_builder(&checkpoint.weights()?, dtype, device)?;
        let Some(original) = &config.original else {
            return Self::from_var_builder(vb, config, dtype, device);
        };
        let tower = CheckpointDir {
            root: original.vision_tower.clone(),
        };
        let tower_vb = var_builder(&tower.weights()?, dtype, device)?;
        let parts = Parts {
            root: vb.clone(),
            image_newline: "image_newline",
            vision: tower_vb.pp("vision_model"),
            projector: vb.pp("model.mm_projector"),
            decoder: vb.pp("model"),
            lm_head: vb.pp("lm_head"),
        };
        Self::from_parts(parts, config, dtype, device)
    }

    /// Random weights of the config's shapes, made on `device` (`--load-format dummy`).
    pub fn dummy(config: LlavaConfig, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let vb =
            VarBuilder::from_backend(Box::new(super::dummy::RandomWeights), dtype, device.clone());
        Self::from_var_builder(vb, config, dtype, device)
    }

    fn from_var_builder(
        vb: VarBuilder,
        config: LlavaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let layout = if vb.contains_tensor("model.language_model.embed_tokens.weight") {
            &NESTED_LAYOUT
        } else {
            &HUB_LAYOUT
        };
        let parts = Parts {
            root: vb.clone(),
            image_newline: layout.image_newline,
            vision: vb.pp(layout.vision),
            projector: vb.pp(layout.projector),
            decoder: vb.pp(layout.decoder),
            lm_head: vb.pp(layout.lm_head),
        };
        Self::from_parts(parts, config, dtype, device)
    }

    fn from_parts(
        parts: Parts,
        config: LlavaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let weights = |e: candle_core::Error| ModelError::Weights(e.to_string());
        let mut vision =
            ClipVisionTower::load(parts.vision, &config.vision, &config.vision_feature_layers)
                .map_err(weights)?;
        let mut projector = Projector::load(parts.projector, &config).map_err(weights)?;
        let mut decoder =
            LlamaDecoder::load(parts.decoder, parts.lm_head, &config.text).map_err(weights)?;
        if device.is_cpu() {
            if dtype == DType::F32 {
                // `packed_gemm` where this CPU runs it: one layout for prefill and decode alike,
                // the `[out, in]` copy dropped (vision+projector 0.34–0.43 → 0.32–0.35 s, prefill
                // of 600 tokens 0.75–1.07 → 0.65–0.81 s on the mid checkpoint, interleaved runs).
                vision.store_weights_packed().map_err(weights)?;
                projector.store_weights_packed().map_err(weights)?;
                decoder.store_weights_packed().map_err(weights)?;
            }
            // What is left unpacked only ever multiplies many rows in the vision tower and the
            // projector: the layout the CPU GEMM prefers.
            vision.store_weights_transposed().map_err(weights)?;
            projector.store_weights_transposed().map_err(weights)?;
        }
        let image_newline = match &config.anyres {
            None => None,
            Some(_) => Some(
                parts
                    .root
                    .get(config.text.hidden_size, parts.image_newline)
                    .map_err(weights)?,
            ),
        };
        Ok(Self {
            config,
            vision,
            projector,
            decoder,
            image_newline,
            dtype,
            device: device.clone(),
        })
    }

    /// Whether forward steps want `AttentionMetadata::build_for(.., kernels = true)`.
    pub fn uses_attention_kernels(&self) -> bool {
        self.decoder.uses_kernels()
    }

    /// Free and total memory of the model's GPU; `None` on the CPU.
    pub fn device_memory(&self) -> Result<Option<super::DeviceMemory>, ModelError> {
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let (free, total) = cuda
                    .cuda_stream()
                    .context()
                    .mem_get_info()
                    .map_err(|e| ModelError::Config(format!("cannot read GPU memory: {e}")))?;
                Ok(Some(super::DeviceMemory { free, total }))
            }
            _ => Ok(None),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Shape of a KV cache for this model.
    pub fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_layers: self.config.text.num_hidden_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.config.text.num_key_value_heads,
            head_dim: self.config.text.head_dim,
        }
    }

    pub fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<KvCache, ModelError> {
        Ok(KvCache::new(
            self.kv_cache_shape(num_blocks, block_size),
            self.dtype,
            &self.device,
        )?)
    }

    /// CLIP features the projector consumes, `[images, features, vision_hidden × layers]`
    /// (CLS dropped under the default strategy).
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor, ModelError> {
        let states = self.vision.forward(&pixel_values.to_dtype(self.dtype)?)?;
        Ok(match self.config.feature_select_strategy {
            FeatureSelectStrategy::Default => {
                let tokens = states.dim(1)?;
                states.narrow(1, 1, tokens - 1)?
            }
            FeatureSelectStrategy::Full => states,
        })
    }

    /// Image features in the decoder's embedding space: `[images, features, text_hidden]`.
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self
            .projector
            .forward(&self.vision_features(pixel_values)?)?)
    }

    /// Each image's rows that replace its placeholder tokens, `[tokens, text_hidden]` per image.
    /// `pixel_values` holds every image's tiles in order, `images` says how many are whose. LLaVA-1.5:
    /// one tile, its features. LLaVA-NeXT: the base tile's features, then the grid's feature map
    /// unpadded to the image's aspect ratio with an `image_newline` row after each of its rows, as
    /// transformers' `pack_image_features` lays them out.
    pub fn image_token_features(
        &self,
        pixel_values: &Tensor,
        images: &[ImageGeometry],
    ) -> Result<Vec<Tensor>, ModelError> {
        let features = self.encode_images(pixel_values)?;
        let (Some(anyres), Some(newline)) = (&self.config.anyres, &self.image_newline) else {
            return (0..images.len()).map(|i| Ok(features.get(i)?)).collect();
        };
        let side = anyres.patches_per_side;
        let hidden = features.dim(2)?;
        let mut out = Vec::with_capacity(images.len());
        let mut first = 0;
        for image in images {
            let tiles = features.narrow(0, first, image.tiles)?;
            first += image.tiles;
            let (rows, cols) = anyres.grid(image.height, image.width);
            if image.tiles != rows * cols + 1 {
                return Err(ModelError::Config(format!(
                    "an image of {}×{} has {} tiles, not the {} its grid needs",
                    image.width,
                    image.height,
                    image.tiles,
                    rows * cols + 1
                )));
            }
            let base = tiles.get(0)?;
            // [rows, cols, side, side, C] → [C, rows·side, cols·side]
            let grid = tiles
                .narrow(0, 1, rows * cols)?
                .reshape((rows, cols, side, side, hidden))?
                .permute((4, 0, 2, 1, 3))?
                .contiguous()?
                .reshape((hidden, rows * side, cols * side))?;
            let keep = anyres.unpadded(image.height, image.width);
            let grid =
                grid.narrow(1, keep.first_row, keep.rows)?
                    .narrow(2, keep.first_col, keep.cols)?;
            let newlines = newline
                .to_dtype(grid.dtype())?
                .reshape((hidden, 1, 1))?
                .broadcast_as((hidden, keep.rows, 1))?;
            let grid = Tensor::cat(&[&grid, &newlines], 2)?
                .reshape((hidden, keep.rows * (keep.cols + 1)))?
                .t()?;
            out.push(Tensor::cat(&[&base, &grid], 0)?.contiguous()?);
        }
        Ok(out)
    }

    /// The decoder's linear weights in f16 from now on (`--cpu-f16-weights`; the caller checks that
    /// the model runs in f32 on the CPU).
    pub fn store_decoder_weights_f16(&mut self) -> candle_core::Result<()> {
        self.decoder.store_weights_f16()
    }

    /// One batched step: logits `[logits_rows, vocab]` in f32.
    pub fn forward(
        &self,
        input: &ForwardInput<'_>,
        kv_cache: &KvCache,
    ) -> Result<Tensor, ModelError> {
        let embeds = self.decoder.embed(input.token_ids)?;
        if let Some((features, rows)) = input.image_rows {
            let hidden = embeds.dim(1)?;
            let index = rows
                .reshape((rows.dim(0)?, 1))?
                .broadcast_as((rows.dim(0)?, hidden))?
                .contiguous()?;
            embeds.scatter_set(&index, &features.to_dtype(self.dtype)?, 0)?;
        }
        let hidden = self
            .decoder
            .forward_hidden(&embeds, input.attention, kv_cache)?;
        let rows = hidden.index_select(input.logits_rows, 0)?;
        Ok(self.decoder.logits(&rows)?.to_dtype(DType::F32)?)
    }

    /// A text-only step in which every row wants its logits (a decode step): f32 `[num_tokens, vocab]`.
    pub fn decode_logits(
        &self,
        token_ids: &Tensor,
        attention: &AttentionMetadata,
        kv_cache: &KvCache,
    ) -> Result<Tensor, ModelError> {
        let embeds = self.decoder.embed(token_ids)?;
        let hidden = self.decoder.forward_hidden(&embeds, attention, kv_cache)?;
        Ok(self.decoder.logits(&hidden)?.to_dtype(DType::F32)?)
    }
}
