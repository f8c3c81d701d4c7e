//! Turning a `TokenizedPrompt`'s images into model tensors: pixel values in, image features out, and
//! the rows of a step's flattened batch that they replace.

use candle_core::{Device, Tensor};

use crate::model::anyres::ImageGeometry;
use crate::model::{LlavaModel, ModelError};
use crate::types::{ImageSpan, ProcessedImage};

/// Every tile of every image, in order, as `[tiles, c, h, w]` pixel values.
pub fn pixel_values(images: &[ProcessedImage], device: &Device) -> Result<Tensor, ModelError> {
    let tensors = images
        .iter()
        .map(|img| {
            Tensor::from_slice(
                &img.pixel_values,
                (img.tiles, img.channels, img.height, img.width),
                device,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&tensors, 0)?)
}

/// Each image's rows for its placeholder tokens, one `[tokens, hidden]` tensor per image.
pub fn encode_images(
    model: &LlavaModel,
    images: &[ProcessedImage],
) -> Result<Vec<Tensor>, ModelError> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let geometry: Vec<ImageGeometry> = images.iter().map(geometry).collect();
    model.image_token_features(&pixel_values(images, model.device())?, &geometry)
}

/// The model's view of a processed image: its tiles and source size.
pub fn geometry(image: &ProcessedImage) -> ImageGeometry {
    ImageGeometry {
        tiles: image.tiles,
        height: image.source_size.0,
        width: image.source_size.1,
    }
}

/// The image rows that fall inside prompt positions `[start, start + len)`, as (features, batch rows)
/// with rows counted from `batch_offset`, the first row of this sequence's tokens in the step.
pub fn image_rows_in_range(
    spans: &[ImageSpan],
    features: &[Tensor],
    start: usize,
    len: usize,
    batch_offset: usize,
) -> Result<Option<(Tensor, Vec<u32>)>, ModelError> {
    let end = start + len;
    let mut parts = Vec::new();
    let mut rows = Vec::new();
    for (span, feats) in spans.iter().zip(features) {
        let lo = span.start.max(start);
        let hi = (span.start + span.len).min(end);
        if lo >= hi {
            continue;
        }
        parts.push(feats.narrow(0, lo - span.start, hi - lo)?);
        rows.extend((lo..hi).map(|p| (p - start + batch_offset) as u32));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some((Tensor::cat(&parts, 0)?, rows)))
}
