//! Command-line arguments (clap), each with an `LLAVA_SERVER_*` environment twin, and their
//! translation into the library's option structs.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

use llava_server::api::server::ServeOptions;
use llava_server::api::state::ApiConfig;
use llava_server::engine::{DecodeGraphs, EngineConfig};
use llava_server::frontend::media::MediaPolicy;
use llava_server::model::{LoadFormat, OriginalOptions};

/// The tiny random-weight checkpoint shipped with the repository, used by `generate` when no model is named.
pub const BUNDLED_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");

#[derive(Parser)]
#[command(
    name = "llava-server",
    version,
    about = "OpenAI-compatible inference server for LLaVA models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Answer one prompt (with optional images) and print only the generated text.
    Generate(GenerateArgs),
    /// Offline batch inference over an OpenAI Batch API file.
    RunBatch(RunBatchArgs),
    /// Print the OpenAPI document.
    PrintOpenapi,
}

/// Choices for checkpoints in the original LLaVA format (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`).
#[derive(Args, Clone, Default)]
pub struct OriginalFormatArgs {
    /// The CLIP checkpoint (folder or hub id) in place of the config's `mm_vision_tower`, e.g. where the
    /// hub cannot be reached or the tower was moved. Original-format checkpoints only.
    #[arg(long, env = "LLAVA_SERVER_VISION_TOWER")]
    pub vision_tower: Option<String>,
    /// A conversation template of the original `conversation.py` (llava_v1, vicuna_v1, llava_v0,
    /// llava_llama_2, mistral_instruct, chatml_direct, mpt, …); by default inferred from the model's
    /// name as the original `run_llava.py` does. Original-format checkpoints only.
    #[arg(long, env = "LLAVA_SERVER_CONV_TEMPLATE")]
    pub conv_template: Option<String>,
}

impl OriginalFormatArgs {
    pub fn options(&self) -> OriginalOptions {
        OriginalOptions {
            vision_tower: self.vision_tower.clone(),
            conv_template: self.conv_template.clone(),
        }
    }
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Checkpoint: a llava-hf hub id (e.g. llava-hf/llava-1.5-7b-hf) or a local folder in that layout;
    /// with `--load-format dummy` also a built-in shape (llava-1.5-7b, llava-1.5-13b).
    #[arg(long, env = "LLAVA_SERVER_MODEL")]
    pub model: Option<String>,
    /// `auto` (the checkpoint's weights) or `dummy` (random weights of its shapes, for speed tests).
    #[arg(long, env = "LLAVA_SERVER_LOAD_FORMAT", default_value = "auto")]
    pub load_format: LoadFormat,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "LLAVA_SERVER_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Keep the decoder's linear weights in f16 (CPU with --dtype f32 only): decode steps read half the
    /// bytes, while products and sums stay f32. Answers then differ from f32 weights by the weights'
    /// f16 rounding.
    #[arg(long, env = "LLAVA_SERVER_CPU_F16_WEIGHTS")]
    pub cpu_f16_weights: bool,
    #[command(flatten)]
    pub original: OriginalFormatArgs,
    /// cpu or cuda:N.
    #[arg(long, env = "LLAVA_SERVER_DEVICE", default_value = "cpu")]
    pub device: String,
    #[arg(long, env = "LLAVA_SERVER_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "LLAVA_SERVER_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Model name clients send (default: the --model value).
    #[arg(long, env = "LLAVA_SERVER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Required bearer key (repeat for several; comma-separated in the environment).
    #[arg(long = "api-key", env = "LLAVA_SERVER_API_KEY", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    #[arg(long, env = "LLAVA_SERVER_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    #[arg(long, env = "LLAVA_SERVER_MAX_IMAGES_PER_REQUEST", default_value_t = 8)]
    pub max_images_per_request: usize,
    /// Requests allowed to wait beyond the running ones before 429.
    #[arg(long, env = "LLAVA_SERVER_MAX_QUEUED_REQUESTS", default_value_t = 1024)]
    pub max_queued_requests: usize,
    /// Requests whose images are fetched and decoded and whose prompt is tokenized at once (others
    /// wait, counted against the queue limit). Default: the number of CPU cores.
    #[arg(long, env = "LLAVA_SERVER_MAX_CONCURRENT_PREPARATIONS")]
    pub max_concurrent_preparations: Option<usize>,
    /// Salt each request's prefix-cache entries with its API key, so that clients with different
    /// keys never share cached blocks (and `cached_tokens` reveals nothing across keys).
    #[arg(long, env = "LLAVA_SERVER_PREFIX_CACHE_SALT_PER_API_KEY")]
    pub prefix_cache_salt_per_api_key: bool,
    /// Allow file:// image URLs under this folder.
    #[arg(long, env = "LLAVA_SERVER_ALLOWED_LOCAL_MEDIA_PATH")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Allow image URLs that resolve to loopback, private or link-local addresses.
    #[arg(long, env = "LLAVA_SERVER_ALLOW_PRIVATE_MEDIA_HOSTS")]
    pub allow_private_media_hosts: bool,
    #[arg(long, env = "LLAVA_SERVER_MAX_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    #[arg(long, env = "LLAVA_SERVER_MAX_IMAGE_PIXELS", default_value_t = 8192 * 8192)]
    pub max_image_pixels: u64,
    /// Seconds to wait for an image server to accept the connection.
    #[arg(
        long,
        env = "LLAVA_SERVER_MEDIA_CONNECT_TIMEOUT",
        default_value_t = 5.0
    )]
    pub media_connect_timeout: f64,
    /// Seconds for a whole image download, redirects included.
    #[arg(long, env = "LLAVA_SERVER_MEDIA_TIMEOUT", default_value_t = 20.0)]
    pub media_timeout: f64,
    /// Also publish the main metric families under vLLM's names (vllm:num_requests_waiting, …) for
    /// dashboards, autoscalers and routers made for vLLM.
    #[arg(long, env = "LLAVA_SERVER_VLLM_METRIC_NAMES")]
    pub vllm_metric_names: bool,
    /// Origins browsers may call the API from (CORS), comma-separated; `*` allows any (vLLM's
    /// default).
    #[arg(
        long,
        env = "LLAVA_SERVER_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub allowed_origins: Vec<String>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "LLAVA_SERVER_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Connections open at once; more wait to be accepted.
    #[arg(long, env = "LLAVA_SERVER_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a response write may make no progress (a client that stopped reading) before the
    /// connection is closed and its request aborted.
    #[arg(long, env = "LLAVA_SERVER_WRITE_TIMEOUT", default_value_t = 60.0)]
    pub write_timeout: f64,
    /// Seconds a client may take to send a request's head, and a keep-alive connection may stay
    /// idle, before the connection is closed (a head sent a byte a minute holds nothing for long).
    #[arg(long, env = "LLAVA_SERVER_HEADER_READ_TIMEOUT", default_value_t = 30.0)]
    pub header_read_timeout: f64,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Token budget of one engine step (prefill chunks and decodes together).
    #[arg(
        long,
        env = "LLAVA_SERVER_MAX_NUM_BATCHED_TOKENS",
        default_value_t = 2048
    )]
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, env = "LLAVA_SERVER_MAX_NUM_SEQS", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens per KV-cache block.
    #[arg(long, env = "LLAVA_SERVER_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache size in blocks (overrides --kv-cache-memory).
    #[arg(long, env = "LLAVA_SERVER_NUM_KV_BLOCKS")]
    pub num_kv_blocks: Option<usize>,
    /// Context length in tokens (prompt plus generation), below the model's positions and the KV
    /// cache, which cap it anyway (as vLLM's flag).
    #[arg(long, env = "LLAVA_SERVER_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// KV-cache size in bytes; suffixes KiB, MiB, GiB accepted (default: 1GiB on the CPU; on a GPU
    /// what --gpu-memory-utilization leaves).
    #[arg(long, env = "LLAVA_SERVER_KV_CACHE_MEMORY", value_parser = parse_bytes)]
    pub kv_cache_memory: Option<usize>,
    /// Share of the GPU's memory to fill (weights, activations, KV cache), when --kv-cache-memory
    /// and --num-kv-blocks are not given.
    #[arg(long, env = "LLAVA_SERVER_GPU_MEMORY_UTILIZATION", default_value_t = 0.9, value_parser = parse_share)]
    pub gpu_memory_utilization: f64,
    /// Image embeddings kept by content hash (0 keeps none; an image is still encoded once per prompt).
    #[arg(long, env = "LLAVA_SERVER_IMAGE_CACHE_SIZE", default_value_t = 64)]
    pub image_cache_size: usize,
    /// Run every step eagerly: no CUDA graphs for decode steps (as vLLM's flag).
    #[arg(long, env = "LLAVA_SERVER_ENFORCE_EAGER")]
    pub enforce_eager: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint: a local llava-hf folder or a hub id (default: the repository's tiny test fixture).
    #[arg(long, env = "LLAVA_SERVER_MODEL", default_value = BUNDLED_FIXTURE)]
    pub model: String,
    /// `auto` or `dummy` (random weights; with dummy, --model may name a built-in shape).
    #[arg(long, env = "LLAVA_SERVER_LOAD_FORMAT", default_value = "auto")]
    pub load_format: LoadFormat,
    #[command(flatten)]
    pub original: OriginalFormatArgs,
    /// The user's text.
    #[arg(long, env = "LLAVA_SERVER_PROMPT")]
    pub prompt: String,
    /// Image files, placed before the text as the chat template does (comma-separated in the environment).
    #[arg(long = "image", env = "LLAVA_SERVER_IMAGES", value_delimiter = ',')]
    pub images: Vec<PathBuf>,
    #[arg(long, env = "LLAVA_SERVER_MAX_TOKENS", default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 means greedy decoding.
    #[arg(long, env = "LLAVA_SERVER_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, env = "LLAVA_SERVER_SEED")]
    pub seed: Option<u64>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "LLAVA_SERVER_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// cpu or cuda:N.
    #[arg(long, env = "LLAVA_SERVER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Tokens per KV-cache block.
    #[arg(long, env = "LLAVA_SERVER_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
}

#[derive(Args)]
pub struct RunBatchArgs {
    /// Input: one `{"custom_id","method","url","body"}` per line.
    #[arg(short = 'i', long = "input", env = "LLAVA_SERVER_BATCH_INPUT")]
    pub input: PathBuf,
    /// Output: one result line per input line, in order.
    #[arg(short = 'o', long = "output", env = "LLAVA_SERVER_BATCH_OUTPUT")]
    pub output: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `4GiB`, `512MiB`, `64KiB` or a plain byte count.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A share in (0, 1].
fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?} is not a share of memory in (0, 1]")),
    }
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{name} must be a non-negative number of seconds"))
}

impl ServeArgs {
    pub fn into_options(self) -> anyhow::Result<ServeOptions> {
        let Some(model) = self.model else {
            anyhow::bail!(
                "no model given. Pass --model (or LLAVA_SERVER_MODEL) with a llava-hf hub id such as \
                 llava-hf/llava-1.5-7b-hf (downloaded on first use), or a local folder in that layout; \
                 the repository's tiny random-weight fixture works for trying it out: --model tests/fixtures/tiny"
            );
        };
        let e = self.engine;
        Ok(ServeOptions {
            api: ApiConfig {
                served_model_name: self.served_model_name.unwrap_or_else(|| model.clone()),
                api_keys: self
                    .api_keys
                    .into_iter()
                    .filter(|k| !k.is_empty())
                    .collect(),
                max_body_bytes: self.max_body_bytes,
                max_images_per_request: self.max_images_per_request,
                max_queued_requests: self.max_queued_requests,
                max_concurrent_preparations: self
                    .max_concurrent_preparations
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                    .max(1),
                prefix_cache_salt_per_api_key: self.prefix_cache_salt_per_api_key,
                max_running_requests: e.max_num_seqs,
                vllm_metric_names: self.vllm_metric_names,
                allowed_origins: self.allowed_origins,
            },
            media: MediaPolicy {
                allow_private_hosts: self.allow_private_media_hosts,
                allowed_local_media_path: self.allowed_local_media_path,
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
                connect_timeout: seconds("--media-connect-timeout", self.media_connect_timeout)?,
                total_timeout: seconds("--media-timeout", self.media_timeout)?,
                ..MediaPolicy::default()
            },
            engine: EngineConfig {
                max_num_batched_tokens: e.max_num_batched_tokens,
                max_num_seqs: e.max_num_seqs,
                max_num_encoder_tokens: e.max_num_batched_tokens,
                block_size: e.block_size,
                num_kv_blocks: e.num_kv_blocks,
                max_model_len: e.max_model_len,
                kv_cache_memory: e.kv_cache_memory.unwrap_or(1 << 30),
                gpu_memory_utilization: match e.kv_cache_memory {
                    None => Some(e.gpu_memory_utilization),
                    Some(_) => None,
                },
                image_cache_size: e.image_cache_size,
                eos_token_ids: Vec::new(),
                decode_graphs: if e.enforce_eager {
                    DecodeGraphs::Off
                } else {
                    DecodeGraphs::Auto
                },
                fault_hook: None,
            },
            shutdown_timeout: seconds("--shutdown-timeout", self.shutdown_timeout)?,
            max_connections: self.max_connections,
            write_timeout: seconds("--write-timeout", self.write_timeout)?,
            header_read_timeout: seconds("--header-read-timeout", self.header_read_timeout)?,
            model,
            load_format: self.load_format,
            dtype: self.dtype,
            cpu_f16_weights: self.cpu_f16_weights,
            original: self.original.options(),
            device: self.device,
            host: self.host,
            port: self.port,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(super::parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(super::parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_bytes("1000"), Ok(1000));
        assert!(super::parse_bytes("3 parsecs").is_err());
    }
}
