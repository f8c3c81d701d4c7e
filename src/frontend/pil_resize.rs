//! Pillow's bicubic resize on 8-bit images, reproduced bit for bit (Pillow 13.0, `Image.resize` with
//! `BICUBIC` and no box): per-axis f64 kernel weights, 22-bit fixed-point accumulation, a uint8
//! intermediate between the two passes, and Pillow 13's choice of which axis to resample first.
//! CLIP preprocessing must match HF's PIL backend exactly, and no resize crate does.

/// An interleaved 8-bit image (`channels` values per pixel, row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel with a = −0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index and the fixed-point weights of its taps.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let inv = 1.0 / filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; both bounds are then clamped to the image.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (lo..hi)
                .map(|j| bicubic((j as f64 - center + 0.5) * inv))
                .collect();
            let sum: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if sum != 0.0 { w / sum } else { w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    if scaled < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn resize_horizontal(img: &Image8, out_w: usize) -> Image8 {
    let c = img.channels;
    let coeffs = coefficients(img.width, out_w);
    let mut data = vec![0u8; out_w * img.height * c];
    for y in 0..img.height {
        let row = &img.data[y * img.width * c..(y + 1) * img.width * c];
        for (x, (lo, weights)) in coeffs.iter().enumerate() {
            for ch in 0..c {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in weights.iter().enumerate() {
                    acc = acc.wrapping_add(row[(lo + k) * c + ch] as i32 * w);
                }
                data[(y * out_w + x) * c + ch] = clip8(acc);
            }
        }
    }
    Image8 {
        width: out_w,
        height: img.height,
        channels: c,
        data,
    }
}

fn resize_vertical(img: &Image8, out_h: usize) -> Image8 {
    let c = img.channels;
    let stride = img.width * c;
    let coeffs = coefficients(img.height, out_h);
    let mut data = vec![0u8; img.width * out_h * c];
    for (y, (lo, weights)) in coeffs.iter().enumerate() {
        for i in 0..stride {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (k, &w) in weights.iter().enumerate() {
                acc = acc.wrapping_add(img.data[(lo + k) * stride + i] as i32 * w);
            }
            data[y * stride + i] = clip8(acc);
        }
    }
    Image8 {
        width: img.width,
        height: out_h,
        channels: c,
        data,
    }
}

/// `Image.resize((out_w, out_h), Image.BICUBIC)` as Pillow 13 computes it.
pub fn resize_bicubic(img: &Image8, out_w: usize, out_h: usize) -> Image8 {
    let need_h = out_w != img.width;
    let need_v = out_h != img.height;
    // Pillow 13 resamples the vertical axis first when it shrinks much more than the horizontal one.
    let dh = img.height as i64 - out_h as i64;
    let dw = img.width as i64 - out_w as i64;
    let vertical_first = dh > 0 && dh > 2 * dw;
    match (need_h, need_v) {
        (false, false) => img.clone(),
        (true, false) => resize_horizontal(img, out_w),
        (false, true) => resize_vertical(img, out_h),
        (true, true) if vertical_first => resize_horizontal(&resize_vertical(img, out_h), out_w),
        (true, true) => resize_vertical(&resize_horizontal(img, out_w), out_h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_weights_sum_to_one_in_fixed_point() {
        for (lo, w) in coefficients(640, 448) {
            let sum: i32 = w.iter().sum();
            assert!(
                (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i32,
                "at {lo}"
            );
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Image8 {
            width: 7,
            height: 5,
            channels: 3,
            data: vec![200; 7 * 5 * 3],
        };
        let out = resize_bicubic(&img, 13, 3);
        assert_eq!((out.width, out.height), (13, 3));
        assert!(out.data.iter().all(|&v| v == 200));
    }
}
