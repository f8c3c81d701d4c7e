//! Small value types shared by the layers: what a validated, tokenized request carries to the engine,
//! and what the engine says back. No behaviour lives here.

/// An image after preprocessing: `channels × height × width` f32 pixel values (CHW), plus a hash of
/// its decoded pixels that identifies it for caches.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    pub pixel_values: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub content_hash: [u8; 32],
}

/// Where one image's placeholder tokens sit in a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSpan {
    pub start: usize,
    pub len: usize,
}

/// A prompt ready for the model: token ids with every image expanded to its placeholder run, and the
/// images in the order of their spans.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub token_ids: Vec<u32>,
    pub images: Vec<ProcessedImage>,
    pub image_spans: Vec<ImageSpan>,
}

/// How to pick tokens. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: Option<u64>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            seed: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}
