//! Encoded image bytes → the RGB pixels HF's processors start from (`PIL.Image.open(f).convert("RGB")`),
//! with the size read from the header and checked before the decoder allocates anything. JPEG goes through
//! libjpeg-turbo's decoder (`jpeg`), exactly as Pillow; PNG, WebP and GIF through the `image` crate under
//! explicit limits (PNG is exact to Pillow; transparency is composited onto white as transformers does).

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

use super::jpeg;
use super::media::{read_header, MediaError};
use super::pil_resize::Image8;
use super::FrontendError;

/// Default cap on an image's width × height (`--max-image-pixels`).
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;

/// An image's format and size as its header states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

impl ImageHeader {
    pub fn size(&self) -> (usize, usize) {
        (self.width as usize, self.height as usize)
    }
}

/// Decodes an image whose header was already read (and its size checked) by `read_header`.
pub fn decode_rgb(
    bytes: &[u8],
    header: &ImageHeader,
    max_pixels: u64,
    alpha: Alpha,
) -> Result<Image8, FrontendError> {
    let image = match header.format {
        ImageFormat::Jpeg => {
            jpeg::decode(bytes, header.size()).map_err(|e| FrontendError::Image(e.to_string()))?
        }
        _ => decode_with_image_crate(bytes, header, max_pixels, alpha)?,
    };
    Ok(image)
}

/// What RGB conversion does with transparency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpha {
    /// transformers' `convert_rgb`: composited onto white.
    CompositeOnWhite,
    /// Pillow's `convert("RGB")`, which the original LLaVA code calls: the alpha channel is dropped.
    Drop,
}

fn decode_with_image_crate(
    bytes: &[u8],
    header: &ImageHeader,
    max_pixels: u64,
    alpha: Alpha,
) -> Result<Image8, FrontendError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), header.format);
    // The decoders' own limits too, so that nothing the header did not announce (a GIF frame larger than
    // its logical screen, an animation's later frames) can allocate past the pixel cap: at most the cap's
    // pixels at 16-bit RGBA, the widest buffer any of these decoders produces.
    let mut limits = Limits::default();
    limits.max_image_width = Some(header.width);
    limits.max_image_height = Some(header.height);
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| FrontendError::Image(format!("cannot decode image: {e}")))?;
    if (decoded.width(), decoded.height()) != (header.width, header.height) {
        return Err(FrontendError::Image(format!(
            "cannot decode image: the decoded size {}×{} differs from the header's {}×{}",
            decoded.width(),
            decoded.height(),
            header.width,
            header.height
        )));
    }
    Ok(to_rgb8(&decoded, alpha))
}

/// Header, limits and decode in one call, for callers that hold only the bytes.
pub fn read_and_decode(bytes: &[u8], max_pixels: u64) -> Result<Image8, FrontendError> {
    let header = read_header(bytes, max_pixels).map_err(FrontendError::from)?;
    decode_rgb(bytes, &header, max_pixels, Alpha::CompositeOnWhite)
}

impl From<MediaError> for FrontendError {
    fn from(e: MediaError) -> Self {
        FrontendError::Image(e.to_string())
    }
}

/// RGB conversion: as transformers does it, transparency composited onto white with Pillow's
/// `alpha_composite` integer arithmetic, or dropped; images without alpha convert directly.
pub fn to_rgb8(img: &image::DynamicImage, alpha: Alpha) -> Image8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = if img.color().has_alpha() && alpha == Alpha::CompositeOnWhite {
        img.to_rgba8()
            .pixels()
            .flat_map(|p| {
                let a = p[3] as u32;
                [0, 1, 2].map(|c| composite_on_white(p[c] as u32, a))
            })
            .collect()
    } else {
        img.to_rgb8().into_raw()
    };
    Image8 {
        width,
        height,
        channels: 3,
        data,
    }
}

/// Pillow's `AlphaComposite.c` for an opaque white destination (7 extra precision bits).
fn composite_on_white(src: u32, alpha: u32) -> u8 {
    if alpha == 0 {
        return 255;
    }
    const PRECISION: u32 = 7;
    let coef1 = alpha << PRECISION;
    let coef2 = (255 << PRECISION) - coef1;
    let tmp = src * coef1 + 255 * coef2 + (0x80 << PRECISION);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_first_principles_at_the_ends() {
        assert_eq!(composite_on_white(10, 255), 10);
        assert_eq!(composite_on_white(10, 0), 255);
        // Half transparent black on white is mid grey: 255·(255−128)/255 ≈ 127.
        assert_eq!(composite_on_white(0, 128), 127);
    }
}
