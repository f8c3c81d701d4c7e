//! Images as HF sees them: JPEGs decoded to Pillow's exact bytes and preprocessed to HF's pixel values
//! (references from `tests/fixtures/make_jpeg_fixtures.py`), and hostile images refused by their size
//! before anything is allocated for them.

mod common;

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::hostile;
use llava_server::frontend::image_decode::read_and_decode;
use llava_server::frontend::ImageProcessorConfig;
use sha2::{Digest, Sha256};

fn jpeg_refs() -> serde_json::Value {
    let text = std::fs::read_to_string(common::fixtures().join("refs/jpeg.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn processor(variant: &str) -> ImageProcessorConfig {
    ImageProcessorConfig::from_file(
        &common::fixtures()
            .join(variant)
            .join("preprocessor_config.json"),
    )
    .unwrap()
}

fn jpeg_bytes(case: &serde_json::Value) -> Vec<u8> {
    std::fs::read(
        common::fixtures()
            .join("images")
            .join(case["file"].as_str().unwrap()),
    )
    .unwrap()
}

#[test]
fn every_jpeg_decodes_to_pillows_bytes() {
    let refs = jpeg_refs();
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rgb = read_and_decode(&jpeg_bytes(case), 1 << 30).unwrap();
        assert_eq!(
            [rgb.width as u64, rgb.height as u64],
            [
                case["size"][0].as_u64().unwrap(),
                case["size"][1].as_u64().unwrap()
            ],
            "{name}"
        );
        let sha: String = Sha256::digest(&rgb.data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if sha != case["rgb_sha256"] {
            failures.push(name.to_owned());
        }
    }
    assert!(
        failures.is_empty(),
        "decoded differently from Pillow: {failures:?}"
    );
}

#[test]
fn every_jpeg_preprocesses_to_hfs_pixel_values() {
    let refs = jpeg_refs();
    let samples = candle_core::safetensors::load(
        common::fixtures().join("refs/jpeg.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (key, variant) in [("tiny", "tiny"), ("gqa", "tiny_gqa")] {
        let processor = processor(variant);
        for case in refs["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let image = processor.process_bytes(&jpeg_bytes(case)).unwrap();
            let shape = [image.channels, image.height, image.width];
            let want = &case[format!("{key}_pixels")];
            assert_eq!(
                shape.map(|d| d as u32).to_vec(),
                common::ids(&want["shape"]),
                "{name} {key}"
            );
            let ours = Tensor::from_vec(image.pixel_values.clone(), &shape, &Device::Cpu).unwrap();
            // Every 4th row and column, as the generator keeps them.
            let rows: Vec<u32> = (0..image.height as u32).step_by(4).collect();
            let cols: Vec<u32> = (0..image.width as u32).step_by(4).collect();
            let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            let cols = Tensor::new(cols.as_slice(), &Device::Cpu).unwrap();
            let sampled = ours
                .index_select(&rows, 1)
                .unwrap()
                .index_select(&cols, 2)
                .unwrap();
            let reference = &samples[&format!("{name}.{key}_pixels_s4")];
            common::assert_close(&format!("{name} {key}"), &sampled, reference, 1e-6);
            let sum: f64 = image.pixel_values.iter().map(|&v| v as f64).sum();
            let sum_sq: f64 = image.pixel_values.iter().map(|&v| (v as f64).powi(2)).sum();
            let (want_sum, want_sq) = (
                want["sum"].as_f64().unwrap(),
                want["sum_sq"].as_f64().unwrap(),
            );
            // 1e-6 per value over ~340,000 values bounds both sums.
            assert!(
                (sum - want_sum).abs() < 0.5,
                "{name} {key}: sum {sum} vs {want_sum}"
            );
            assert!(
                (sum_sq - want_sq).abs() < 1.0,
                "{name} {key}: sum of squares {sum_sq} vs {want_sq}"
            );
        }
    }
}

#[test]
fn strips_are_refused_by_their_processed_size_before_decoding() {
    for variant in ["tiny", "tiny_gqa"] {
        let processor = processor(variant);
        for (w, h) in [(1_000_000, 1), (1, 400_000)] {
            let png = hostile::flat_png(w, h);
            assert!(png.len() < 20_000, "{} bytes", png.len());
            let started = Instant::now();
            let err = processor.process_bytes(&png).unwrap_err().to_string();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{variant} {w}×{h}"
            );
            assert!(err.contains(&format!("{w}×{h}")), "{err}");
            assert!(err.contains("--max-image-pixels"), "{err}");
        }
        // The same strip within bounds is processed: the limit is on sizes, not shapes.
        assert!(processor
            .process_bytes(&hostile::flat_png(3000, 40))
            .is_ok());
    }
}

#[test]
fn a_gif_frame_larger_than_its_screen_is_refused() {
    let started = Instant::now();
    let err = read_and_decode(&hostile::gif_with_oversized_frame(), 64 * 64).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.to_string().contains("cannot decode image"), "{err}");
}

#[test]
fn truncated_and_corrupt_jpegs_are_errors() {
    let refs = jpeg_refs();
    let bytes = jpeg_bytes(&refs["cases"][0]);
    let truncated = read_and_decode(&bytes[..bytes.len() / 2], 1 << 30).unwrap_err();
    assert!(truncated.to_string().contains("truncated"), "{truncated}");
    let mut corrupt = bytes.clone();
    // Inside the frame header: a sample precision of 0 bits.
    let sof = corrupt.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    corrupt[sof + 4] = 0;
    let err = read_and_decode(&corrupt, 1 << 30).unwrap_err().to_string();
    assert!(err.contains("JPEG") || err.contains("header"), "{err}");
}
