//! LLaVA-NeXT's "anyres" geometry, one home for the frontend (tiling, token counts from an image's
//! size alone) and the model (packing the tiles' features): the best grid resolution among
//! `image_grid_pinpoints`, the tile grid, the feature grid unpadded to the image's aspect ratio, and
//! the number of tokens an image becomes. Every formula is transformers' (`select_best_resolution`,
//! `get_patch_output_size`, `unpad_image`, `LlavaNextProcessor._get_number_of_features`), with its
//! float arithmetic and truncations, so that counts and layouts agree with HF to the token.

use super::config::{FeatureSelectStrategy, LlavaConfig};
use super::ModelError;

/// An image's place in the anyres scheme: how many tiles it has and its original size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGeometry {
    /// Tiles of its pixel values: the base image plus the grid (1 for LLaVA-1.5).
    pub tiles: usize,
    pub height: usize,
    pub width: usize,
}

/// The anyres settings of a LLaVA-NeXT checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyRes {
    /// `image_grid_pinpoints` as (height, width).
    pub pinpoints: Vec<(usize, usize)>,
    /// The vision tower's input size (`vision_config.image_size`): one tile's side.
    pub tile: usize,
    /// Feature rows (and columns) one tile gives: `image_size / patch_size`.
    pub patches_per_side: usize,
}

/// Python's `int(round(x, 7))` for the non-negative values the formulas produce.
fn round7_trunc(x: f64) -> usize {
    ((x * 1e7).round() / 1e7) as usize
}

/// `select_best_resolution`: the pinpoint that keeps the most of the image's pixels when it is
/// scaled to fit, the one that wastes the least on ties; `None` only without pinpoints.
pub fn best_resolution(
    height: usize,
    width: usize,
    pinpoints: &[(usize, usize)],
) -> Option<(usize, usize)> {
    let (oh, ow) = (height as f64, width as f64);
    let mut best = None;
    let mut max_effective = 0usize;
    let mut min_wasted = usize::MAX;
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let (dw, dh) = ((ow * scale) as usize, (oh * scale) as usize);
        let effective = (dw * dh).min(width * height);
        let wasted = (w * h).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best
}

/// `get_patch_output_size`: the size an image is resized to inside `target` (aspect kept, the
/// constrained side exactly the target's, the other rounded up).
pub fn patch_output_size(height: usize, width: usize, target: (usize, usize)) -> (usize, usize) {
    let (th, tw) = target;
    let scale_w = tw as f64 / width as f64;
    let scale_h = th as f64 / height as f64;
    if scale_w < scale_h {
        let h = ((height as f64 * scale_w).ceil() as usize).min(th);
        (h, tw)
    } else {
        let w = ((width as f64 * scale_h).ceil() as usize).min(tw);
        (th, w)
    }
}

impl AnyRes {
    /// The grid resolution an image of this size is tiled at, (height, width).
    pub fn best_resolution(&self, height: usize, width: usize) -> (usize, usize) {
        best_resolution(height, width, &self.pinpoints).unwrap_or((self.tile, self.tile))
    }

    /// Tile rows and columns of the grid.
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        let (h, w) = self.best_resolution(height, width);
        (h / self.tile, w / self.tile)
    }

    /// Tiles the vision tower sees for one image: the base image and the grid.
    pub fn tiles(&self, height: usize, width: usize) -> usize {
        let (rows, cols) = self.grid(height, width);
        rows * cols + 1
    }

    /// `unpad_image` on the grid's feature map: the rows and columns kept, and the first of each.
    pub fn unpadded(&self, height: usize, width: usize) -> UnpaddedGrid {
        let (rows, cols) = self.grid(height, width);
        let (ch, cw) = (rows * self.patches_per_side, cols * self.patches_per_side);
        let (oh, ow) = (height as f64, width as f64);
        if ow / oh > cw as f64 / ch as f64 {
            let new_h = round7_trunc(oh * (cw as f64 / ow));
            let pad = ch.saturating_sub(new_h) / 2;
            UnpaddedGrid {
                full: (ch, cw),
                first_row: pad,
                rows: ch - 2 * pad,
                first_col: 0,
                cols: cw,
            }
        } else {
            let new_w = round7_trunc(ow * (ch as f64 / oh));
            let pad = cw.saturating_sub(new_w) / 2;
            UnpaddedGrid {
                full: (ch, cw),
                first_row: 0,
                rows: ch,
                first_col: pad,
                cols: cw - 2 * pad,
            }
        }
    }

    /// Tokens one image becomes: the base tile's `base` features, then the unpadded grid with one
    /// `image_newline` row after each of its rows.
    pub fn token_count(&self, height: usize, width: usize, base: usize) -> usize {
        let grid = self.unpadded(height, width);
        base + grid.rows * (grid.cols + 1)
    }
}

/// Which part of the `full` (rows, cols) feature map `unpad_image` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpaddedGrid {
    pub full: (usize, usize),
    pub first_row: usize,
    pub rows: usize,
    pub first_col: usize,
    pub cols: usize,
}

/// `image_grid_pinpoints` when a config leaves them out (LlavaNextConfig's and
/// LlavaNextImageProcessor's default), (height, width).
pub const DEFAULT_PINPOINTS: [(usize, usize); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

/// How many placeholder tokens an image becomes: the one rule for LLaVA-1.5's constant and
/// LLaVA-NeXT's size-dependent count, used by prompts, request checks and the engine's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTokens {
    /// Features of one tile (the whole image for LLaVA-1.5).
    pub base: usize,
    pub anyres: Option<AnyRes>,
}

impl ImageTokens {
    /// Tokens an image of this size becomes.
    pub fn count(&self, height: usize, width: usize) -> usize {
        match &self.anyres {
            None => self.base,
            Some(anyres) => anyres.token_count(height, width, self.base),
        }
    }

    /// The least any image becomes (what request checks count before images are seen).
    pub fn least(&self) -> usize {
        self.base
    }

    /// The most any image becomes: a pinpoint's whole grid, no row or column unpadded away.
    pub fn most(&self) -> usize {
        let Some(anyres) = &self.anyres else {
            return self.base;
        };
        let side = anyres.patches_per_side;
        anyres
            .pinpoints
            .iter()
            .map(|&(h, w)| self.base + (h / anyres.tile * side) * (w / anyres.tile * side + 1))
            .max()
            .unwrap_or(self.base)
    }

    /// Whether counts depend on the image's size.
    pub fn vary(&self) -> bool {
        self.anyres.is_some()
    }
}

impl LlavaConfig {
    pub fn image_tokens(&self) -> ImageTokens {
        ImageTokens {
            base: self.image_feature_count(),
            anyres: self.anyres.clone(),
        }
    }
}

/// LLaVA-NeXT's tiling from its pinpoints (LlavaNextConfig's default list when absent).
pub(super) fn anyres_config(
    pinpoints: Option<Vec<Vec<usize>>>,
    config: &LlavaConfig,
) -> Result<AnyRes, ModelError> {
    if config.feature_select_strategy != FeatureSelectStrategy::Default {
        return Err(ModelError::Config(
            "LLaVA-NeXT packs tiles of patch features: vision_feature_select_strategy must be \"default\"".into(),
        ));
    }
    let tile = config.vision.image_size;
    let pinpoints = match pinpoints {
        None => DEFAULT_PINPOINTS.to_vec(),
        Some(list) => list
            .into_iter()
            .map(|p| match p[..] {
                [h, w] if h > 0 && w > 0 && h % tile == 0 && w % tile == 0 => Ok((h, w)),
                _ => Err(ModelError::Config(format!(
                    "image_grid_pinpoints entry {p:?} must be [height, width], multiples of the image size {tile}"
                ))),
            })
            .collect::<Result<_, _>>()?,
    };
    if pinpoints.is_empty() {
        return Err(ModelError::Config("image_grid_pinpoints is empty".into()));
    }
    Ok(AnyRes {
        pinpoints,
        tile,
        patches_per_side: tile / config.vision.patch_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standard() -> AnyRes {
        AnyRes {
            pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
            tile: 336,
            patches_per_side: 24,
        }
    }

    #[test]
    fn a_640x480_image_is_2340_tokens() {
        // The figure the issue quotes from HF's processor (576 base features, strategy "default").
        let a = standard();
        assert_eq!(a.best_resolution(480, 640), (672, 672));
        assert_eq!(a.tiles(480, 640), 5);
        assert_eq!(a.token_count(480, 640, 576), 2340);
    }

    #[test]
    fn patch_output_sizes_round_up_the_free_side() {
        assert_eq!(patch_output_size(480, 640, (672, 672)), (504, 672));
        assert_eq!(patch_output_size(300, 200, (672, 336)), (504, 336));
    }
}
