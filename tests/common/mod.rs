//! Shared by the integration tests: the fixture checkpoints, their HF reference cases, and the
//! comparisons the issue asks for.
#![allow(dead_code)]

pub mod hostile;

use candle_core::{Device, Tensor};
use llava_server::frontend::{ImageProcessorConfig, PromptBuilder};
use llava_server::model::{resolve_checkpoint, CheckpointDir, LlavaConfig, LlavaModel};
use llava_server::types::ProcessedImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture checkpoint with everything the tests need to reach it.
pub struct Fixture {
    pub checkpoint: CheckpointDir,
    pub model: LlavaModel,
    pub builder: PromptBuilder,
    pub processor: ImageProcessorConfig,
    pub refs: serde_json::Value,
    pub ref_tensors: HashMap<String, Tensor>,
}

impl Fixture {
    /// `variant`: `tiny` or `tiny_gqa`.
    pub fn load(variant: &str) -> Fixture {
        let dir = fixtures().join(variant);
        let checkpoint = resolve_checkpoint(dir.to_str().unwrap()).unwrap();
        let config = LlavaConfig::from_file(&checkpoint.file("config.json")).unwrap();
        let builder = PromptBuilder::from_checkpoint(&checkpoint.root, &config).unwrap();
        let processor =
            ImageProcessorConfig::from_file(&checkpoint.file("preprocessor_config.json")).unwrap();
        let model =
            LlavaModel::load(&checkpoint, config, candle_core::DType::F32, &Device::Cpu).unwrap();
        let refs_dir = fixtures().join("refs");
        let refs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(refs_dir.join(format!("{variant}.json"))).unwrap(),
        )
        .unwrap();
        let ref_tensors = candle_core::safetensors::load(
            refs_dir.join(format!("{variant}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        Fixture {
            checkpoint,
            model,
            builder,
            processor,
            refs,
            ref_tensors,
        }
    }

    pub fn cases(&self) -> &Vec<serde_json::Value> {
        self.refs["cases"].as_array().unwrap()
    }

    pub fn case(&self, name: &str) -> &serde_json::Value {
        self.cases().iter().find(|c| c["name"] == name).unwrap()
    }

    pub fn tensor(&self, case: &serde_json::Value, what: &str) -> Option<&Tensor> {
        self.ref_tensors
            .get(&format!("{}.{what}", case["name"].as_str().unwrap()))
    }

    /// The case's image files: `image` (one or null) in tiny, `images` (a list) in tiny_gqa.
    pub fn image_files(case: &serde_json::Value) -> Vec<PathBuf> {
        let names: Vec<String> = match (&case["images"], &case["image"]) {
            (serde_json::Value::Array(list), _) => list
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect(),
            (_, serde_json::Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        names
            .iter()
            .map(|n| fixtures().join("images").join(n))
            .collect()
    }

    pub fn images(&self, case: &serde_json::Value) -> Vec<ProcessedImage> {
        Self::image_files(case)
            .iter()
            .map(|p| {
                self.processor
                    .process_bytes(&std::fs::read(p).unwrap())
                    .unwrap()
            })
            .collect()
    }
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `got` equals `want` within `tol`, absolute for values up to 1 and relative to the largest
/// reference value beyond: f32 rounding grows with the magnitude, and which SIMD kernel the GEMM
/// picks (AVX2 or AVX-512 sum in different orders) moves the last bits on another CPU.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let diff = max_abs_diff(got, want);
    let scale = want
        .abs()
        .and_then(|a| a.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap()
        .max(1.0);
    assert!(
        diff <= tol * scale,
        "{what}: max |diff| {diff} > {tol} × {scale} (largest reference value, at least 1)"
    );
}

/// Every 97th value of the flattened tensor, from the first: how the references sample large tensors.
pub fn strided(t: &Tensor) -> Tensor {
    let flat = t.flatten_all().unwrap();
    let n = flat.dim(0).unwrap();
    let idx: Vec<u32> = (0..n as u32).step_by(97).collect();
    flat.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0)
        .unwrap()
}

/// The prompt's last-position logits, prefilled alone (`[vocab]`, f32).
pub fn last_logits(model: &LlavaModel, prompt: &llava_server::types::TokenizedPrompt) -> Tensor {
    let mut seq = llava_server::engine::single_sequence::SequenceState::new(
        model,
        prompt.token_ids.len(),
        16,
    )
    .unwrap();
    Tensor::new(seq.prefill(prompt, None).unwrap(), &Device::Cpu).unwrap()
}

/// Greedy decoding through the engine: the events of `max_tokens` tokens (fewer when EOS counts).
pub fn greedy_events(
    engine: &llava_server::engine::EngineHandle,
    prompt: llava_server::types::TokenizedPrompt,
    max_tokens: usize,
    ignore_eos: bool,
) -> Vec<llava_server::types::TokenEvent> {
    let params = greedy_params(max_tokens, ignore_eos);
    llava_server::engine::collect_blocking(engine.submit(prompt, params).unwrap()).unwrap()
}

/// Greedy sampling (the defaults) of `max_tokens` tokens.
pub fn greedy_params(max_tokens: usize, ignore_eos: bool) -> llava_server::types::SamplingParams {
    llava_server::types::SamplingParams {
        max_tokens,
        ignore_eos,
        ..llava_server::types::SamplingParams::default()
    }
}

/// The token ids of a choice's events, in order.
pub fn event_ids(events: &[llava_server::types::TokenEvent]) -> Vec<u32> {
    events.iter().flat_map(|e| e.token_ids.clone()).collect()
}

/// HF's chat messages (`{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}`) as ours.
pub fn hf_messages(messages: &serde_json::Value) -> Vec<llava_server::frontend::ChatMessage> {
    use llava_server::frontend::{ChatMessage, MessagePart, Role};
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "assistant" => Role::Assistant,
                _ => Role::User,
            },
            parts: m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "image" => MessagePart::Image,
                    _ => MessagePart::Text(p["text"].as_str().unwrap().to_owned()),
                })
                .collect(),
        })
        .collect()
}
