//! `data:` URIs: media type check, then base64 (standard or URL-safe, padding optional) or strict
//! percent-decoding, under the byte cap.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

use super::{MediaError, IMAGE_MEDIA_TYPES};

pub fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// `rest` is everything after `data:`: `<media type>[;param]*[;base64],<payload>`.
pub fn decode_data_uri(rest: &str, max_bytes: usize) -> Result<Vec<u8>, MediaError> {
    let (header, payload) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::InvalidDataUri("missing ',' before the data".into()))?;
    let mut params: Vec<&str> = header.split(';').map(str::trim).collect();
    let is_base64 = params
        .last()
        .is_some_and(|p| p.eq_ignore_ascii_case("base64"));
    if is_base64 {
        params.pop();
    }
    let media_type = params
        .first()
        .copied()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if media_type.is_empty() {
        return Err(MediaError::InvalidDataUri(
            "missing media type (use image/png, image/jpeg, image/webp or image/gif)".into(),
        ));
    }
    if !IMAGE_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(MediaError::UnsupportedMediaType(media_type));
    }
    // Refuse a clearly oversize payload before decoding it (the exact check follows decoding):
    // percent-encoded text is at least one byte per three characters; base64 is about 3/4 of its
    // text, halved here to leave room for whitespace and escapes.
    let lower_bound = if is_base64 {
        payload.len() / 8 * 3
    } else {
        payload.len() / 3
    };
    if lower_bound > max_bytes {
        return Err(MediaError::TooLarge(max_bytes));
    }
    let unescaped = percent_decode(payload.as_bytes())?;
    let bytes = if is_base64 {
        decode_base64(&unescaped)?
    } else {
        unescaped
    };
    if bytes.len() > max_bytes {
        return Err(MediaError::TooLarge(max_bytes));
    }
    Ok(bytes)
}

fn percent_decode(input: &[u8]) -> Result<Vec<u8>, MediaError> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let pair = input
                .get(i + 1)
                .copied()
                .and_then(hex)
                .zip(input.get(i + 2).copied().and_then(hex));
            let Some((hi, lo)) = pair else {
                return Err(MediaError::InvalidDataUri(format!(
                    "bad percent-escape at byte {i}"
                )));
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Standard or URL-safe alphabet, padding optional, ASCII whitespace ignored.
fn decode_base64(text: &[u8]) -> Result<Vec<u8>, MediaError> {
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let alphabet = if compact.iter().any(|&b| b == b'-' || b == b'_') {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    GeneralPurpose::new(alphabet, config)
        .decode(&compact)
        .map_err(|e| MediaError::InvalidDataUri(format!("bad base64: {e}")))
}
