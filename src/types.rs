//! Small value types shared by the layers: what a validated, tokenized request carries to the engine,
//! and what the engine says back. No behaviour lives here.

/// An image after preprocessing: `tiles × channels × height × width` f32 pixel values (CHW per tile;
/// one tile except for LLaVA-NeXT's anyres), the size of the decoded image it came from, and a hash
/// of its decoded pixels that identifies it for caches.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    pub pixel_values: Vec<f32>,
    pub tiles: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// (height, width) of the decoded image.
    pub source_size: (usize, usize),
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
    /// Requests share prefix-cache blocks only with requests of the same salt (`cache_salt`, and the
    /// API key's under `--prefix-cache-salt-per-api-key`).
    pub cache_salt: Option<[u8; 32]>,
}

/// How to pick tokens and when to stop, per request (OpenAI / vLLM semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Independent completions of the same prompt (they share the prompt's KV blocks).
    pub n: usize,
    pub max_tokens: usize,
    /// 0 means greedy (and the filters below are then irrelevant).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// Same seed + same request → same output, whatever else is batched with it.
    pub seed: Option<u64>,
    /// CTRL-style, over prompt and output tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(k)`: report the chosen token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// `Some(k)`: the same for every prompt token after the first (`echo` with `logprobs` in the
    /// completions API); the prompt is then computed in full, never taken from the prefix cache.
    /// With it, `max_tokens` may be 0: the prompt is scored and nothing is generated.
    pub prompt_logprobs: Option<usize>,
    /// Stop strings: matched across token boundaries and trimmed by the frontend's detokenizer, which
    /// then ends the request (as vLLM's output processor does).
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// Structured outputs: the grammar every choice's tokens must follow.
    pub constraint: Option<TokenConstraint>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            max_tokens: 16,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            constraint: None,
        }
    }
}

/// What a request's output must be (`response_format`, or `text.format` of the Responses API).
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression in full.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this context-free grammar, in the Lark syntax llguidance reads.
    Grammar(String),
}

/// A compiled constraint on the tokens a sequence may produce (a grammar). The frontend compiles it;
/// the engine starts one state per choice and asks it, at each step, which tokens may come next.
#[derive(Clone)]
pub struct TokenConstraint(pub std::sync::Arc<dyn ConstraintSource>);

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenConstraint")
    }
}

/// Two requests' constraints are equal only when they are the same compiled grammar.
impl PartialEq for TokenConstraint {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

pub trait ConstraintSource: Send + Sync {
    /// A fresh state at the start of the output.
    fn start(&self) -> Box<dyn ConstraintState>;
}

/// One sequence's place in its grammar.
pub trait ConstraintState: Send {
    /// The tokens allowed next, as a bitset: token `t` is bit `t % 32` of word `t / 32`. An error
    /// means the grammar cannot go on (a fault of the constraint, not of the client).
    fn allowed_tokens(&mut self) -> Result<Vec<u32>, String>;
    /// Moves past a sampled token.
    fn accept(&mut self, token: u32) -> Result<(), String>;
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// Log-probability of a token, from the model's raw distribution at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The chosen token's log-probability and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Prompt tokens that are image placeholders.
    pub image_tokens: usize,
    /// Generated tokens over all `n` choices.
    pub completion_tokens: usize,
    /// From the engine's receipt of the request to its first scheduled step.
    pub queue_time: std::time::Duration,
}

/// What the engine streams back for one request: new tokens of one choice, its finish, and (on the
/// request's last event) the usage. Text is the frontend's business (detokenizer, stop strings).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// Which of the `n` choices this is.
    pub index: usize,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<StepLogprobs>,
    /// With `prompt_logprobs`, on choice 0's first event: prompt tokens 1.. in order, each scored
    /// by the logits of the position before it.
    pub prompt_logprobs: Vec<StepLogprobs>,
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens of this choice served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Set on the last event of the request.
    pub usage: Option<Usage>,
}

/// The context rule, in its one home: a prompt plus the tokens it may generate must fit the context
/// (the least of the model's positions, the KV cache and `--max-model-len`). The API applies it to a
/// lower bound of the prompt before anything is fetched and to the tokenized prompt after; the
/// engine applies it again only for callers that bypass the API (the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimit(pub usize);

/// A prompt and its generation budget that do not fit the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextOverflow {
    pub prompt_tokens: usize,
    /// What the client asked for; `None`: nothing, and the prompt alone fills the context.
    pub max_tokens: Option<usize>,
    pub context: usize,
}

impl ContextLimit {
    /// The generation budget of a prompt: `asked`, or when the client left it out the rest of the
    /// context (at least one token must fit).
    pub fn fit(self, prompt_tokens: usize, asked: Option<usize>) -> Result<usize, ContextOverflow> {
        let overflow = ContextOverflow {
            prompt_tokens,
            max_tokens: asked,
            context: self.0,
        };
        match asked {
            Some(m) if prompt_tokens.saturating_add(m) > self.0 => Err(overflow),
            Some(m) => Ok(m),
            None if prompt_tokens >= self.0 => Err(overflow),
            None => Ok(self.0 - prompt_tokens),
        }
    }
}

impl ContextOverflow {
    /// The error text, with `prompt` saying what the prompt is ("the prompt is 5000 tokens").
    pub fn describe(&self, prompt: &str) -> String {
        let context = self.context;
        match self.max_tokens {
            Some(m) => format!(
                "{prompt} and max_tokens is {m}: together they exceed the context of {context} tokens"
            ),
            None => format!("{prompt}, which fills the context of {context} tokens"),
        }
    }
}

impl std::fmt::Display for ContextOverflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let prompt = format!("the prompt is {} tokens", self.prompt_tokens);
        f.write_str(&self.describe(&prompt))
    }
}

impl std::error::Error for ContextOverflow {}
