//! What every handler shares: the served model (set once it is loaded), the media fetcher, limits and
//! the in-flight request count that backs the queue limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::error::ApiError;
use crate::engine::EngineHandle;
use crate::frontend::media::MediaFetcher;
use crate::frontend::structured::StructuredOutputs;
use crate::frontend::{ImageProcessorConfig, PromptBuilder};

/// The loaded model and what turns requests into its inputs.
pub struct ServedModel {
    pub engine: EngineHandle,
    pub builder: Arc<PromptBuilder>,
    /// Compiles `response_format`s into token constraints (structured outputs).
    pub structured: Arc<StructuredOutputs>,
    pub processor: Arc<ImageProcessorConfig>,
    pub max_model_len: usize,
    pub vocab_size: usize,
}

/// Limits and identity of the HTTP side.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub served_model_name: String,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    /// Requests allowed to wait beyond those the engine runs at once.
    pub max_queued_requests: usize,
    pub max_running_requests: usize,
    /// Width of the preparation stage (image fetch and decode, tokenization).
    pub max_concurrent_preparations: usize,
    /// Salt every request's prefix-cache entries with its API key: tenants never share cached blocks.
    pub prefix_cache_salt_per_api_key: bool,
    /// Also publish vLLM's names for the main metric families.
    pub vllm_metric_names: bool,
    /// Origins browsers may call from (CORS); `*` allows any.
    pub allowed_origins: Vec<String>,
}

pub struct AppState {
    pub config: ApiConfig,
    pub model: OnceLock<ServedModel>,
    pub media: MediaFetcher,
    pub created: u64,
    pub system_fingerprint: String,
    in_flight: AtomicUsize,
    /// Permits of the preparation stage: requests past it wait here, already counted in flight.
    pub preparing: tokio::sync::Semaphore,
}

pub type SharedState = Arc<AppState>;

/// Counts a request as in flight until dropped.
pub struct InFlight {
    state: SharedState,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AppState {
    pub fn new(config: ApiConfig, media: MediaFetcher) -> Self {
        let config_preparations = config.max_concurrent_preparations.max(1);
        Self {
            config,
            model: OnceLock::new(),
            media,
            created: unix_now(),
            system_fingerprint: format!("llava-server-{}", env!("CARGO_PKG_VERSION")),
            in_flight: AtomicUsize::new(0),
            preparing: tokio::sync::Semaphore::new(config_preparations),
        }
    }

    /// The model, or 503 while it is still loading or after its engine failed.
    pub fn served(&self) -> Result<&ServedModel, ApiError> {
        let model = self
            .model
            .get()
            .ok_or_else(|| ApiError::Unavailable("the model is still loading".into()))?;
        if model.engine.has_failed() {
            return Err(ApiError::Unavailable(
                "the engine failed and the server is stopping".into(),
            ));
        }
        Ok(model)
    }

    /// 404 unless `name` is the served model's name.
    /// What requests to `model` are validated against.
    pub fn limits(&self, model: &ServedModel) -> super::validate::Limits {
        super::validate::Limits {
            vocab_size: model.vocab_size,
            context: model.engine.context_limit(),
            max_images: self.config.max_images_per_request,
            features_per_image: model.builder.features_per_image(),
            max_token_bytes: model.builder.max_token_bytes(),
            salt_per_api_key: self.config.prefix_cache_salt_per_api_key,
        }
    }

    pub fn check_model(&self, name: &str) -> Result<(), ApiError> {
        if name == self.config.served_model_name {
            Ok(())
        } else {
            Err(ApiError::ModelNotFound(name.to_owned()))
        }
    }

    /// Admits one more request, or 429 when running + queued would exceed the limits.
    pub fn admit(self: &Arc<Self>) -> Result<InFlight, ApiError> {
        let limit = self.config.max_running_requests + self.config.max_queued_requests;
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return Err(ApiError::QueueFull);
        }
        Ok(InFlight {
            state: self.clone(),
        })
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `chatcmpl-…`-style ids: a prefix and 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}-{:024x}", n & ((1u128 << 96) - 1))
}
