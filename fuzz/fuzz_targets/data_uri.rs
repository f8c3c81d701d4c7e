//! `data:` URI payloads (everything after `data:`) → bytes, under a byte cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llava_server::frontend::media::data_uri::{decode_data_uri, strip_prefix_ignore_case};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A small cap is reached by small inputs, so the size checks get exercised too.
    for max_bytes in [64, 20 * 1024 * 1024] {
        if let Ok(bytes) = decode_data_uri(text, max_bytes) {
            assert!(bytes.len() <= max_bytes);
        }
    }
    let _ = strip_prefix_ignore_case(text, "data:");
    let _ = strip_prefix_ignore_case(text, "dAtA:\u{e9}");
});
