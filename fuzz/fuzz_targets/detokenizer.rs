//! Token ids → incremental detokenization (`ChoiceText`, one id per push, as the engine streams).
//! Without stop strings, everything pushed plus `finish()` must equal decoding all ids at once with
//! special tokens skipped (HF's `decode(ids, skip_special_tokens=True)`), ids past the tokenizer's
//! vocabulary included (the model has more rows than the tokenizer has ids). With stop strings:
//! no panic, the text is a prefix of the whole decoding, and a stop string follows it when one hit.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use llava_server::frontend::prompt::load_tokenizer;
use llava_server::frontend::ChoiceText;
use tokenizers::Tokenizer;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny");
/// A little past the model's 32064 rows.
const ID_RANGE: u32 = 32100;

fn tokenizer() -> &'static Arc<Tokenizer> {
    static T: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| Arc::new(load_tokenizer(Path::new(DIR)).expect("fixture tokenizer")))
}

/// Specials, ids past the vocabulary, and common pieces ("▁", "▁the", "▁Hello", digits, CJK).
const INTERESTING: [u32; 16] = [
    0, 1, 2, 32000, 32001, 32002, 32063, 32064, 29871, 278, 15043, 29892, 29889, 29900, 30411, 13,
];

fn ids(mode: u8, body: &[u8]) -> Vec<u32> {
    match mode % 3 {
        0 => body
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % ID_RANGE)
            .collect(),
        1 => body
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % ID_RANGE)
            .collect(),
        // One byte per id, dense in byte-fallback pieces (`<0xNN>` is id 3 + NN) and specials.
        _ => body
            .iter()
            .map(|&b| {
                if b >= 0x40 {
                    3 + u32::from(b)
                } else {
                    INTERESTING[usize::from(b) % INTERESTING.len()]
                }
            })
            .collect(),
    }
}

fn stream(tok: &Arc<Tokenizer>, ids: &[u32], stop: Vec<String>) -> (String, bool) {
    let mut text = ChoiceText::new(tok.clone(), true, stop);
    let mut out = String::new();
    let mut hit = false;
    for &id in ids {
        let delta = text.push(&[id]).expect("push");
        out.push_str(&delta.text);
        hit |= delta.hit_stop_string;
        if hit {
            break;
        }
    }
    let delta = text.finish().expect("finish");
    out.push_str(&delta.text);
    hit |= delta.hit_stop_string;
    (out, hit)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&stop_sel, body)) = rest.split_first() else {
        return;
    };
    let tok = tokenizer();
    let ids = ids(mode, body);
    let whole = tok.decode(&ids, true).expect("decode");

    let (text, hit) = stream(tok, &ids, Vec::new());
    assert!(!hit);
    assert_eq!(text, whole, "ids {ids:?}");

    // A stop string cut from the whole text (so that it can match), or a fixed one.
    let stop = match stop_sel % 4 {
        0 => return,
        1 => "\u{FFFD}".to_owned(),
        _ => {
            let chars: Vec<char> = whole.chars().collect();
            if chars.is_empty() {
                return;
            }
            let start = usize::from(mode >> 2) % chars.len();
            let len = 1 + usize::from(stop_sel >> 2) % 4;
            chars[start..(start + len).min(chars.len())]
                .iter()
                .collect()
        }
    };
    let (text, hit) = stream(tok, &ids, vec![stop.clone()]);
    assert!(
        whole.starts_with(&text),
        "{text:?} is not a prefix of {whole:?}"
    );
    assert!(!text.contains(&stop), "{text:?} contains the stop {stop:?}");
    if hit {
        assert!(
            whole[text.len()..].starts_with(&stop),
            "stop {stop:?}: {text:?} / {whole:?}"
        );
    } else {
        assert_eq!(text, whole);
    }
});
