//! Structured outputs: `response_format` (JSON object or JSON schema) and vLLM's `structured_outputs`
//! (also a regular expression, a choice of strings or a Lark grammar) compiled by llguidance into a
//! `TokenConstraint` over the checkpoint's vocabulary, which the engine's sampler applies as a token
//! mask at every step. Compiled grammars are cached by schema text.
//!
//! llguidance rather than outlines-core: it builds the automaton lazily (a schema compiles in
//! milliseconds whatever its size, where outlines-core builds a full index up front that grows with
//! the schema and vocabulary), it is what vLLM and mistral.rs use, it bounds the work of a compile
//! and of each mask (`ParserLimits`: a hostile schema gets an error, not minutes of CPU), and it
//! reads HF `tokenizer.json` vocabularies itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};

use super::FrontendError;
use crate::types::{ConstraintSource, ConstraintState, OutputFormat, TokenConstraint};

/// Compiled grammars kept, least recently used dropped first.
const CACHED_GRAMMARS: usize = 256;

/// The vocabulary as bytes, for llguidance.
struct VocabularyBytes {
    trie: TokTrie,
}

impl TokenizerEnv for VocabularyBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Used by llguidance only for text it forces; the longest-match split is a valid tokenization
    /// of those bytes, which is all a constraint needs.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.greedy_tokenize(s)
    }
}

/// Compiles output formats for one checkpoint's vocabulary.
pub struct StructuredOutputs {
    factory: ParserFactory,
    cache: Mutex<GrammarCache>,
}

#[derive(Default)]
struct GrammarCache {
    entries: HashMap<String, (Arc<Grammar>, u64)>,
    clock: u64,
}

impl StructuredOutputs {
    /// From the checkpoint's `tokenizer.json`.
    /// For the tokenizer a checkpoint is served with (its `tokenizer.json`, or the one converted from
    /// an original-format checkpoint's SentencePiece model).
    pub fn for_tokenizer(
        tokenizer: &tokenizers::Tokenizer,
        vocab_size: usize,
        eos: u32,
    ) -> Result<Self, FrontendError> {
        let text = tokenizer
            .to_string(false)
            .map_err(|e| FrontendError::Config(format!("cannot serialize the tokenizer: {e}")))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| FrontendError::Config(format!("the tokenizer's JSON: {e}")))?;
        Self::new(&json, vocab_size, eos)
    }

    pub fn from_checkpoint(
        dir: &std::path::Path,
        vocab_size: usize,
        eos: u32,
    ) -> Result<Self, FrontendError> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| FrontendError::Config(format!("cannot read {}: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            FrontendError::Config(format!("{} is not valid JSON: {e}", path.display()))
        })?;
        Self::new(&json, vocab_size, eos)
    }

    /// From the parsed `tokenizer.json`; `vocab_size` is the model's (ids past the tokenizer's are
    /// never allowed), `eos` the token that ends a finished output.
    pub fn new(tokenizer_json: &Value, vocab_size: usize, eos: u32) -> Result<Self, FrontendError> {
        let config_error = |e: anyhow::Error| {
            FrontendError::Config(format!("structured outputs cannot use this tokenizer: {e}"))
        };
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(tokenizer_json).map_err(config_error)?;
        words.resize(vocab_size, Vec::new());
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let env: TokEnv = Arc::new(VocabularyBytes {
            trie: TokTrie::from(&info, &words),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(config_error)?;
        factory.quiet();
        Ok(Self {
            factory,
            cache: Mutex::new(GrammarCache::default()),
        })
    }

    /// The constraint for `format`, compiled or from the cache; a schema, expression or grammar
    /// llguidance cannot compile is the client's error, with llguidance's reason.
    pub fn compile(&self, format: &OutputFormat) -> Result<TokenConstraint, FrontendError> {
        let (key, grammar) = match format {
            OutputFormat::JsonObject => {
                let schema = json!({"type": "object"});
                (
                    json!({"json": schema}),
                    TopLevelGrammar::from_json_schema(compact(schema)),
                )
            }
            OutputFormat::JsonSchema(schema) => (
                json!({"json": schema}),
                TopLevelGrammar::from_json_schema(compact(schema.clone())),
            ),
            OutputFormat::Regex(regex) => {
                (json!({"regex": regex}), TopLevelGrammar::from_regex(regex))
            }
            OutputFormat::Choice(choices) => {
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                (
                    json!({"choice": choices}),
                    TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|"))),
                )
            }
            OutputFormat::Grammar(lark) => (
                json!({"grammar": lark}),
                TopLevelGrammar::from_lark(lark.clone()),
            ),
        };
        let key = key.to_string();
        if let Some(grammar) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(TokenConstraint(grammar));
        }
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| FrontendError::Grammar(e.to_string()))?;
        let grammar = Arc::new(Grammar { parser });
        self.cache
            .lock()
            .expect("cache lock")
            .insert(key, grammar.clone());
        Ok(TokenConstraint(grammar))
    }
}

/// JSON without free whitespace, as OpenAI's structured outputs write it: between tokens the model
/// may otherwise emit whitespace without end and never close the object.
fn compact(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}),
        );
    }
    schema
}

impl GrammarCache {
    fn get(&mut self, key: &str) -> Option<Arc<Grammar>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(grammar, used)| {
            *used = clock;
            grammar.clone()
        })
    }

    fn insert(&mut self, key: String, grammar: Arc<Grammar>) {
        self.clock += 1;
        self.entries.insert(key, (grammar, self.clock));
        if self.entries.len() > CACHED_GRAMMARS {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
                .expect("non-empty");
            self.entries.remove(&oldest);
        }
    }
}

/// A compiled grammar; every sequence matches against its own copy.
struct Grammar {
    parser: TokenParser,
}

impl ConstraintSource for Grammar {
    fn start(&self) -> Box<dyn ConstraintState> {
        Box::new(GrammarState(Matcher::new(Ok(self.parser.deep_clone()))))
    }
}

struct GrammarState(Matcher);

impl ConstraintState for GrammarState {
    fn allowed_tokens(&mut self) -> Result<Vec<u32>, String> {
        self.0
            .compute_mask_or_eos()
            .map(|mask| mask.as_slice().to_vec())
            .map_err(|e| e.to_string())
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        if self.0.is_stopped() {
            // Past the end of the grammar only EOS was allowed; nothing is left to match.
            return Ok(());
        }
        self.0.consume_token(token).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
#[path = "structured_tests.rs"]
mod tests;
