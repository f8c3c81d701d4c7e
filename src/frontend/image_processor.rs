//! CLIPImageProcessor / LlavaImageProcessor as llava-hf configures them, every value read from the
//! checkpoint's `preprocessor_config.json`: RGB conversion (alpha composited onto white, as
//! transformers does), optional pad-to-square with the mean colour, shortest-edge bicubic resize
//! (Pillow-exact), center crop, rescale, normalize.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::Path;

use super::anyres_tiles::{anyres_tiles, AnyResTiling};
use super::image_decode::{decode_rgb, Alpha, DEFAULT_MAX_PIXELS};
use super::media::read_header;
use super::pil_resize::{resize_bicubic, Image8};
use super::FrontendError;
use crate::model::config::LlavaConfig;
use crate::types::ProcessedImage;

#[derive(Debug, Clone, Default, Deserialize)]
struct RawSizeDict {
    shortest_edge: Option<usize>,
    height: Option<usize>,
    width: Option<usize>,
}

/// A size as a dict, or an old-style int (CLIPFeatureExtractor configs, as `openai/clip-vit-*`
/// ship): `size: 336` is a shortest edge and `crop_size: 336` a square, as transformers reads them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawSizeField {
    Int(usize),
    Dict(RawSizeDict),
}

fn size_dict(field: Option<RawSizeField>, int_is_square: bool) -> Option<RawSizeDict> {
    field.map(|f| match f {
        RawSizeField::Dict(d) => d,
        RawSizeField::Int(n) if int_is_square => RawSizeDict {
            height: Some(n),
            width: Some(n),
            ..RawSizeDict::default()
        },
        RawSizeField::Int(n) => RawSizeDict {
            shortest_edge: Some(n),
            ..RawSizeDict::default()
        },
    })
}

#[derive(Debug, Clone, Deserialize)]
struct RawProcessorConfig {
    image_processor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<RawSizeField>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<RawSizeField>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
    do_convert_rgb: Option<bool>,
    do_pad: Option<bool>,
    image_grid_pinpoints: Option<Vec<Vec<usize>>>,
}

/// Target of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Short side to this length, long side scaled and truncated.
    ShortestEdge(usize),
    Exact {
        height: usize,
        width: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub resize: Option<ResizeTarget>,
    pub crop: Option<(usize, usize)>,
    pub rescale_factor: Option<f64>,
    pub normalize: Option<([f32; 3], [f32; 3])>,
    pub convert_rgb: bool,
    pub pad_to_square: bool,
    pub image_mean: [f64; 3],
    /// transformers composites transparency onto white; the original LLaVA code drops it.
    pub alpha: Alpha,
    /// LlavaNextImageProcessor's tiling.
    pub anyres: Option<AnyResTiling>,
}

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const PIL_BICUBIC: u32 = 3;

fn three(name: &str, v: Option<Vec<f64>>, default: [f64; 3]) -> Result<[f64; 3], FrontendError> {
    match v {
        None => Ok(default),
        Some(v) => v.try_into().map_err(|v: Vec<f64>| {
            FrontendError::Config(format!("{name} needs 3 values, got {}", v.len()))
        }),
    }
}

impl ImageProcessorConfig {
    /// The processor a checkpoint's images get: its own `preprocessor_config.json`, or for the
    /// original format its CLIP tower's, with the model config's `pad` and the original's RGB
    /// conversion (`load_image` then `process_images` of llava-torch).
    pub fn for_checkpoint(dir: &Path, config: &LlavaConfig) -> Result<Self, FrontendError> {
        match &config.original {
            None => {
                let processor = Self::from_file(&dir.join("preprocessor_config.json"))?;
                match (&config.anyres, &processor.anyres) {
                    (None, None) => {}
                    (Some(model), Some(tiling))
                        if model.pinpoints == tiling.pinpoints && model.tile == tiling.tile => {}
                    _ => {
                        return Err(FrontendError::Config(
                            "the model config and preprocessor_config.json disagree on anyres tiling (model_type llava_next and LlavaNextImageProcessor go together, with the same image_grid_pinpoints and tile size)".into(),
                        ))
                    }
                }
                Ok(processor)
            }
            Some(original) => {
                let path = original.vision_tower.join("preprocessor_config.json");
                let mut processor = Self::from_file(&path)?;
                processor.pad_to_square = original.pad_to_square;
                processor.alpha = Alpha::Drop;
                Ok(processor)
            }
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, FrontendError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FrontendError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text)
            .map_err(|e| FrontendError::Config(format!("{}: {e}", path.display())))
    }

    /// CLIPImageProcessor defaults for absent fields; `do_pad` only for `LlavaImageProcessor`.
    pub fn from_json(json: &str) -> Result<Self, FrontendError> {
        let raw: RawProcessorConfig =
            serde_json::from_str(json).map_err(|e| FrontendError::Config(e.to_string()))?;
        let kind = raw
            .image_processor_type
            .as_deref()
            .unwrap_or("CLIPImageProcessor");
        let is_llava = kind.starts_with("LlavaImageProcessor");
        let is_next = kind.starts_with("LlavaNextImageProcessor");
        if !is_llava && !is_next && !kind.starts_with("CLIPImageProcessor") {
            return Err(FrontendError::Config(format!(
                "image_processor_type {kind:?} is not supported (CLIPImageProcessor, LlavaImageProcessor or LlavaNextImageProcessor)"
            )));
        }
        let resample = raw.resample.unwrap_or(PIL_BICUBIC);
        if resample != PIL_BICUBIC {
            return Err(FrontendError::Config(format!(
                "resample {resample} is not supported (only 3, bicubic)"
            )));
        }
        let resize = if raw.do_resize.unwrap_or(true) {
            Some(match size_dict(raw.size, false) {
                None => ResizeTarget::ShortestEdge(224),
                Some(RawSizeDict {
                    shortest_edge: Some(s),
                    ..
                }) => ResizeTarget::ShortestEdge(s),
                Some(RawSizeDict {
                    height: Some(height),
                    width: Some(width),
                    ..
                }) => ResizeTarget::Exact { height, width },
                Some(_) => {
                    return Err(FrontendError::Config(
                        "size needs shortest_edge or height and width".into(),
                    ))
                }
            })
        } else {
            None
        };
        let crop = if raw.do_center_crop.unwrap_or(true) {
            Some(match size_dict(raw.crop_size, true) {
                None => (224, 224),
                Some(RawSizeDict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }) => (h, w),
                Some(RawSizeDict {
                    shortest_edge: Some(s),
                    ..
                }) => (s, s),
                Some(_) => {
                    return Err(FrontendError::Config(
                        "crop_size needs height and width".into(),
                    ))
                }
            })
        } else {
            None
        };
        let mean = three("image_mean", raw.image_mean, CLIP_MEAN)?;
        let std = three("image_std", raw.image_std, CLIP_STD)?;
        if std.contains(&0.0) {
            return Err(FrontendError::Config("image_std must not contain 0".into()));
        }
        let f32s = |v: [f64; 3]| v.map(|x| x as f32);
        let mut processor = Self {
            resize,
            crop,
            rescale_factor: raw
                .do_rescale
                .unwrap_or(true)
                .then(|| raw.rescale_factor.unwrap_or(1.0 / 255.0)),
            normalize: raw
                .do_normalize
                .unwrap_or(true)
                .then(|| (f32s(mean), f32s(std))),
            convert_rgb: raw.do_convert_rgb.unwrap_or(true),
            pad_to_square: is_llava && raw.do_pad.unwrap_or(false),
            image_mean: mean,
            alpha: Alpha::CompositeOnWhite,
            anyres: None,
        };
        if is_next {
            processor.anyres = Some(AnyResTiling::new(raw.image_grid_pinpoints, &processor)?);
        }
        Ok(processor)
    }

    /// Decodes encoded image bytes (png, jpeg, webp, gif) and preprocesses them, under the default pixel cap.
    pub fn process_bytes(&self, bytes: &[u8]) -> Result<ProcessedImage, FrontendError> {
        self.process_bytes_within(bytes, DEFAULT_MAX_PIXELS)
    }

    /// Header first: the size is checked against `max_pixels` for the image itself and for every
    /// intermediate preprocessing would build, and only then is it decoded and preprocessed.
    pub fn process_bytes_within(
        &self,
        bytes: &[u8],
        max_pixels: u64,
    ) -> Result<ProcessedImage, FrontendError> {
        Ok(self.process(&self.decode_within(bytes, max_pixels)?))
    }

    /// The first half of `process_bytes_within`: header, size checks, then decoding to RGB.
    pub fn decode_within(&self, bytes: &[u8], max_pixels: u64) -> Result<Image8, FrontendError> {
        let header = read_header(bytes, max_pixels)?;
        let (width, height) = header.size();
        self.check_sizes(width, height, max_pixels)?;
        decode_rgb(bytes, &header, max_pixels, self.alpha)
    }

    /// Refuses an image whose pad canvas, resize target or resize intermediate (Pillow resizes one axis,
    /// then the other) would exceed `max_pixels`: a 1,000,000 × 1 image is tiny, but its shortest edge
    /// scaled to 336 is not.
    pub fn check_sizes(
        &self,
        width: usize,
        height: usize,
        max_pixels: u64,
    ) -> Result<(), FrontendError> {
        let too_large = |what: &str, w: usize, h: usize| {
            FrontendError::Image(format!(
                "the image is {width}×{height} pixels; {what} {w}×{h} pixels for this model, more than the {max_pixels} pixels allowed (--max-image-pixels)"
            ))
        };
        let pixels = |w: usize, h: usize| (w as u64).saturating_mul(h as u64);
        if let Some(anyres) = &self.anyres {
            let (w, h) = anyres.largest_intermediate(width, height);
            if pixels(w, h) > max_pixels {
                return Err(too_large("tiling it needs", w, h));
            }
            return Ok(());
        }
        let (mut w, mut h) = (width, height);
        if self.pad_to_square {
            let side = w.max(h);
            if pixels(side, side) > max_pixels {
                return Err(too_large("padding it to a square makes it", side, side));
            }
            (w, h) = (side, side);
        }
        if let Some(target) = self.resize {
            let (ow, oh) = resize_output_size(w, h, target);
            let largest = pixels(ow, oh).max(pixels(ow, h)).max(pixels(w, oh));
            if largest > max_pixels {
                return Err(too_large("resizing it needs", ow.max(w), oh.max(h)));
            }
        }
        Ok(())
    }

    /// Preprocesses an RGB image into CHW pixel values: one tile, or LLaVA-NeXT's base image and
    /// grid tiles (`anyres_tiles`).
    pub fn process(&self, rgb: &Image8) -> ProcessedImage {
        let content_hash = content_hash(rgb);
        let tiles = match &self.anyres {
            Some(anyres) => anyres_tiles(rgb, anyres),
            None if self.pad_to_square => vec![pad_to_square(rgb, self.mean_colour())],
            None => vec![rgb.clone()],
        };
        let mut pixel_values = Vec::new();
        let (mut height, mut width) = (0, 0);
        for tile in &tiles {
            let (values, h, w) = self.tile_values(tile);
            pixel_values.extend(values);
            (height, width) = (h, w);
        }
        ProcessedImage {
            pixel_values,
            tiles: tiles.len(),
            channels: 3,
            height,
            width,
            source_size: (rgb.height, rgb.width),
            content_hash,
        }
    }

    /// One tile through resize, crop, rescale and normalize: CHW values and the final height, width.
    fn tile_values(&self, tile: &Image8) -> (Vec<f32>, usize, usize) {
        let mut img = tile.clone();
        if let Some(target) = self.resize {
            let (w, h) = resize_output_size(img.width, img.height, target);
            img = resize_bicubic(&img, w, h);
        }
        if let Some((ch, cw)) = self.crop {
            img = center_crop(&img, ch, cw);
        }
        let plane = img.width * img.height;
        let mut pixel_values = vec![0f32; 3 * plane];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // Rescale in f64 then cast, as numpy does on a uint8 array times a Python float.
                let mut v = match self.rescale_factor {
                    Some(f) => (px[c] as f64 * f) as f32,
                    None => px[c] as f32,
                };
                if let Some((mean, std)) = &self.normalize {
                    v = (v - mean[c]) / std[c];
                }
                pixel_values[c * plane + i] = v;
            }
        }
        (pixel_values, img.height, img.width)
    }

    /// The pad colour of LlavaImageProcessor: `int(m * 255)` of each mean.
    fn mean_colour(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0) as u8)
    }
}

/// HF's `get_resize_output_image_size` with `default_to_square=False`: (width, height).
fn resize_output_size(w: usize, h: usize, target: ResizeTarget) -> (usize, usize) {
    match target {
        ResizeTarget::Exact { height, width } => (width, height),
        ResizeTarget::ShortestEdge(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (s as f64 * long as f64 / short as f64) as usize;
            if w <= h {
                (s, new_long)
            } else {
                (new_long, s)
            }
        }
    }
}

/// Pads to a square canvas of the mean colour, the image centred (offsets rounded down).
fn pad_to_square(img: &Image8, colour: [u8; 3]) -> Image8 {
    let side = img.width.max(img.height);
    if img.width == img.height {
        return img.clone();
    }
    let mut data: Vec<u8> = colour
        .iter()
        .copied()
        .cycle()
        .take(side * side * 3)
        .collect();
    let (x0, y0) = ((side - img.width) / 2, (side - img.height) / 2);
    for y in 0..img.height {
        let src = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let start = ((y0 + y) * side + x0) * 3;
        data[start..start + src.len()].copy_from_slice(src);
    }
    Image8 {
        width: side,
        height: side,
        channels: 3,
        data,
    }
}

/// HF's `center_crop`: crop at `((h−ch)//2, (w−cw)//2)`; a crop larger than the image pads with zeros.
fn center_crop(img: &Image8, crop_h: usize, crop_w: usize) -> Image8 {
    if img.height == crop_h && img.width == crop_w {
        return img.clone();
    }
    // Offsets of the crop window in the image's coordinates, floor-divided like Python's `//`.
    let top = (img.height as i64 - crop_h as i64).div_euclid(2);
    let left = (img.width as i64 - crop_w as i64).div_euclid(2);
    let mut data = vec![0u8; crop_h * crop_w * 3];
    for y in 0..crop_h {
        let sy = top + y as i64;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..crop_w {
            let sx = left + x as i64;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            let d = (y * crop_w + x) * 3;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Image8 {
        width: crop_w,
        height: crop_h,
        channels: 3,
        data,
    }
}

fn content_hash(img: &Image8) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((img.width as u64).to_le_bytes());
    h.update((img.height as u64).to_le_bytes());
    h.update(&img.data);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_truncates_the_long_side() {
        assert_eq!(
            resize_output_size(640, 480, ResizeTarget::ShortestEdge(336)),
            (448, 336)
        );
        assert_eq!(
            resize_output_size(200, 300, ResizeTarget::ShortestEdge(336)),
            (336, 504)
        );
        assert_eq!(
            resize_output_size(640, 480, ResizeTarget::ShortestEdge(224)),
            (298, 224)
        );
    }

    #[test]
    fn pad_centres_the_image() {
        let img = Image8 {
            width: 1,
            height: 3,
            channels: 3,
            data: vec![9; 9],
        };
        let out = pad_to_square(&img, [1, 2, 3]);
        assert_eq!((out.width, out.height), (3, 3));
        assert_eq!(&out.data[0..3], &[1, 2, 3]);
        assert_eq!(&out.data[3..6], &[9, 9, 9]);
    }
}
