//! Images an attacker would send: tiny files whose decoded or processed size is not.

use std::io::Cursor;

/// A PNG of one flat colour: kilobytes whatever its size, as an attacker would send it.
pub fn flat_png(width: u32, height: u32) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let image = image::RgbImage::from_pixel(width, height, image::Rgb([90, 120, 200]));
    let mut bytes = Vec::new();
    let encoder = PngEncoder::new_with_quality(
        Cursor::new(&mut bytes),
        CompressionType::Best,
        FilterType::NoFilter,
    );
    image.write_with_encoder(encoder).unwrap();
    bytes
}

/// A GIF whose logical screen is 1×1 (what the header check sees) but whose one frame is 30000×30000.
pub fn gif_with_oversized_frame() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]); // screen 1×1, a 2-entry global palette
    gif.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    gif.push(0x2C); // image descriptor
    gif.extend_from_slice(&[0, 0, 0, 0]);
    gif.extend_from_slice(&30000u16.to_le_bytes());
    gif.extend_from_slice(&30000u16.to_le_bytes());
    gif.push(0);
    gif.extend_from_slice(&[2, 2, 0x4C, 0x01, 0]); // LZW data: clear, one pixel, end
    gif.push(0x3B);
    gif
}
