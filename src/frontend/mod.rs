//! Client input → `TokenizedPrompt`: image decoding and CLIP preprocessing, the chat template,
//! tokenization with image placeholders. Knows the model only through `model::config` and
//! `model::anyres` (the image-token rule and LLaVA-NeXT's tiling geometry).

pub mod anyres_tiles;
pub mod chat_template;
pub mod conversation;
pub mod detokenizer;
pub mod image_decode;
pub mod image_processor;
mod jpeg;
pub mod media;
pub mod pil_resize;
pub mod prompt;
pub mod sentencepiece;
pub mod structured;

pub use detokenizer::{ChoiceText, IncrementalDetokenizer, TextDelta};
pub use image_processor::ImageProcessorConfig;
pub use prompt::{ChatMessage, MessagePart, PromptBuilder, Role};

/// Everything the frontend can reject, each with a message that says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("checkpoint config: {0}")]
    Config(String),
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Template(String),
    /// A response format (schema, regular expression, grammar) that cannot be compiled.
    #[error("the output format (`response_format` or `structured_outputs`) cannot be compiled into a grammar: {0}")]
    Grammar(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the prompt has {placeholders} image placeholders but {images} images were given")]
    ImageCountMismatch { placeholders: usize, images: usize },
}
