//! Chat messages → model input. A llava-hf checkpoint: its chat template renders them, the tokenizer
//! encodes the text, and each image token becomes the run of placeholders its features will fill (HF's
//! LlavaProcessor does the same expansion on the string; expanding the ids is equivalent since
//! `<image>` is a special token). An original-format checkpoint: a `conversation.py` template renders
//! them, and the text is tokenized piece by piece between `<image>` markers, as the original
//! `tokenizer_image_token` does.

use std::path::Path;
use std::sync::Arc;
use tokenizers::Tokenizer;

use super::chat_template::{ChatTemplate, TemplateMessage, TemplatePart};
use super::conversation::{infer_template_name, ConvTemplate, Turn};
use super::sentencepiece::{load_original_tokenizer, SlowPrefix};
use super::FrontendError;
use crate::model::anyres::ImageTokens;
use crate::model::config::LlavaConfig;
use crate::types::{ImageSpan, ProcessedImage, TokenizedPrompt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A part of a message, in the order the client sent it. Images are numbered by their order of
/// appearance across the whole conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessagePart {
    Text(String),
    Image,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub parts: Vec<MessagePart>,
}

/// How messages become text and text becomes ids.
enum PromptFormat {
    /// llava-hf: the checkpoint's Jinja template; the whole text tokenized at once.
    ChatTemplate(ChatTemplate),
    /// The original format: a `conversation.py` template; images marked with `<image>`.
    Conversation {
        template: &'static ConvTemplate,
        /// What one image becomes in a user turn's text (`<image>\n`, or wrapped in
        /// `<im_start>`/`<im_end>`), before the turn's text as the original CLI puts it.
        image_marker: &'static str,
    },
}

/// The marker `tokenizer_image_token` splits the original format's prompts at.
const IMAGE_MARKER: &str = "<image>";

/// Renders and tokenizes prompts for one checkpoint.
pub struct PromptBuilder {
    tokenizer: Arc<Tokenizer>,
    /// Set for a `legacy: false` SentencePiece tokenizer: text is prepared as the slow tokenizer does.
    slow_prefix: Option<SlowPrefix>,
    format: PromptFormat,
    bos_token: String,
    eos_token: String,
    image_token_id: u32,
    /// How many tokens each image becomes.
    image_tokens: ImageTokens,
    /// Longest vocabulary entry in bytes (`max_token_bytes`).
    max_token_bytes: usize,
}

impl PromptBuilder {
    /// Reads the tokenizer, `tokenizer_config.json` and the chat template from the checkpoint folder;
    /// for an original-format checkpoint, the SentencePiece model and a `conversation.py` template.
    pub fn from_checkpoint(dir: &Path, config: &LlavaConfig) -> Result<Self, FrontendError> {
        let (tokenizer, slow_prefix, format) = match &config.original {
            None => (
                load_tokenizer(dir)?,
                None,
                PromptFormat::ChatTemplate(ChatTemplate::from_checkpoint(dir)?),
            ),
            Some(original) => {
                let name = original
                    .conv_template
                    .as_deref()
                    .unwrap_or_else(|| infer_template_name(&original.model_name));
                let image_marker = if original.use_im_start_end {
                    "<im_start><image><im_end>\n"
                } else {
                    "<image>\n"
                };
                let (tokenizer, slow_prefix) = load_original_tokenizer(dir)?;
                (
                    tokenizer,
                    slow_prefix,
                    PromptFormat::Conversation {
                        template: ConvTemplate::by_name(name)?,
                        image_marker,
                    },
                )
            }
        };
        let special = SpecialTokens::from_checkpoint(dir)?;
        if tokenizer.id_to_token(config.image_token_id).is_none() {
            return Err(FrontendError::Config(format!(
                "the tokenizer has no token with the image token id {}",
                config.image_token_id
            )));
        }
        // A vocabulary entry is never shorter in bytes than the text it stands for ("▁" is three
        // bytes for one space, "<0x41>" six for one byte), so text of N bytes is at least
        // N / max_token_bytes tokens: a bound checked before tokenizing anything.
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Self {
            max_token_bytes,
            tokenizer: Arc::new(tokenizer),
            slow_prefix,
            format,
            bos_token: special.bos,
            eos_token: special.eos,
            image_token_id: config.image_token_id,
            image_tokens: config.image_tokens(),
        })
    }

    /// Placeholder tokens each image becomes, or for LLaVA-NeXT the least any image becomes (its base
    /// tile's; the grid adds to it).
    pub fn features_per_image(&self) -> usize {
        self.image_tokens.least()
    }

    /// Tokens an image of this size becomes.
    pub fn image_token_count(&self, height: usize, width: usize) -> usize {
        self.image_tokens.count(height, width)
    }

    /// Whether images become different numbers of tokens by their size (LLaVA-NeXT).
    pub fn image_counts_vary(&self) -> bool {
        self.image_tokens.vary()
    }

    /// The longest vocabulary entry in bytes: text of N bytes is at least N / this many tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The chat template's text for these messages, generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, FrontendError> {
        self.render_with(messages, true)
    }

    /// The chat template's text, with or without the generation prompt (`/tokenize` asks either).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, FrontendError> {
        match &self.format {
            PromptFormat::ChatTemplate(template) => {
                let messages: Vec<TemplateMessage> = messages
                    .iter()
                    .map(|m| TemplateMessage {
                        role: m.role.as_str(),
                        content: m
                            .parts
                            .iter()
                            .map(|p| match p {
                                MessagePart::Text(text) => {
                                    TemplatePart::Text { text: text.clone() }
                                }
                                MessagePart::Image => TemplatePart::Image,
                            })
                            .collect(),
                    })
                    .collect();
                template.render(
                    &messages,
                    &self.bos_token,
                    &self.eos_token,
                    add_generation_prompt,
                )
            }
            PromptFormat::Conversation {
                template,
                image_marker,
            } => {
                let (system, turns) = conversation_turns(messages, image_marker)?;
                template.render(system.as_deref(), &turns, add_generation_prompt)
            }
        }
    }

    /// Stop strings the template implies (`###` for `llava_v0`), which chat requests add to theirs.
    pub fn template_stop_strings(&self) -> Vec<String> {
        match &self.format {
            PromptFormat::ChatTemplate(_) => Vec::new(),
            PromptFormat::Conversation { template, .. } => template.stop_strings(),
        }
    }

    /// Whether tokenizing `text` adds BOS: not when the template already put it there.
    pub fn adds_bos(&self, text: &str) -> bool {
        self.bos_token.is_empty() || !text.starts_with(&self.bos_token)
    }

    /// Token ids of `text` with each image placeholder expanded to the image's features, and
    /// where each image sits. `add_special`: whether the tokenizer adds BOS.
    pub fn expanded_ids(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<u32>, Vec<ImageSpan>), FrontendError> {
        self.expanded_ids_for(text, add_special, &[])
    }

    /// Placeholder tokens for the image in place `index`: its own count when it is known (LLaVA-NeXT
    /// counts depend on the size), else `features_per_image`.
    fn image_len(&self, images: &[ProcessedImage], index: usize) -> usize {
        match images.get(index) {
            Some(img) => self.image_token_count(img.source_size.0, img.source_size.1),
            None => self.image_tokens.least(),
        }
    }

    /// `expanded_ids` with the images the placeholders stand for, in order.
    fn expanded_ids_for(
        &self,
        text: &str,
        add_special: bool,
        images: &[ProcessedImage],
    ) -> Result<(Vec<u32>, Vec<ImageSpan>), FrontendError> {
        if let PromptFormat::Conversation { .. } = self.format {
            return self.chunked_ids(text, add_special, images);
        }
        let encoding = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| FrontendError::Tokenizer(e.to_string()))?;
        let compact = encoding.get_ids();
        let placeholders = compact
            .iter()
            .filter(|&&t| t == self.image_token_id)
            .count();
        let mut token_ids =
            Vec::with_capacity(compact.len() + placeholders * self.image_tokens.least());
        let mut image_spans = Vec::with_capacity(placeholders);
        for &id in compact {
            if id == self.image_token_id {
                let len = self.image_len(images, image_spans.len());
                push_image(&mut token_ids, &mut image_spans, self.image_token_id, len);
            } else {
                token_ids.push(id);
            }
        }
        Ok((token_ids, image_spans))
    }

    /// Token ids of `text` as the checkpoint's reference tokenizer gives them (`add_special`: BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, FrontendError> {
        let error = |e: tokenizers::Error| FrontendError::Tokenizer(e.to_string());
        let Some(prefix) = &self.slow_prefix else {
            let encoding = self.tokenizer.encode(text, add_special).map_err(error)?;
            return Ok(encoding.get_ids().to_vec());
        };
        let encoding = self
            .tokenizer
            .encode(prefix.prepare(text), add_special)
            .map_err(error)?;
        let mut ids = encoding.get_ids().to_vec();
        let bos = encoding
            .get_special_tokens_mask()
            .iter()
            .take_while(|&&m| m == 1)
            .count()
            .min(usize::from(add_special));
        prefix.finish(&mut ids, bos);
        Ok(ids)
    }

    /// The original `tokenizer_image_token`: each stretch between `<image>` markers is tokenized on
    /// its own (so each gets the tokenizer's leading `▁`), BOS only before the first.
    fn chunked_ids(
        &self,
        text: &str,
        add_special: bool,
        images: &[ProcessedImage],
    ) -> Result<(Vec<u32>, Vec<ImageSpan>), FrontendError> {
        let mut token_ids = Vec::new();
        let mut image_spans = Vec::new();
        for (i, chunk) in text.split(IMAGE_MARKER).enumerate() {
            if i > 0 {
                let len = self.image_len(images, image_spans.len());
                push_image(&mut token_ids, &mut image_spans, self.image_token_id, len);
            }
            token_ids.extend(self.encode(chunk, add_special && i == 0)?);
        }
        Ok((token_ids, image_spans))
    }

    /// Tokenizes rendered text and expands each image token; `images` in placeholder order. Whether
    /// the prompt fits the context is `types::ContextLimit`'s to say, not the tokenizer's.
    pub fn tokenize(
        &self,
        text: &str,
        images: Vec<ProcessedImage>,
    ) -> Result<TokenizedPrompt, FrontendError> {
        let (token_ids, image_spans) = self.expanded_ids_for(text, self.adds_bos(text), &images)?;
        if image_spans.len() != images.len() {
            return Err(FrontendError::ImageCountMismatch {
                placeholders: image_spans.len(),
                images: images.len(),
            });
        }
        Ok(TokenizedPrompt {
            token_ids,
            images,
            image_spans,
            cache_salt: None,
        })
    }

    /// Renders and tokenizes a conversation in one go.
    pub fn build(
        &self,
        messages: &[ChatMessage],
        images: Vec<ProcessedImage>,
    ) -> Result<TokenizedPrompt, FrontendError> {
        let text = self.render(messages)?;
        self.tokenize(&text, images)
    }

    /// Generated ids → text, special tokens skipped (as HF's `batch_decode(skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String, FrontendError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| FrontendError::Tokenizer(e.to_string()))
    }
}

/// Appends one image's run of `len` placeholder tokens and its span.
fn push_image(token_ids: &mut Vec<u32>, image_spans: &mut Vec<ImageSpan>, id: u32, len: usize) {
    image_spans.push(ImageSpan {
        start: token_ids.len(),
        len,
    });
    token_ids.extend(std::iter::repeat_n(id, len));
}

/// The messages as the original CLI builds a conversation: system messages replace the template's
/// system sentence; each image of a user message becomes `image_marker` before its text.
fn conversation_turns(
    messages: &[ChatMessage],
    image_marker: &str,
) -> Result<(Option<String>, Vec<Turn>), FrontendError> {
    let mut system: Vec<String> = Vec::new();
    let mut turns = Vec::new();
    for message in messages {
        let images = message
            .parts
            .iter()
            .filter(|p| matches!(p, MessagePart::Image))
            .count();
        let texts: Vec<&str> = message
            .parts
            .iter()
            .filter_map(|p| match p {
                MessagePart::Text(t) => Some(t.as_str()),
                MessagePart::Image => None,
            })
            .collect();
        if images > 0 && message.role != Role::User {
            return Err(FrontendError::Template(format!(
                "images can only be sent in user messages with this model's conversation template, not in a {} message",
                message.role.as_str()
            )));
        }
        let text = texts.join("\n");
        match message.role {
            Role::System => system.push(text),
            Role::User => turns.push(Turn {
                assistant: false,
                text: format!("{}{text}", image_marker.repeat(images)),
            }),
            Role::Assistant => turns.push(Turn {
                assistant: true,
                text,
            }),
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n"));
    Ok((system, turns))
}

/// A JSON file's value, or `Null` when the file does not exist.
pub(super) fn read_json(path: &Path) -> Result<serde_json::Value, FrontendError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            FrontendError::Config(format!("{} is not valid JSON: {e}", path.display()))
        }),
        Err(_) => Ok(serde_json::Value::Null),
    }
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, FrontendError> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path)
        .map_err(|e| FrontendError::Config(format!("cannot load {}: {e}", path.display())))
}

struct SpecialTokens {
    bos: String,
    eos: String,
}

impl SpecialTokens {
    /// From `tokenizer_config.json`, where a token is a string or `{"content": ...}`.
    fn from_checkpoint(dir: &Path) -> Result<Self, FrontendError> {
        let json = read_json(&dir.join("tokenizer_config.json"))?;
        let token = |key: &str| -> String {
            match json.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(obj) => obj
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                None => String::new(),
            }
        };
        Ok(Self {
            bos: token("bos_token"),
            eos: token("eos_token"),
        })
    }
}

/// EOS ids from `generation_config.json` (an id or a list), falling back to `config.json`-less default 2.
pub fn eos_token_ids(dir: &Path) -> Vec<u32> {
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|n| n.as_u64())
                .map(|n| n as u32)
                .collect(),
            _ => Vec::new(),
        }
    };
    for name in ["generation_config.json", "config.json"] {
        if let Some(found) = read(name)
            .and_then(|j| j.get("eos_token_id").cloned())
            .map(|v| ids(&v))
            .filter(|v| !v.is_empty())
        {
            return found;
        }
    }
    vec![2]
}
