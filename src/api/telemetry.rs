//! `/metrics` by Prometheus' conventions: the process-wide recorder with every family described once
//! (HELP text, the unit in the name, counters ending in `_total`, a `model_name` label on every
//! series, families in name order), the per-request timings, and vLLM's metric names as opt-in aliases
//! so that dashboards, autoscalers and routers made for vLLM read this server unchanged.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::state::AppState;
use crate::engine::MetricsSnapshot;
use crate::types::Usage;

pub const REQUESTS: &str = "llava_requests_total";
pub const PROMPT_TOKENS: &str = "llava_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "llava_generation_tokens_total";
pub const PREFIX_QUERIED: &str = "llava_prefix_cache_queried_tokens_total";
pub const PREFIX_HITS: &str = "llava_prefix_cache_hit_tokens_total";
pub const PREEMPTIONS: &str = "llava_preemptions_total";
pub const IMAGES_ENCODED: &str = "llava_images_encoded_total";
pub const IMAGE_CACHE_HITS: &str = "llava_image_cache_hits_total";
pub const IMAGE_ENCODE_SECONDS: &str = "llava_image_encode_seconds_total";
pub const ENGINE_STEPS: &str = "llava_engine_steps_total";
pub const FIXED_DECODE_STEPS: &str = "llava_fixed_decode_steps_total";
pub const TOKENS_IN_PLACE: &str = "llava_tokens_chosen_in_place_total";
pub const WAITING: &str = "llava_num_requests_waiting";
pub const RUNNING: &str = "llava_num_requests_running";
pub const KV_USAGE: &str = "llava_kv_cache_usage_ratio";
pub const KV_USED_BLOCKS: &str = "llava_kv_cache_used_blocks";
pub const KV_CAPACITY_BLOCKS: &str = "llava_kv_cache_capacity_blocks";
pub const CACHE_CONFIG: &str = "llava_cache_config_info";
pub const TTFT: &str = "llava_time_to_first_token_seconds";
pub const INTER_TOKEN: &str = "llava_inter_token_latency_seconds";
pub const E2E: &str = "llava_e2e_request_latency_seconds";
pub const QUEUE_TIME: &str = "llava_request_queue_time_seconds";
pub const PREFILL_TIME: &str = "llava_request_prefill_time_seconds";
pub const DECODE_TIME: &str = "llava_request_decode_time_seconds";
pub const MEDIA_FETCH: &str = "llava_media_fetch_seconds";
pub const MEDIA_DECODE: &str = "llava_media_decode_seconds";
pub const MEDIA_PREPROCESS: &str = "llava_media_preprocess_seconds";

/// Our family → vLLM's names for it (`--vllm-metric-names`). The Gateway API Inference Extension's
/// endpoint picker and vLLM's Grafana dashboards default to these; two vLLM releases' names where they differ.
const VLLM_ALIASES: &[(&str, &[&str])] = &[
    (WAITING, &["vllm:num_requests_waiting"]),
    (RUNNING, &["vllm:num_requests_running"]),
    // vLLM's "perc" gauges are fractions in [0, 1] too.
    (
        KV_USAGE,
        &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    ),
    (CACHE_CONFIG, &["vllm:cache_config_info"]),
    (PROMPT_TOKENS, &["vllm:prompt_tokens_total"]),
    (GENERATION_TOKENS, &["vllm:generation_tokens_total"]),
    (PREEMPTIONS, &["vllm:num_preemptions_total"]),
    (PREFIX_QUERIED, &["vllm:prefix_cache_queries_total"]),
    (PREFIX_HITS, &["vllm:prefix_cache_hits_total"]),
    (TTFT, &["vllm:time_to_first_token_seconds"]),
    (
        INTER_TOKEN,
        &[
            "vllm:inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",
        ],
    ),
    (E2E, &["vllm:e2e_request_latency_seconds"]),
    (QUEUE_TIME, &["vllm:request_queue_time_seconds"]),
    (PREFILL_TIME, &["vllm:request_prefill_time_seconds"]),
    (DECODE_TIME, &["vllm:request_decode_time_seconds"]),
];

/// The process-wide recorder, installed on first use. One process serves one model, so the first
/// caller's model name labels every series.
pub fn recorder(model_name: &str) -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let recorder = PrometheusBuilder::new()
            .add_global_label("model_name", model_name)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .expect("buckets are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests); the handle still renders ours.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(REQUESTS, Unit::Count, "Requests answered, by HTTP status; status=\"aborted\" when the client left before the answer was complete.");
    describe_histogram!(
        TTFT,
        Unit::Seconds,
        "From submission to the first token, streamed or not."
    );
    describe_histogram!(
        INTER_TOKEN,
        Unit::Seconds,
        "Between consecutive tokens of a request."
    );
    describe_histogram!(
        E2E,
        Unit::Seconds,
        "From submission to the last token of completed requests."
    );
    describe_histogram!(
        QUEUE_TIME,
        Unit::Seconds,
        "From the engine's receipt of a request to its first scheduled step."
    );
    describe_histogram!(
        PREFILL_TIME,
        Unit::Seconds,
        "From a request's first scheduled step to its first token."
    );
    describe_histogram!(
        DECODE_TIME,
        Unit::Seconds,
        "From a request's first token to its last."
    );
    describe_histogram!(
        MEDIA_FETCH,
        Unit::Seconds,
        "Fetching one image (HTTP download, file read or data: URI decode)."
    );
    describe_histogram!(
        MEDIA_DECODE,
        Unit::Seconds,
        "Decoding one image's bytes (PNG, JPEG, WebP, GIF) into pixels."
    );
    describe_histogram!(
        MEDIA_PREPROCESS,
        Unit::Seconds,
        "Resizing, cropping and normalising one decoded image for the vision tower."
    );
}

/// One generation request's timings and outcome. Dropped before `finish` or `failed` (the client
/// left, the handler was cancelled), it counts the request as aborted.
pub struct RequestTimer {
    submitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    queue_time: Option<Duration>,
    outcome_recorded: bool,
}

impl RequestTimer {
    pub fn start() -> Self {
        Self {
            submitted: Instant::now(),
            first_token: None,
            last_token: None,
            queue_time: None,
            outcome_recorded: false,
        }
    }

    /// An engine event arrived (`usage` is set on the request's last one).
    pub fn on_event(&mut self, usage: Option<&Usage>) {
        let now = Instant::now();
        match self.last_token {
            None => {
                histogram!(TTFT).record((now - self.submitted).as_secs_f64());
                self.first_token = Some(now);
            }
            Some(t) => histogram!(INTER_TOKEN).record((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
        if let Some(u) = usage {
            self.queue_time = Some(u.queue_time);
        }
    }

    /// The answer is complete: a 200, and the request's phase times.
    pub fn finish(mut self) {
        self.outcome_recorded = true;
        counter!(REQUESTS, "status" => "200").increment(1);
        let end = self.last_token.unwrap_or_else(Instant::now);
        histogram!(E2E).record((end - self.submitted).as_secs_f64());
        if let (Some(first), Some(last)) = (self.first_token, self.last_token) {
            histogram!(DECODE_TIME).record((last - first).as_secs_f64());
            if let Some(queued) = self.queue_time {
                histogram!(QUEUE_TIME).record(queued.as_secs_f64());
                let prefill = (first - self.submitted).saturating_sub(queued);
                histogram!(PREFILL_TIME).record(prefill.as_secs_f64());
            }
        }
    }

    /// The request failed with this status, and no error response counts it (an SSE error frame).
    pub fn failed(mut self, status: u16) {
        self.outcome_recorded = true;
        counter!(REQUESTS, "status" => status.to_string()).increment(1);
    }

    /// The request failed and its error response is counted where it is made.
    pub fn counted_elsewhere(mut self) {
        self.outcome_recorded = true;
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        if !self.outcome_recorded {
            counter!(REQUESTS, "status" => "aborted").increment(1);
        }
    }
}

/// The Prometheus text: the engine's numbers as of now, then every family in name order, then
/// (with `--vllm-metric-names`) vLLM's aliases of ours.
pub fn render(state: &AppState) -> String {
    let handle = recorder(&state.config.served_model_name);
    let mut families = families(&handle.render());
    if let Some(model) = state.model.get() {
        let engine = engine_families(&model.engine.metrics(), &state.config.served_model_name);
        families.extend(self::families(&engine));
    }
    let mut out = String::new();
    for (name, lines) in &families {
        push_family(&mut out, name, name, lines);
    }
    if state.config.vllm_metric_names {
        for (ours, aliases) in VLLM_ALIASES {
            if let Some(lines) = families.get(*ours) {
                for alias in *aliases {
                    push_family(&mut out, ours, alias, lines);
                }
            }
        }
    }
    out
}

/// The engine's own numbers, written here from this server's snapshot rather than through the
/// process-wide recorder (where another engine of the same process would mix in).
fn engine_families(m: &MetricsSnapshot, model_name: &str) -> String {
    let usage = if m.kv_blocks_total == 0 {
        0.0
    } else {
        m.kv_blocks_used as f64 / m.kv_blocks_total as f64
    };
    let cache_labels = format!(
        "block_size=\"{}\",num_gpu_blocks=\"{}\"",
        m.block_size, m.kv_blocks_total
    );
    let families: [(&str, &str, &str, f64, &str); 17] = [
        (PROMPT_TOKENS, "counter", "Prompt tokens of admitted requests (image placeholders included).", m.prompt_tokens as f64, ""),
        (GENERATION_TOKENS, "counter", "Tokens generated, over all choices.", m.generated_tokens as f64, ""),
        (PREFIX_QUERIED, "counter", "Prompt tokens looked up in the prefix cache.", m.prefix_queried_tokens as f64, ""),
        (PREFIX_HITS, "counter", "Prompt tokens found in the prefix cache.", m.prefix_hit_tokens as f64, ""),
        (PREEMPTIONS, "counter", "Sequences preempted (KV blocks taken back) to let others run.", m.preemptions as f64, ""),
        (IMAGES_ENCODED, "counter", "Images run through the vision tower.", m.images_encoded as f64, ""),
        (IMAGE_CACHE_HITS, "counter", "Images whose embeddings came from the image cache.", m.image_cache_hits as f64, ""),
        (IMAGE_ENCODE_SECONDS, "counter", "Time spent in the vision tower and projector.", m.image_encode_micros as f64 / 1e6, ""),
        (ENGINE_STEPS, "counter", "Engine steps (one batched forward each).", m.steps as f64, ""),
        (FIXED_DECODE_STEPS, "counter", "Pure decode steps run through fixed-shape buffers (replayed CUDA graphs on a GPU).", m.fixed_decode_steps as f64, ""),
        (TOKENS_IN_PLACE, "counter", "Tokens chosen on the device, without copying logits to the host.", m.tokens_chosen_in_place as f64, ""),
        (WAITING, "gauge", "Requests waiting to be scheduled: the queue depth (a request of n choices counts n).", m.waiting as f64, ""),
        (RUNNING, "gauge", "Requests the engine is running (a request of n choices counts n).", m.running as f64, ""),
        (KV_USAGE, "gauge", "KV-cache utilisation: used blocks / capacity, a fraction in [0, 1].", usage, ""),
        (KV_USED_BLOCKS, "gauge", "KV-cache blocks in use.", m.kv_blocks_used as f64, ""),
        (KV_CAPACITY_BLOCKS, "gauge", "KV-cache blocks in the pool.", m.kv_blocks_total as f64, ""),
        (CACHE_CONFIG, "gauge", "KV-cache configuration in the labels (block_size in tokens, num_gpu_blocks); always 1.", 1.0, &cache_labels),
    ];
    let model = model_name
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let mut out = String::new();
    for (name, kind, help, value, labels) in families {
        let sep = if labels.is_empty() { "" } else { "," };
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{model}\"{sep}{labels}}} {value}\n"));
    }
    out
}

/// Splits the exporter's text into families by name (HELP/TYPE lines and samples, `_bucket`, `_sum`
/// and `_count` included), keeping each family's lines in order.
fn families(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            current = rest.split(' ').next().unwrap_or_default().to_owned();
        } else {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if !name.starts_with(current.as_str()) || current.is_empty() {
                current = name.to_owned();
            }
        }
        out.entry(current.clone())
            .or_default()
            .push(line.to_owned());
    }
    out
}

fn push_family(out: &mut String, ours: &str, name: &str, lines: &[String]) {
    for line in lines {
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            out.push_str(&line[..7]);
            out.push_str(name);
            out.push_str(&rest[ours.len()..]);
        } else {
            out.push_str(name);
            out.push_str(&line[ours.len()..]);
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORTED: &str = "# HELP llava_num_requests_waiting Queue depth.\n# TYPE llava_num_requests_waiting gauge\nllava_num_requests_waiting{model_name=\"m\"} 3\n\n# TYPE llava_e2e_request_latency_seconds histogram\nllava_e2e_request_latency_seconds_bucket{model_name=\"m\",le=\"0.5\"} 1\nllava_e2e_request_latency_seconds_sum{model_name=\"m\"} 0.25\nllava_e2e_request_latency_seconds_count{model_name=\"m\"} 1\n";

    #[test]
    fn families_group_histogram_series_and_sort_by_name() {
        let f = families(EXPORTED);
        let names: Vec<&String> = f.keys().collect();
        assert_eq!(
            names,
            [
                "llava_e2e_request_latency_seconds",
                "llava_num_requests_waiting"
            ]
        );
        assert_eq!(f["llava_e2e_request_latency_seconds"].len(), 4);
        assert_eq!(f["llava_num_requests_waiting"].len(), 3);
    }

    #[test]
    fn an_alias_repeats_the_family_under_the_other_name() {
        let f = families(EXPORTED);
        let mut out = String::new();
        push_family(&mut out, WAITING, "vllm:num_requests_waiting", &f[WAITING]);
        assert_eq!(
            out,
            "# HELP vllm:num_requests_waiting Queue depth.\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3\n"
        );
    }
}
