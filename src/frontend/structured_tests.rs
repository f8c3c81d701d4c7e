//! Masks of compiled grammars over a hand-built vocabulary, where the allowed tokens at each point
//! can be worked out by hand from the JSON grammar.

use serde_json::json;

use super::*;

/// `<unk> <s> </s>`, then single characters, then a few multi-character pieces; id 15 is past the
/// tokenizer (the model's vocabulary is padded) and must never be allowed.
const PIECES: [&str; 12] = [
    "{", "}", "\"", "a", ":", "1", "2", "{\"", "\"a\"", "▁", "x", "<0x41>",
];
const VOCAB: usize = 16;
const EOS: u32 = 2;

fn outputs() -> StructuredOutputs {
    let mut vocab = serde_json::Map::new();
    for (i, special) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*special).into(), json!(i));
    }
    for (i, piece) in PIECES.iter().enumerate() {
        vocab.insert((*piece).into(), json!(i + 3));
    }
    let tokenizer = json!({
        "added_tokens": [
            {"id": 0, "content": "<unk>", "special": true},
            {"id": 1, "content": "<s>", "special": true},
            {"id": 2, "content": "</s>", "special": true},
        ],
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {"type": "BPE", "vocab": vocab},
    });
    StructuredOutputs::new(&tokenizer, VOCAB, EOS).expect("vocabulary")
}

fn id(piece: &str) -> u32 {
    PIECES.iter().position(|p| *p == piece).expect("piece") as u32 + 3
}

fn allowed(state: &mut Box<dyn ConstraintState>) -> Vec<u32> {
    let words = state.allowed_tokens().expect("mask");
    (0..VOCAB as u32)
        .filter(|&t| words[(t / 32) as usize] >> (t % 32) & 1 == 1)
        .collect()
}

fn sorted(mut ids: Vec<u32>) -> Vec<u32> {
    ids.sort();
    ids
}

#[test]
fn a_schema_allows_exactly_the_tokens_that_can_continue_it() {
    let schema = json!({
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 1, "maximum": 2}},
        "required": ["a"],
        "additionalProperties": false,
    });
    let outputs = outputs();
    let mut state = outputs
        .compile(&OutputFormat::JsonSchema(schema))
        .unwrap()
        .0
        .start();
    // Only `{"a":1}` and `{"a":2}` are valid, written without whitespace. The grammar forces the
    // text `{"a":`, and llguidance allows forced text only in its own (longest-match) tokenization:
    // `{"`, `a`, `"`, `:`, never `{` then `"a"`.
    assert_eq!(allowed(&mut state), vec![id("{\"")]);
    state.accept(id("{\"")).unwrap();
    assert_eq!(allowed(&mut state), vec![id("a")]);
    state.accept(id("a")).unwrap();
    assert_eq!(allowed(&mut state), vec![id("\"")]);
    state.accept(id("\"")).unwrap();
    assert_eq!(allowed(&mut state), vec![id(":")]);
    state.accept(id(":")).unwrap();
    assert_eq!(allowed(&mut state), sorted(vec![id("1"), id("2")]));
    state.accept(id("2")).unwrap();
    assert_eq!(allowed(&mut state), vec![id("}")]);
    state.accept(id("}")).unwrap();
    assert_eq!(allowed(&mut state), vec![EOS]);
}

#[test]
fn json_object_starts_with_a_brace_and_never_allows_padding_ids_or_specials() {
    let outputs = outputs();
    let mut state = outputs
        .compile(&OutputFormat::JsonObject)
        .unwrap()
        .0
        .start();
    let first = allowed(&mut state);
    assert!(first.contains(&id("{")) && first.contains(&id("{\"")));
    for never in [0, 1, EOS, id("1"), id("a"), id("x"), id("▁"), 15] {
        assert!(!first.contains(&never), "token {never} allowed first");
    }
    // `{}` is a complete object: EOS becomes allowed, and only then.
    state.accept(id("{")).unwrap();
    assert!(!allowed(&mut state).contains(&EOS));
    state.accept(id("}")).unwrap();
    assert_eq!(allowed(&mut state), vec![EOS]);
}

#[test]
fn a_byte_fallback_piece_stands_for_its_byte() {
    // "<0x41>" is the byte 'A': allowed where a string may hold an 'A', as the letter 'x' is.
    let schema = json!({"type": "string", "pattern": "^[Ax]+$"});
    let outputs = outputs();
    let mut state = outputs
        .compile(&OutputFormat::JsonSchema(schema))
        .unwrap()
        .0
        .start();
    state.accept(id("\"")).unwrap();
    assert_eq!(allowed(&mut state), sorted(vec![id("x"), id("<0x41>")]));
}

#[test]
fn a_schema_that_cannot_compile_names_the_problem() {
    let outputs = outputs();
    for schema in [
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        json!({"type": "no-such-type"}),
    ] {
        match outputs.compile(&OutputFormat::JsonSchema(schema.clone())) {
            Err(FrontendError::Grammar(reason)) => assert!(!reason.is_empty(), "{schema}"),
            other => panic!("{schema}: {other:?}"),
        }
    }
}

#[test]
fn the_same_schema_is_compiled_once() {
    let outputs = outputs();
    let schema = json!({"type": "array", "items": {"type": "integer"}});
    let first = outputs
        .compile(&OutputFormat::JsonSchema(schema.clone()))
        .unwrap();
    let again = outputs.compile(&OutputFormat::JsonSchema(schema)).unwrap();
    let other = outputs.compile(&OutputFormat::JsonObject).unwrap();
    assert_eq!(first, again);
    assert_ne!(first, other);
}

#[test]
fn a_choice_and_a_regex_allow_what_can_begin_them() {
    let outputs = outputs();
    let choice = OutputFormat::Choice(vec!["a1".into(), "x".into(), "{\"".into()]);
    let mut state = outputs.compile(&choice).unwrap().0.start();
    // `{"` is forced text only as one of three choices, so both its splits may begin it.
    assert_eq!(
        allowed(&mut state),
        sorted(vec![id("{"), id("a"), id("x"), id("{\"")])
    );
    state.accept(id("a")).unwrap();
    assert_eq!(allowed(&mut state), vec![id("1")]);
    state.accept(id("1")).unwrap();
    assert_eq!(allowed(&mut state), vec![EOS]);

    let mut state = outputs
        .compile(&OutputFormat::Regex("[12]+:".into()))
        .unwrap()
        .0
        .start();
    assert_eq!(allowed(&mut state), sorted(vec![id("1"), id("2")]));
    state.accept(id("2")).unwrap();
    assert_eq!(allowed(&mut state), sorted(vec![id("1"), id("2"), id(":")]));
}
