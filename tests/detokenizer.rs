//! Incremental detokenization with the real LLaMA tokenizer: the same text as decoding all ids at once,
//! never a broken character, and stop strings matched across token boundaries.

mod common;

use llava_server::frontend::prompt::load_tokenizer;
use llava_server::frontend::ChoiceText;
use std::sync::Arc;
use tokenizers::Tokenizer;

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(load_tokenizer(&common::fixtures().join("tiny")).unwrap())
}

fn stream(tok: &Arc<Tokenizer>, ids: &[u32], stop: &[&str]) -> (Vec<String>, bool) {
    let mut text = ChoiceText::new(
        tok.clone(),
        true,
        stop.iter().map(|s| s.to_string()).collect(),
    );
    let mut pieces = Vec::new();
    let mut stopped = false;
    for &id in ids {
        let d = text.push(&[id]).unwrap();
        pieces.push(d.text);
        stopped |= d.hit_stop_string;
        if stopped {
            break;
        }
    }
    if !stopped {
        pieces.push(text.finish().unwrap().text);
    }
    (pieces, stopped)
}

#[test]
fn streamed_text_equals_whole_decoding_including_byte_fallback() {
    let tok = tokenizer();
    // Characters outside the vocabulary become byte tokens (<0xF0> <0x9D> ...), several per character.
    for s in [
        "Hello world, this is a test.",
        "Music: 𝄞 and 🦙 llamas 阿 é\nnew line",
        "  leading spaces and   inner   runs",
    ] {
        let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
        let (pieces, _) = stream(&tok, &ids, &[]);
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap(), "{s:?}");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }
    let ids = tok.encode("🦙", false).unwrap().get_ids().to_vec();
    assert!(ids.len() >= 4, "byte fallback expected: {ids:?}");
}

#[test]
fn reference_greedy_ids_stream_to_the_reference_text() {
    let tok = tokenizer();
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("refs/tiny.json")).unwrap(),
    )
    .unwrap();
    for case in refs["cases"].as_array().unwrap() {
        let ids = common::ids(&case["greedy"]["ids"]);
        let (pieces, _) = stream(&tok, &ids, &[]);
        assert_eq!(pieces.concat(), case["greedy"]["text"].as_str().unwrap());
    }
}

#[test]
fn stop_strings_spanning_tokens_are_trimmed() {
    let tok = tokenizer();
    let text = "The llama sat on the warm hill and slept.";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    // "on the warm" spans three tokens.
    let (pieces, stopped) = stream(&tok, &ids, &["on the warm"]);
    assert!(stopped);
    assert_eq!(pieces.concat(), "The llama sat ");
    // Text that only looks like the start of a stop string is released once it cannot match.
    let (pieces, stopped) = stream(&tok, &ids, &["hill and rested"]);
    assert!(!stopped);
    assert_eq!(pieces.concat(), text);
    // The earliest of several stop strings wins.
    let (pieces, _) = stream(&tok, &ids, &["slept", "sat on"]);
    assert_eq!(pieces.concat(), "The llama ");
}

#[test]
fn a_possible_stop_prefix_is_held_back_while_streaming() {
    let tok = tokenizer();
    let ids = tok
        .encode("one two three four", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut text = ChoiceText::new(tok.clone(), true, vec!["three five".into()]);
    let (last, rest) = ids.split_last().unwrap();
    let mut released = String::new();
    for &id in rest {
        released.push_str(&text.push(&[id]).unwrap().text);
        assert!(
            !released.contains("three"),
            "{released:?} released too early"
        );
    }
    assert!(released.starts_with("one two"), "{released:?}");
    // Once "four" shows the stop string cannot match, everything comes out.
    released.push_str(&text.push(&[*last]).unwrap().text);
    released.push_str(&text.finish().unwrap().text);
    assert_eq!(released, "one two three four");
}

/// HF decodes a run of byte-fallback tokens as a whole: a byte that makes the run invalid UTF-8
/// turns every byte of it into U+FFFD, and dropped tokens (a skipped special, an id past the
/// tokenizer's 32,002) do not end the run. Expected strings from HF tokenizers 0.23.3,
/// `Tokenizer.decode(ids, skip_special_tokens=True)` on this tokenizer.json. Found by fuzzing.
#[test]
fn a_byte_that_invalidates_its_run_changes_the_whole_run_as_in_hf() {
    let tok = tokenizer();
    let cases: [(&[u32], &str); 6] = [
        (&[60, 226], "\u{FFFD}\u{FFFD}"),        // <0x39> <0xDF>
        (&[60, 226, 263], "\u{FFFD}\u{FFFD} a"), // … ▁a
        (&[198, 2, 172], "é"),                   // <0xC3> </s> <0xA9>
        (&[198, 40000, 172], "é"),               // an id past the vocabulary between
        (&[198, 2, 172, 29871], "é "),           // … ▁
        (&[450, 198, 172, 226], "The\u{FFFD}\u{FFFD}\u{FFFD}"), // ▁The <0xC3> <0xA9> <0xDF>
    ];
    for (ids, hf) in cases {
        let (pieces, _) = stream(&tok, ids, &[]);
        assert_eq!(pieces.concat(), hf, "{ids:?} streamed as {pieces:?}");
    }
}
