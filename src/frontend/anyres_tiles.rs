//! LLaVA-NeXT's anyres tiling, as `LlavaNextImageProcessor` (PIL backend) does it on uint8 images:
//! the image resized (aspect kept, Pillow-exact bicubic) into the best grid resolution, padded with
//! black to it (centred, offsets rounded down), cut into tiles row by row; before them the whole image
//! resized to the base size. Each tile then goes through the usual resize / crop / rescale / normalize.
//! The geometry (best resolution, output size) is `model::anyres`'s.

use super::image_processor::{ImageProcessorConfig, ResizeTarget};
use super::pil_resize::{resize_bicubic, Image8};
use super::FrontendError;
use crate::model::anyres::{best_resolution, patch_output_size, DEFAULT_PINPOINTS};

/// The processor's anyres settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyResTiling {
    /// `image_grid_pinpoints`, (height, width).
    pub pinpoints: Vec<(usize, usize)>,
    /// The base image's size, (height, width): `size` as a square of its shortest edge, or its
    /// height and width.
    pub base: (usize, usize),
    /// A tile's side: `crop_size`'s height (else `size`'s).
    pub tile: usize,
}

impl AnyResTiling {
    pub fn new(
        pinpoints: Option<Vec<Vec<usize>>>,
        processor: &ImageProcessorConfig,
    ) -> Result<Self, FrontendError> {
        let base = match processor.resize {
            Some(ResizeTarget::ShortestEdge(s)) => (s, s),
            Some(ResizeTarget::Exact { height, width }) => (height, width),
            None => {
                return Err(FrontendError::Config(
                    "LlavaNextImageProcessor needs do_resize and a size".into(),
                ))
            }
        };
        let tile = processor.crop.map(|(h, _)| h).unwrap_or(base.0);
        // LlavaNextImageProcessor's default grid.
        let pinpoints = match pinpoints {
            None => DEFAULT_PINPOINTS.to_vec(),
            Some(list) => list
                .into_iter()
                .map(|p| match p[..] {
                    [h, w] if h > 0 && w > 0 => Ok((h, w)),
                    _ => Err(FrontendError::Config(format!(
                        "image_grid_pinpoints entry {p:?} must be [height, width]"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        };
        if pinpoints.is_empty() || tile == 0 {
            return Err(FrontendError::Config(
                "image_grid_pinpoints is empty, or the tile size is 0".into(),
            ));
        }
        Ok(Self {
            pinpoints,
            base,
            tile,
        })
    }

    /// The largest image any step of tiling builds for an image of this size, (width, height) (for
    /// the pixel cap): the patch resize's intermediate and result, the padded grid, the base resize.
    pub fn largest_intermediate(&self, width: usize, height: usize) -> (usize, usize) {
        let best = self.best(height, width);
        let (nh, nw) = patch_output_size(height, width, best);
        let px = |&(w, h): &(usize, usize)| (w as u64).saturating_mul(h as u64);
        [
            (nw, nh),
            (nw, height),
            (width, nh),
            (best.1, best.0),
            (self.base.1, height),
            (width, self.base.0),
        ]
        .into_iter()
        .max_by_key(px)
        .unwrap_or((0, 0))
    }

    fn best(&self, height: usize, width: usize) -> (usize, usize) {
        best_resolution(height, width, &self.pinpoints).unwrap_or(self.base)
    }
}

/// The base image then the grid's tiles, row by row, as uint8 images.
pub fn anyres_tiles(img: &Image8, tiling: &AnyResTiling) -> Vec<Image8> {
    let best = tiling.best(img.height, img.width);
    let (nh, nw) = patch_output_size(img.height, img.width, best);
    let resized = resize_bicubic(img, nw, nh);
    let (bh, bw) = best;
    // np.pad with zeros around the resized image: (bh − nh) // 2 rows above, the rest below.
    let (top, left) = ((bh - nh) / 2, (bw - nw) / 2);
    let mut padded = Image8 {
        width: bw,
        height: bh,
        channels: 3,
        data: vec![0; bw * bh * 3],
    };
    for y in 0..nh {
        let src = &resized.data[y * nw * 3..(y + 1) * nw * 3];
        let at = ((top + y) * bw + left) * 3;
        padded.data[at..at + nw * 3].copy_from_slice(src);
    }
    let t = tiling.tile;
    let mut tiles = vec![resize_bicubic(img, tiling.base.1, tiling.base.0)];
    for ty in (0..bh).step_by(t) {
        for tx in (0..bw).step_by(t) {
            let (th, tw) = (t.min(bh - ty), t.min(bw - tx));
            let mut tile = Image8 {
                width: tw,
                height: th,
                channels: 3,
                data: Vec::with_capacity(tw * th * 3),
            };
            for y in ty..ty + th {
                let at = (y * bw + tx) * 3;
                tile.data.extend_from_slice(&padded.data[at..at + tw * 3]);
            }
            tiles.push(tile);
        }
    }
    tiles
}
