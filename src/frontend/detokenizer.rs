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

    /// Adds one token; returns the text it completes (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String, FrontendError> {
        self.ids.push(id);
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
