//! Token ids → text, one token at a time, for streaming. SentencePiece decoding depends on context
//! (a leading `▁` is stripped at the start; byte-fallback tokens make a character only together), so
//! each step decodes a short window and emits what it adds (vLLM's prefix/read offsets), never a
//! broken character. Stop strings are matched across token boundaries on the text, held back while
//! they might still be completing, and trimmed.

use std::sync::Arc;
use tokenizers::Tokenizer;

use super::FrontendError;

pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    emitted: String,
}

impl IncrementalDetokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, FrontendError> {
        self.tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| FrontendError::Tokenizer(e.to_string()))
    }

    /// How decoding treats `id` with respect to runs of byte-fallback tokens.
    fn kind(&self, id: u32) -> TokenKind {
        match self.tokenizer.id_to_token(id) {
            // Past the tokenizer's vocabulary (the model's rows may outnumber its ids): dropped.
            None => TokenKind::Dropped,
            Some(piece) if is_byte_piece(&piece) => TokenKind::Byte,
            Some(piece)
                if self.skip_special_tokens
                    && self
                        .tokenizer
                        .get_added_vocabulary()
                        .is_special_token(&piece) =>
            {
                TokenKind::Dropped
            }
            Some(_) => TokenKind::Text,
        }
    }

    /// Adds one token; returns the text it completes (empty while a character is incomplete).
    ///
    /// Text is released only after a token that decoding keeps and that is not a byte: HF decodes
    /// a run of byte tokens as a whole, and one invalid byte turns every byte of the run into U+FFFD
    /// (`<0x39><0xDF>` is "��", not "9�"), so a run's text is final only once the run has ended.
    /// Dropped tokens (skipped specials, ids past the vocabulary) do not end a run: decoding removes
    /// them before it joins the bytes (`<0xC3></s><0xA9>` is "é").
    pub fn push(&mut self, id: u32) -> Result<String, FrontendError> {
        self.ids.push(id);
        if self.kind(id) != TokenKind::Text {
            return Ok(String::new());
        }
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&self.ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') || !full.starts_with(&prefix) {
            return Ok(String::new());
        }
        let delta = full[prefix.len()..].to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.emitted.push_str(&delta);
        Ok(delta)
    }

    /// The text not yet emitted, so that everything emitted equals decoding all ids at once.
    pub fn finish(&mut self) -> Result<String, FrontendError> {
        let all = self.decode(&self.ids)?;
        let rest = match all.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_owned(),
            None => String::new(),
        };
        self.emitted.push_str(&rest);
        Ok(rest)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// A SentencePiece byte-fallback piece, `<0x00>` … `<0xFF>`.
    Byte,
    /// Removed by decoding.
    Dropped,
    /// Anything else: text that ends a run of bytes.
    Text,
}

fn is_byte_piece(piece: &str) -> bool {
    let b = piece.as_bytes();
    b.len() == 6
        && piece.starts_with("<0x")
        && b[5] == b'>'
        && b[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// Text of one choice: incremental detokenization plus stop strings.
pub struct ChoiceText {
    detokenizer: IncrementalDetokenizer,
    stop: Vec<String>,
    /// Decoded text not yet released: it may be the start of a stop string.
    held: String,
    stopped: bool,
}

/// New text of a choice, and whether a stop string ended it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextDelta {
    pub text: String,
    pub hit_stop_string: bool,
}

impl ChoiceText {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool, stop: Vec<String>) -> Self {
        Self {
            detokenizer: IncrementalDetokenizer::new(tokenizer, skip_special_tokens),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds generated tokens; after a stop string matched, further tokens are ignored.
    pub fn push(&mut self, ids: &[u32]) -> Result<TextDelta, FrontendError> {
        for &id in ids {
            if self.stopped {
                break;
            }
            let text = self.detokenizer.push(id)?;
            self.held.push_str(&text);
            self.cut_at_stop();
        }
        Ok(self.release(false))
    }

    /// The choice ended (EOS, length, or the client): releases everything still held.
    pub fn finish(&mut self) -> Result<TextDelta, FrontendError> {
        if !self.stopped {
            let rest = self.detokenizer.finish()?;
            self.held.push_str(&rest);
            self.cut_at_stop();
        }
        Ok(self.release(true))
    }

    fn cut_at_stop(&mut self) {
        if let Some(pos) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(pos);
            self.stopped = true;
        }
    }

    /// Everything held, except (while running) a suffix that could begin a stop string.
    fn release(&mut self, all: bool) -> TextDelta {
        let keep = if all || self.stopped {
            0
        } else {
            self.possible_stop_prefix_len()
        };
        let cut = self.held.len() - keep;
        let text: String = self.held.drain(..cut).collect();
        TextDelta {
            text,
            hit_stop_string: self.stopped,
        }
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop string.
    fn possible_stop_prefix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stop {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break;
                }
            }
        }
        best
    }
}
