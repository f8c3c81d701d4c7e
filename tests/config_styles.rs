//! Config loading: the hub's sparse transformers-4 style and the transformers-5 style describe the same
//! model; absent fields take LlamaConfig / CLIPVisionConfig defaults.

mod common;

use llava_server::model::config::{Activation, FeatureSelectStrategy, LlavaConfig, StorageDtype};

fn load(name: &str) -> LlavaConfig {
    let path = common::fixtures().join(name);
    LlavaConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn sparse_hub_and_transformers5_configs_load_to_the_same_model() {
    let full = load("tiny/config.json");
    assert_eq!(load("configs/tiny_sparse.json"), full);
    assert_eq!(load("configs/tiny_v5.json"), full);
    assert_eq!(full.storage_dtype, Some(StorageDtype::F32));
}

#[test]
fn transformers5_config_runs_the_same_weights() {
    // Load the tiny weights under the transformers-5 config and check one HF reference logit vector.
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::fixtures().join("tiny");
    for entry in std::fs::read_dir(&tiny).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    std::fs::copy(
        common::fixtures().join("configs/tiny_v5.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let checkpoint = llava_server::model::resolve_checkpoint(dir.path().to_str().unwrap()).unwrap();
    let config = LlavaConfig::from_file(&checkpoint.file("config.json")).unwrap();
    let model = llava_server::model::LlavaModel::load(
        &checkpoint,
        config,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let fx_refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("refs/tiny.json")).unwrap(),
    )
    .unwrap();
    let case = fx_refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "text_only")
        .unwrap();
    let prompt = llava_server::types::TokenizedPrompt {
        token_ids: common::ids(&case["input_ids"]),
        images: vec![],
        image_spans: vec![],
        cache_salt: None,
    };
    let mut seq = llava_server::engine::single_sequence::SequenceState::new(
        &model,
        prompt.token_ids.len(),
        16,
    )
    .unwrap();
    let logits = seq.prefill(&prompt, None).unwrap();
    let argmax = llava_server::engine::sampler::argmax(&logits);
    assert_eq!(
        argmax as u64,
        case["last_logits"]["argmax"].as_u64().unwrap()
    );
}

#[test]
fn llava_1_5_7b_hub_config_gets_llama_and_clip_defaults() {
    let cfg = load("configs/llava-1.5-7b-hf.json");
    let t = &cfg.text;
    // LlamaConfig defaults fill what the hub file leaves out (Vicuna-7B's real shapes).
    assert_eq!(
        (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
        (4096, 11008, 32)
    );
    assert_eq!(
        (t.num_attention_heads, t.num_key_value_heads, t.head_dim),
        (32, 32, 128)
    );
    assert_eq!(t.rope_theta, 10000.0);
    assert_eq!(t.rms_norm_eps, 1e-5);
    assert_eq!(t.hidden_act, Activation::Silu);
    assert_eq!(t.vocab_size, 32064);
    assert!(!t.tie_word_embeddings);
    // CLIP ViT-L/14 at 336 px: 24 × 24 patches, CLS dropped.
    assert_eq!(cfg.vision.hidden_act, Activation::QuickGelu);
    assert_eq!(cfg.vision.layer_norm_eps, 1e-5);
    assert_eq!(cfg.feature_select_strategy, FeatureSelectStrategy::Default);
    assert_eq!(cfg.vision_feature_layers, vec![-2]);
    assert_eq!(cfg.image_feature_count(), 576);
    assert_eq!(cfg.storage_dtype, Some(StorageDtype::F16));
}

#[test]
fn sparse_text_config_defaults_rms_eps_to_llama_default() {
    let cfg = load("tiny_gqa/config.json");
    assert_eq!(cfg.text.rms_norm_eps, 1e-6);
    assert_eq!(cfg.text.num_key_value_heads, 2);
    assert_eq!(cfg.image_feature_count(), 257);
}

#[test]
fn bad_fields_are_named() {
    let err = |json: &str| LlavaConfig::from_json(json).unwrap_err().to_string();
    assert!(err(r#"{"text_config": {"hidden_act": "tanhh"}}"#).contains("tanhh"));
    assert!(
        err(r#"{"text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}}"#)
            .contains("num_key_value_heads")
    );
    assert!(err(r#"{"vision_feature_layer": -30}"#).contains("vision_feature_layer"));
    assert!(err(r#"{"text_config": {"rope_scaling": {"rope_type": "yarn"}}}"#).contains("yarn"));
    assert!(err(r#"{"model_type": "mllama"}"#).contains("mllama"));
}
