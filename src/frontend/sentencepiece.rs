//! A SentencePiece `tokenizer.model` (what original-format LLaVA checkpoints ship, often with no
//! `tokenizer.json`) turned into a `tokenizers::Tokenizer` at load time, the way transformers'
//! `LlamaConverter` does it: a BPE model with byte fallback over the pieces, its merges derived from
//! the piece scores, and the slow `LlamaTokenizer`'s `legacy` behaviour reproduced in the
//! normalizer / pre-tokenizer. The protobuf is read by a small wire-format reader (the message has
//! three fields we need; a code generator would be more machinery than the format).

use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::Tokenizer;

use super::prompt::read_json;
use super::FrontendError;

/// One vocabulary entry of `ModelProto.pieces`.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// The parts of a `ModelProto` the conversion needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram, 2 BPE.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub add_dummy_prefix: bool,
    pub unk_id: u32,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

fn malformed(why: &str) -> FrontendError {
    FrontendError::Config(format!(
        "tokenizer.model is not a SentencePiece model: {why}"
    ))
}

/// A protobuf message's fields in order: (field number, value).
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, FrontendError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or_else(|| malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("varint longer than 10 bytes"))
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, FrontendError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let value = match key & 7 {
            0 => Field::Varint(read_varint(buf, &mut pos)?),
            1 => {
                pos = pos
                    .checked_add(8)
                    .filter(|&p| p <= buf.len())
                    .ok_or_else(|| malformed("truncated"))?;
                continue;
            }
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)?)
                    .map_err(|_| malformed("length"))?;
                let end = pos
                    .checked_add(len)
                    .filter(|&e| e <= buf.len())
                    .ok_or_else(|| malformed("truncated field"))?;
                let bytes = &buf[pos..end];
                pos = end;
                Field::Bytes(bytes)
            }
            5 => {
                let bytes: [u8; 4] = buf
                    .get(pos..pos + 4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| malformed("truncated fixed32"))?;
                pos += 4;
                Field::Fixed32(u32::from_le_bytes(bytes))
            }
            other => return Err(malformed(&format!("wire type {other}"))),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

impl SentencePieceModel {
    /// Parses `ModelProto`: pieces (1: piece, 2: score, 3: type), trainer_spec (3: model_type,
    /// 35: byte_fallback, 40–42: unk/bos/eos ids), normalizer_spec (3: add_dummy_prefix).
    pub fn parse(bytes: &[u8]) -> Result<Self, FrontendError> {
        let mut model = SentencePieceModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            add_dummy_prefix: true,
            unk_id: 0,
            bos_id: Some(1),
            eos_id: Some(2),
        };
        let id = |v: u64| u32::try_from(v as i64).ok();
        for (number, field) in fields(bytes)? {
            match (number, field) {
                (1, Field::Bytes(piece)) => model.pieces.push(parse_piece(piece)?),
                (2, Field::Bytes(spec)) => {
                    for (n, f) in fields(spec)? {
                        match (n, f) {
                            (3, Field::Varint(v)) => model.model_type = v,
                            (35, Field::Varint(v)) => model.byte_fallback = v != 0,
                            (40, Field::Varint(v)) => {
                                model.unk_id = id(v).ok_or_else(|| malformed("unk_id"))?
                            }
                            (41, Field::Varint(v)) => model.bos_id = id(v),
                            (42, Field::Varint(v)) => model.eos_id = id(v),
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(spec)) => {
                    for (n, f) in fields(spec)? {
                        if let (3, Field::Varint(v)) = (n, f) {
                            model.add_dummy_prefix = v != 0;
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err(malformed("no pieces"));
        }
        Ok(model)
    }
}

fn parse_piece(buf: &[u8]) -> Result<Piece, FrontendError> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceKind::Normal,
    };
    for (number, field) in fields(buf)? {
        match (number, field) {
            (1, Field::Bytes(text)) => {
                piece.piece = String::from_utf8(text.to_vec())
                    .map_err(|_| malformed("a piece is not UTF-8"))?
            }
            (2, Field::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Field::Varint(kind)) => {
                piece.kind = match kind {
                    1 => PieceKind::Normal,
                    2 => PieceKind::Unknown,
                    3 => PieceKind::Control,
                    4 => PieceKind::UserDefined,
                    5 => PieceKind::Unused,
                    6 => PieceKind::Byte,
                    other => return Err(malformed(&format!("piece type {other}"))),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// How the slow `LlamaTokenizer` treats the text after a special token (`legacy` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Legacy {
    /// Every stretch of text between special tokens gets SentencePiece's dummy-prefix `▁`.
    Yes,
    /// Only the start of the whole text does (`legacy: false`, LLaVA-1.5's setting).
    No,
}

/// What the slow `LlamaTokenizer` with `legacy: false` does to text before SentencePiece sees it,
/// which no tokenizers normalizer or pre-tokenizer expresses (they run per stretch between special
/// tokens, and Metaspace adds no `▁` to text that starts with a space): every `▁` becomes a space,
/// one `▁` goes before the whole text (none before empty text), and a lone `▁` token right before a
/// special token is dropped again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowPrefix {
    /// The id of the piece `▁`.
    pub space_id: u32,
    /// Ids of the special tokens (`<unk>`, `<s>`, `</s>` and added special tokens).
    pub special_ids: Vec<u32>,
}

impl SlowPrefix {
    /// `text` as the converted tokenizer must be given it.
    pub fn prepare(&self, text: &str) -> String {
        if text.is_empty() {
            return String::new();
        }
        format!("▁{}", text.replace('▁', " "))
    }

    /// Drops the prefix's lone `▁` when a special token followed it; `skip` ids (BOS) come first.
    pub fn finish(&self, ids: &mut Vec<u32>, skip: usize) {
        if ids.get(skip) == Some(&self.space_id)
            && ids
                .get(skip + 1)
                .is_some_and(|id| self.special_ids.contains(id))
        {
            ids.remove(skip);
        }
    }
}

/// A token added on top of the SentencePiece vocabulary (`added_tokens.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    pub id: u32,
    pub content: String,
    pub special: bool,
}

/// BPE merges as transformers' `SentencePieceExtractor` derives them: every split of a piece into
/// two pieces of the vocabulary, ordered by (left id, right id) within the piece, then all of them
/// by the merged piece's score, highest first (a stable sort: ties keep vocabulary order).
pub fn merges(pieces: &[Piece]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.as_str(), i))
        .collect();
    let mut all: Vec<(usize, usize, f32)> = Vec::new();
    for piece in pieces {
        let text = piece.piece.as_str();
        let mut local: Vec<(usize, usize, f32)> = text
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = text.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, piece.score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        all.extend(local);
    }
    all.sort_by(|a, b| b.2.total_cmp(&a.2));
    all.into_iter()
        .map(|(l, r, _)| (pieces[l].piece.clone(), pieces[r].piece.clone()))
        .collect()
}

/// The fast tokenizer of a LLaMA SentencePiece model, as `LlamaConverter` builds it.
pub fn llama_tokenizer(
    model: &SentencePieceModel,
    legacy: Legacy,
    add_bos: bool,
    add_eos: bool,
    added: &[AddedToken],
) -> Result<Tokenizer, FrontendError> {
    if model.model_type != 2 || !model.byte_fallback {
        return Err(FrontendError::Config(
            "tokenizer.model: only BPE models with byte fallback (LLaMA's) can be converted; add a tokenizer.json".into(),
        ));
    }
    let piece = |id: Option<u32>| {
        id.and_then(|i| model.pieces.get(i as usize))
            .map(|p| p.piece.clone())
    };
    let unk = piece(Some(model.unk_id)).ok_or_else(|| malformed("unk_id out of range"))?;
    let vocab: serde_json::Map<String, serde_json::Value> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.clone(), json!(i)))
        .collect();
    let merges: Vec<String> = merges(&model.pieces)
        .into_iter()
        .map(|(l, r)| format!("{l} {r}"))
        .collect();
    let token = |id: u32, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };
    let mut added_tokens = Vec::new();
    for (i, p) in model.pieces.iter().enumerate() {
        if matches!(p.kind, PieceKind::Unknown | PieceKind::Control) {
            added_tokens.push(token(i as u32, &p.piece, true));
        }
    }
    for t in added {
        added_tokens.push(token(t.id, &t.content, t.special));
    }
    let (normalizer, pre_tokenizer) = match (legacy, model.add_dummy_prefix) {
        (Legacy::Yes, true) => (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
            serde_json::Value::Null,
        ),
        (Legacy::Yes, false) => (
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}),
            serde_json::Value::Null,
        ),
        // Spaces become `▁`; the slow tokenizer's own prefix is `SlowPrefix`'s to add, since
        // Metaspace's `first` scheme skips it when the text starts with a space.
        (Legacy::No, _) => (
            serde_json::Value::Null,
            json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": false}),
        ),
    };
    let special = |name: &str, id: Option<u32>| -> Result<serde_json::Value, FrontendError> {
        let text = piece(id).ok_or_else(|| malformed(&format!("{name} id out of range")))?;
        Ok(json!({"text": text, "id": id}))
    };
    let post_processor = if add_bos || add_eos {
        let bos = special("bos", model.bos_id)?;
        let eos = special("eos", model.eos_id)?;
        let mut single = Vec::new();
        let mut specials = serde_json::Map::new();
        for (on, tok) in [(add_bos, &bos), (add_eos, &eos)] {
            if on {
                specials.insert(
                    tok["text"].as_str().unwrap_or_default().to_owned(),
                    json!({"id": tok["text"], "ids": [tok["id"]], "tokens": [tok["text"]]}),
                );
            }
        }
        if add_bos {
            single.push(json!({"SpecialToken": {"id": bos["text"], "type_id": 0}}));
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if add_eos {
            single.push(json!({"SpecialToken": {"id": eos["text"], "type_id": 0}}));
        }
        let mut pair = single.clone();
        pair.extend(single.iter().map(|p| {
            let mut p = p.clone();
            if let Some(seq) = p.get_mut("Sequence") {
                seq["id"] = json!("B");
            }
            for kind in ["Sequence", "SpecialToken"] {
                if let Some(inner) = p.get_mut(kind) {
                    inner["type_id"] = json!(1);
                }
            }
            p
        }));
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else {
        serde_json::Value::Null
    };
    let decoder = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor, "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    tokenizer
        .to_string()
        .parse::<Tokenizer>()
        .map_err(|e| FrontendError::Config(format!("tokenizer.model: conversion failed: {e}")))
}

/// An original-format checkpoint's tokenizer: its SentencePiece model converted as the slow
/// `LlamaTokenizer` the original code uses would tokenize (`legacy`, `add_bos_token`,
/// `add_eos_token` and the added tokens from `tokenizer_config.json` / `added_tokens.json`), or its
/// `tokenizer.json` when it ships no `tokenizer.model`.
pub fn load_original_tokenizer(
    dir: &Path,
) -> Result<(Tokenizer, Option<SlowPrefix>), FrontendError> {
    let model_path = dir.join("tokenizer.model");
    if !model_path.is_file() {
        return Ok((super::prompt::load_tokenizer(dir)?, None));
    }
    let bytes = std::fs::read(&model_path)
        .map_err(|e| FrontendError::Config(format!("cannot read {}: {e}", model_path.display())))?;
    let model = SentencePieceModel::parse(&bytes)?;
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let flag =
        |key: &str, default: bool| config.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    // transformers treats an absent `legacy` as true (with a warning).
    let legacy = if flag("legacy", true) {
        Legacy::Yes
    } else {
        Legacy::No
    };
    let mut added: Vec<AddedToken> = Vec::new();
    if let Some(decoder) = config
        .get("added_tokens_decoder")
        .and_then(|d| d.as_object())
    {
        for (id, token) in decoder {
            let (Ok(id), Some(content)) = (
                id.parse::<u32>(),
                token.get("content").and_then(|c| c.as_str()),
            ) else {
                continue;
            };
            if (id as usize) < model.pieces.len() {
                continue;
            }
            added.push(AddedToken {
                id,
                content: content.to_owned(),
                special: token
                    .get("special")
                    .and_then(|s| s.as_bool())
                    .unwrap_or(false),
            });
        }
    }
    let added_json = read_json(&dir.join("added_tokens.json"))?;
    if let Some(map) = added_json.as_object() {
        for (content, id) in map {
            let Some(id) = id.as_u64().and_then(|i| u32::try_from(i).ok()) else {
                continue;
            };
            if !added.iter().any(|t| t.id == id) {
                added.push(AddedToken {
                    id,
                    content: content.clone(),
                    special: false,
                });
            }
        }
    }
    added.sort_by_key(|t| t.id);
    let tokenizer = llama_tokenizer(
        &model,
        legacy,
        flag("add_bos_token", true),
        flag("add_eos_token", false),
        &added,
    )?;
    let prefix = match legacy {
        Legacy::Yes => None,
        Legacy::No => {
            let space_id = tokenizer
                .token_to_id("▁")
                .ok_or_else(|| malformed("no ▁ piece"))?;
            let special_ids = tokenizer
                .get_added_tokens_decoder()
                .iter()
                .filter(|(_, t)| t.special)
                .map(|(&id, _)| id)
                .collect();
            Some(SlowPrefix {
                space_id,
                special_ids,
            })
        }
    };
    Ok((tokenizer, prefix))
}
