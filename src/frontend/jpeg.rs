//! JPEG → RGB exactly as Pillow decodes it. Pillow uses libjpeg-turbo with its defaults (accurate integer
//! IDCT, fancy upsampling, libjpeg's colour-space guess); mozjpeg is a libjpeg-turbo fork that keeps its
//! decoder, so the same settings give the same bytes. What Pillow adds on top is reproduced here: grayscale
//! is widened to RGB by repeating the value, and four-channel (CMYK/YCCK) files are read as Adobe-inverted
//! CMYK and converted with Pillow's integer formula. EXIF orientation is ignored, as Pillow and HF do.

use std::cell::Cell;
use std::os::raw::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg::{ColorSpace, DctMethod, Decompress};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

use super::pil_resize::Image8;

/// Progressive files may carry any number of scans, each a pass over the whole image: a few kilobytes
/// could cost minutes of CPU. Real encoders write about ten; libjpeg-turbo's own tools cap at 500.
pub const MAX_SCANS: usize = 500;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JpegError {
    #[error("cannot decode JPEG: {0}")]
    Corrupt(String),
    #[error("cannot decode JPEG: the file is truncated")]
    Truncated,
    #[error("cannot decode JPEG: it has more than {MAX_SCANS} scans")]
    TooManyScans,
    #[error("cannot decode JPEG: {0} colour channels are not supported (1, 3 or 4)")]
    Channels(usize),
    #[error("cannot decode JPEG: the decoded size {got:?} differs from the header's {want:?}")]
    SizeMismatch {
        got: (usize, usize),
        want: (usize, usize),
    },
}

thread_local! {
    /// Set by `emit_message` when the source ran out of data (libjpeg then fakes an end marker and
    /// carries on, where Pillow reports a truncated file).
    static HIT_EOF: Cell<bool> = const { Cell::new(false) };
}

/// The payload of a fatal libjpeg error, unwound out of the C code and caught in `decode`.
struct FatalError(String);

unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let mut text = [0u8; 80];
    // SAFETY: libjpeg calls this with its own, valid `cinfo`. `format_message` writes at most 80 bytes
    // into its buffer: the binding declares that buffer as a shared reference, so it is called through
    // the same C signature with a mutable pointer instead.
    let message = unsafe {
        match (*cinfo.err).format_message {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
                    std::mem::transmute(format);
                format(cinfo, text.as_mut_ptr());
                let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
                String::from_utf8_lossy(&text[..end]).into_owned()
            }
            None => format!("libjpeg error {}", (*cinfo.err).msg_code),
        }
    };
    resume_unwind(Box::new(FatalError(message)));
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: as above; only the message code is read.
    if level < 0 && unsafe { (*cinfo.err).msg_code } == JWRN_JPEG_EOF as c_int {
        HIT_EOF.with(|hit| hit.set(true));
    }
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: `jpeg_std_error` fills in every field of a zeroed manager.
    let mut manager: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut manager) };
    manager.error_exit = Some(error_exit);
    manager.emit_message = Some(emit_message);
    manager
}

/// Decodes a whole JPEG file to RGB. `header` is the (width, height) the caller already checked against
/// its pixel limit; a file whose frame disagrees is refused rather than decoded at another size.
pub fn decode(bytes: &[u8], header: (usize, usize)) -> Result<Image8, JpegError> {
    if count_scans(bytes) > MAX_SCANS {
        return Err(JpegError::TooManyScans);
    }
    HIT_EOF.with(|hit| hit.set(false));
    let result = catch_unwind(AssertUnwindSafe(|| decode_unchecked(bytes)));
    let truncated = HIT_EOF.with(|hit| hit.replace(false));
    let image = match result {
        Ok(decoded) => decoded?,
        Err(payload) => match payload.downcast::<FatalError>() {
            Ok(fatal) => return Err(JpegError::Corrupt(fatal.0)),
            // Not libjpeg's: a real bug, which the caller's own panic handling must see.
            Err(other) => resume_unwind(other),
        },
    };
    if truncated {
        return Err(JpegError::Truncated);
    }
    if (image.width, image.height) != header {
        return Err(JpegError::SizeMismatch {
            got: (image.width, image.height),
            want: header,
        });
    }
    Ok(image)
}

fn decode_unchecked(bytes: &[u8]) -> Result<Image8, JpegError> {
    let corrupt = |e: std::io::Error| JpegError::Corrupt(e.to_string());
    let mut dec = Decompress::with_err(error_manager())
        .from_mem(bytes)
        .map_err(corrupt)?;
    // libjpeg's defaults already; set so that no other default can creep in.
    dec.dct_method(DctMethod::IntegerSlow);
    dec.do_fancy_upsampling(true);
    let (width, height) = dec.size();
    let channels = dec.components().len();
    let data = match channels {
        1 => {
            let mut started = dec
                .to_colorspace(ColorSpace::JCS_GRAYSCALE)
                .map_err(corrupt)?;
            let gray: Vec<u8> = started.read_scanlines().map_err(corrupt)?;
            started.finish().map_err(corrupt)?;
            gray.iter().flat_map(|&v| [v, v, v]).collect()
        }
        3 => {
            let mut started = dec.rgb().map_err(corrupt)?;
            let rgb: Vec<u8> = started.read_scanlines().map_err(corrupt)?;
            started.finish().map_err(corrupt)?;
            rgb
        }
        4 => {
            let mut started = dec.to_colorspace(ColorSpace::JCS_CMYK).map_err(corrupt)?;
            let cmyk: Vec<u8> = started.read_scanlines().map_err(corrupt)?;
            started.finish().map_err(corrupt)?;
            cmyk.chunks_exact(4).flat_map(adobe_cmyk_to_rgb).collect()
        }
        n => return Err(JpegError::Channels(n)),
    };
    Ok(Image8 {
        width,
        height,
        channels: 3,
        data,
    })
}

/// Pillow reads four-channel JPEGs as inverted CMYK ("CMYK;I", the Adobe convention, assumed for every
/// such file), then `convert("RGB")` computes per channel `255·(1−c)(1−k)` in integers:
/// with c = 255 − X and nk = 255 − (255 − K) = K, `out = clamp(nk − (c·nk + 128 + ((c·nk + 128) >> 8)) >> 8)`.
fn adobe_cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let nk = px[3] as i32;
    [0, 1, 2].map(|i| {
        let c = 255 - px[i] as i32;
        let t = c * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    })
}

/// Start-of-scan markers in the file. Entropy-coded data never holds `FF DA` (every `FF` there is
/// followed by `00` or a restart code), so this counts every scan, plus any such pair inside metadata —
/// an over-count only ever refuses more, never less.
fn count_scans(bytes: &[u8]) -> usize {
    bytes.windows(2).filter(|w| w == &[0xFF, 0xDA]).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_conversion_at_the_corners() {
        // Stored inverted: raw 255 is "no ink". No ink anywhere is white, full black ink is black.
        assert_eq!(adobe_cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb(&[255, 255, 255, 0]), [0, 0, 0]);
        // Full cyan, no black: red goes to 0, green and blue stay full.
        assert_eq!(adobe_cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]);
        // Half cyan (c = 128 of 255), no black: 255·(1 − 128/255) = 127.
        assert_eq!(adobe_cmyk_to_rgb(&[127, 255, 255, 255])[0], 127);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let err = decode(&[0xFF, 0xD8, 0xFF, 0xC0, 0, 3, 1, 2, 3], (1, 1)).unwrap_err();
        assert!(matches!(err, JpegError::Corrupt(_)), "{err:?}");
        assert!(matches!(
            decode(b"not a jpeg", (1, 1)),
            Err(JpegError::Corrupt(_))
        ));
    }

    #[test]
    fn scans_are_counted_and_capped() {
        let mut bytes = vec![0xFF, 0xD8];
        for _ in 0..=MAX_SCANS {
            bytes.extend_from_slice(&[0xFF, 0xDA, 0, 2]);
        }
        assert_eq!(count_scans(&bytes), MAX_SCANS + 1);
        assert_eq!(decode(&bytes, (1, 1)), Err(JpegError::TooManyScans));
    }
}
