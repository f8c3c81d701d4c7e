//! Encoded image bytes → header checks → decoding under a pixel cap → CLIP preprocessing, for both
//! processor variants of the fixtures (CLIP centre crop, and LLaVA pad-to-square).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llava_server::frontend::ImageProcessorConfig;

const MAX_PIXELS: u64 = 16_000_000;

fn processors() -> &'static [ImageProcessorConfig; 2] {
    static P: OnceLock<[ImageProcessorConfig; 2]> = OnceLock::new();
    P.get_or_init(|| {
        let load = |p: &str| ImageProcessorConfig::from_file(Path::new(p)).expect("fixture config");
        [
            load(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/tiny/preprocessor_config.json"
            )),
            load(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/tiny_gqa/preprocessor_config.json"
            )),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    for processor in processors() {
        let Ok(rgb) = processor.decode_within(data, MAX_PIXELS) else {
            continue;
        };
        assert!(rgb.width > 0 && rgb.height > 0);
        assert!((rgb.width as u64) * (rgb.height as u64) <= MAX_PIXELS);
        let out = processor.process(&rgb);
        assert_eq!(out.channels, 3);
        assert_eq!(out.pixel_values.len(), 3 * out.height * out.width);
        assert!(out.pixel_values.iter().all(|v| v.is_finite()));
    }
});
