//! Original-format checkpoints through the HTTP API: the original code's greedy answers
//! (`refs/original.json`) for chat requests, template stop strings, `/tokenize`, the errors of the
//! original-only flags; and an original LLaVA-1.5 checkpoint and its llava-hf conversion
//! (transformers' `convert_llava_weights_to_hf.py` key mapping, CLIP kept in f32) answering
//! identically. The conversion is done here, from the fixture's `.bin` shards and its CLIP tower, into
//! a temporary folder with the llava-hf fixture's tokenizer and chat template (the same LLaMA
//! vocabulary) and a processor that pads as LLaVA-1.5 does.

mod api_common;

use api_common::*;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

const ORIGINAL: &str = "original/llava-v1.5-tiny";
const TOWER: &str = "original/clip-336";
/// llava-hf's vocabulary: LLaMA's 32000, `<image>`, `<pad>`, padded to a multiple of 64.
const HF_VOCAB: usize = 32064;

/// Every tensor of a `.bin` or safetensors file.
fn read_tensors(path: &Path) -> Vec<(String, Tensor)> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    } else {
        candle_core::pickle::read_all(path).unwrap()
    }
}

fn weight_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.ends_with(".safetensors") || name.ends_with(".bin")
        })
        .collect();
    files.sort();
    files
}

/// transformers' key mapping for LLaVA-1.5, in the hub's transformers-4 layout.
fn hf_name(original: &str) -> Option<String> {
    if original.contains("rotary_emb.inv_freq") {
        return None;
    }
    let name = if let Some(rest) = original.strip_prefix("model.mm_projector.") {
        let rest = rest
            .replacen("0.", "linear_1.", 1)
            .replacen("2.", "linear_2.", 1);
        format!("multi_modal_projector.{rest}")
    } else if let Some(rest) = original.strip_prefix("model.") {
        format!("language_model.model.{rest}")
    } else if let Some(rest) = original.strip_prefix("lm_head.") {
        format!("language_model.lm_head.{rest}")
    } else {
        panic!("unexpected tensor {original}")
    };
    Some(name)
}

/// Rows past the original vocabulary (`<image>`, `<pad>` and padding): zeros.
fn pad_rows(t: &Tensor) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let extra = Tensor::zeros((HF_VOCAB - rows, cols), t.dtype(), &Device::Cpu).unwrap();
    Tensor::cat(&[t, &extra], 0).unwrap()
}

fn convert(out: &Path) {
    let fixtures = fixtures();
    let original = fixtures.join(ORIGINAL);
    let tower = fixtures.join(TOWER);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in weight_files(&original) {
        for (name, t) in read_tensors(&file) {
            if let Some(hf) = hf_name(&name) {
                let t = t.to_dtype(DType::F32).unwrap();
                let t = if hf.ends_with("embed_tokens.weight") || hf.ends_with("lm_head.weight") {
                    pad_rows(&t)
                } else {
                    t
                };
                tensors.insert(hf, t);
            }
        }
    }
    for file in weight_files(&tower) {
        for (name, t) in read_tensors(&file) {
            if name.starts_with("vision_model.") {
                tensors.insert(
                    format!("vision_tower.{name}"),
                    t.to_dtype(DType::F32).unwrap(),
                );
            }
        }
    }
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();

    let flat: Value =
        serde_json::from_str(&std::fs::read_to_string(original.join("config.json")).unwrap())
            .unwrap();
    let clip: Value =
        serde_json::from_str(&std::fs::read_to_string(tower.join("config.json")).unwrap()).unwrap();
    let mut text = json!({"model_type": "llama", "vocab_size": HF_VOCAB});
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
    ] {
        if let Some(v) = flat.get(key) {
            text[key] = v.clone();
        }
    }
    let mut vision = clip["vision_config"].clone();
    vision["model_type"] = json!("clip_vision_model");
    let config = json!({
        "model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001,
        "projector_hidden_act": "gelu", "vision_feature_layer": flat["mm_vision_select_layer"],
        "vision_feature_select_strategy": "default", "tie_word_embeddings": false,
        "text_config": text, "vision_config": vision,
    });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    // LLaVA-1.5 pads to a square in the mean colour: LlavaImageProcessor's `do_pad`.
    let mut processor: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tiny/preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    processor["image_processor_type"] = json!("LlavaImageProcessor");
    processor["do_pad"] = json!(true);
    std::fs::write(out.join("preprocessor_config.json"), processor.to_string()).unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixtures.join("tiny").join(name), out.join(name)).unwrap();
    }
}

/// The request both servers get: llava_v1's system sentence as a system message (the llava-hf template
/// renders it bare before `USER:`, as the original template does), one image, a question.
fn request(image: &str, question: &str) -> Value {
    json!({
        "model": MODEL, "temperature": 0, "max_tokens": 12, "ignore_eos": true,
        "messages": [
            {"role": "system", "content": "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                {"type": "text", "text": question}]}]
    })
}

async fn answers(model_dir: &Path, vision_tower: Option<&Path>) -> Vec<(String, u64)> {
    let mut opts = options();
    opts.model = model_dir.to_str().unwrap().to_owned();
    opts.original.vision_tower = vision_tower.map(|p| p.to_str().unwrap().to_owned());
    let t = start(opts).await;
    let mut out = Vec::new();
    for (image, question) in [
        ("scene_640x480.png", "What is in the picture?"),
        ("scene_200x300.png", "Describe the colours."),
        ("gray_300x200.png", "Is it dark?"),
    ] {
        let (status, body) = post(&t, "/v1/chat/completions", &request(image, question)).await;
        assert_eq!(status, 200, "{body}");
        out.push((
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_checkpoint_and_its_llava_hf_conversion_answer_alike() {
    let converted = tempfile::tempdir().unwrap();
    convert(converted.path());
    let original = answers(&fixtures().join(ORIGINAL), Some(&fixtures().join(TOWER))).await;
    let hf = answers(converted.path(), None).await;
    assert_eq!(original, hf);
    assert!(original.iter().all(|(text, _)| !text.is_empty()));
}

fn original_options(
    checkpoint: &str,
    template: Option<&str>,
) -> llava_server::api::server::ServeOptions {
    let mut opts = options();
    opts.model = fixtures()
        .join("original")
        .join(checkpoint)
        .to_str()
        .unwrap()
        .to_owned();
    let tower = if checkpoint.contains("224") {
        "clip-224"
    } else {
        "clip-336"
    };
    opts.original.vision_tower = Some(
        fixtures()
            .join("original")
            .join(tower)
            .to_str()
            .unwrap()
            .to_owned(),
    );
    opts.original.conv_template = template.map(str::to_owned);
    opts
}

fn original_case(name: &str) -> Value {
    reference_case("original", name)
}

/// The case as an OpenAI chat request: its system sentence when it replaced the template's, each
/// message's image (a data URI) before its text.
fn case_request(case: &Value) -> Value {
    let mut messages = Vec::new();
    if case["system_overridden"] == true {
        messages.push(json!({"role": "system", "content": case["system"]}));
    }
    for m in case["messages"].as_array().unwrap() {
        let role = if m["role"] == case["roles"][0] {
            "user"
        } else {
            "assistant"
        };
        let mut content = Vec::new();
        if let Some(image) = m["image"].as_str() {
            content.push(json!({"type": "image_url", "image_url": {"url": data_uri(image)}}));
        }
        content.push(json!({"type": "text", "text": m["text"]}));
        messages.push(json!({"role": role, "content": content}));
    }
    json!({"model": MODEL, "temperature": 0,
           "max_tokens": case["greedy"]["max_new_tokens"], "messages": messages})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_are_the_original_codes() {
    for (checkpoint, template, cases) in [
        (
            "llava-v1.5-tiny",
            None,
            &[
                "v15_single",
                "v15_multi_turn",
                "v15_text_only",
                "v15_system_override",
            ][..],
        ),
        ("llava-v1.5-tiny", Some("llava_v0"), &["v15_llava_v0"][..]),
        (
            "llava-v1-tiny-224",
            None,
            &["v1_single", "v1_multi_turn"][..],
        ),
    ] {
        let t = start(original_options(checkpoint, template)).await;
        for name in cases {
            let case = original_case(name);
            let (status, body) = post(&t, "/v1/chat/completions", &case_request(&case)).await;
            assert_eq!(status, 200, "{name}: {body}");
            // The original CLI strips its decoded answer and cuts it at the template's stop string.
            let content = body["choices"][0]["message"]["content"].as_str().unwrap();
            assert_eq!(
                content.trim(),
                case["greedy"]["text_until_stop_str"],
                "{name}"
            );
            assert_eq!(
                body["usage"]["prompt_tokens"], case["expanded_length"],
                "{name}"
            );

            let mut tokenize = case_request(&case);
            tokenize
                .as_object_mut()
                .unwrap()
                .retain(|k, _| k == "model" || k == "messages");
            let (status, body) = post(&t, "/tokenize", &tokenize).await;
            assert_eq!(status, 200, "{name}: {body}");
            assert_eq!(body["count"], case["expanded_length"], "{name}: /tokenize");
        }
    }
}

/// A chat request whose answer is pushed towards "###" (a strong `logit_bias` on its token).
async fn hash_answer(t: &TestServer) -> Value {
    let (status, tokens) = post(
        t,
        "/tokenize",
        &json!({"model": MODEL, "prompt": "###", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    let id = tokens["tokens"][0].as_u64().unwrap();
    let body = json!({"model": MODEL, "temperature": 0, "max_tokens": 4,
        "logit_bias": {id.to_string(): 100}, "stop": ["zzz"],
        "messages": [{"role": "user", "content": "Say hashes."}]});
    let (status, answer) = post(t, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer["choices"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_stop_string_ends_the_answer() {
    // llava_v0 stops at "###" (the client's own stop list kept too); llava_v1 has no such stop.
    let t = start(original_options("llava-v1.5-tiny", Some("llava_v0"))).await;
    let choice = hash_answer(&t).await;
    assert_eq!(choice["finish_reason"], "stop", "{choice}");
    assert!(
        !choice["message"]["content"]
            .as_str()
            .unwrap()
            .contains("###"),
        "{choice}"
    );

    // An image in an assistant message, which the original templates have no place for, is a 400.
    let bad = json!({"model": MODEL, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_uri("scene_336x336.png")}}]},
        {"role": "user", "content": "And?"}]});
    let (status, answer) = post(&t, "/v1/chat/completions", &bad).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("user messages"),
        "{answer}"
    );

    let t = start(original_options("llava-v1.5-tiny", Some("llava_v1"))).await;
    let choice = hash_answer(&t).await;
    assert_eq!(choice["finish_reason"], "length", "{choice}");
    assert!(
        choice["message"]["content"]
            .as_str()
            .unwrap()
            .contains("###"),
        "{choice}"
    );
}

#[test]
fn original_only_flags_and_missing_towers_fail_with_their_reason() {
    use llava_server::model::{load_model_with, LoadFormat, OriginalOptions};
    let cpu = candle_core::Device::Cpu;
    let load = |model: &std::path::Path, original: OriginalOptions| {
        load_model_with(
            model.to_str().unwrap(),
            LoadFormat::Auto,
            DType::F32,
            &cpu,
            &original,
        )
        .err()
        .expect("refused")
        .to_string()
    };
    let hf = fixtures().join("tiny");
    let err = load(
        &hf,
        OriginalOptions {
            conv_template: Some("llava_v1".into()),
            ..Default::default()
        },
    );
    assert!(
        err.contains("--conv-template applies to original-format"),
        "{err}"
    );
    let v15 = fixtures().join(ORIGINAL);
    let err = load(
        &v15,
        OriginalOptions {
            vision_tower: Some("/no/such/tower".into()),
            ..Default::default()
        },
    );
    assert!(err.contains("the vision tower \"/no/such/tower\""), "{err}");
    // An unknown template is refused when the prompt builder is made.
    let (model, assets) = load_model_with(
        v15.to_str().unwrap(),
        LoadFormat::Auto,
        DType::F32,
        &cpu,
        &OriginalOptions {
            vision_tower: Some(fixtures().join(TOWER).to_str().unwrap().into()),
            conv_template: Some("llava_v9".into()),
        },
    )
    .unwrap();
    let err = llava_server::frontend::PromptBuilder::from_checkpoint(&assets.root, &model.config)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("unknown conversation template \"llava_v9\""),
        "{err}"
    );
}
