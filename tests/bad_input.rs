//! Bad checkpoints and bad inputs give errors that say what is wrong, never panics.

mod common;

use candle_core::{DType, Device};
use llava_server::frontend::{ChatMessage, ImageProcessorConfig, MessagePart, PromptBuilder, Role};
use llava_server::model::{resolve_checkpoint, LlavaConfig, LlavaModel};
use llava_server::types::ContextLimit;
use std::path::Path;

/// A writable copy of a fixture checkpoint (files symlinked, so only what a test replaces is copied).
fn copy_fixture(variant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::fixtures().join(variant)).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let checkpoint = match resolve_checkpoint(dir.to_str().unwrap()) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let config = match LlavaConfig::from_file(&checkpoint.file("config.json")) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    match LlavaModel::load(&checkpoint, config, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("tiny_gqa");
    std::fs::remove_file(dir.path().join("model-00003-of-00005.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00003-of-00005.safetensors"), "{err}");
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn missing_weights_file_is_reported() {
    let dir = copy_fixture("tiny");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let dir = copy_fixture("tiny");
    edit_config(dir.path(), |c| {
        c["text_config"]["intermediate_size"] = 345.into()
    });
    let err = load_err(dir.path());
    assert!(err.contains("gate_proj.weight"), "{err}");
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("tiny");
    edit_config(dir.path(), |c| {
        c["text_config"]["num_hidden_layers"] = 4.into()
    });
    let err = load_err(dir.path());
    assert!(err.contains("language_model.model.layers.3"), "{err}");
}

#[test]
fn malformed_config_is_reported_with_its_path() {
    let dir = copy_fixture("tiny");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn unreadable_image_is_an_error() {
    let processor =
        ImageProcessorConfig::from_file(&common::fixtures().join("tiny/preprocessor_config.json"))
            .unwrap();
    let err = processor
        .process_bytes(b"definitely not a png")
        .unwrap_err();
    assert!(
        err.to_string().contains("not a recognised image format"),
        "{err}"
    );
    // A PNG cut short after its header: the header reads, the pixels do not.
    let png = std::fs::read(common::fixtures().join("images/scene_336x336.png")).unwrap();
    let err = processor.process_bytes(&png[..100]).unwrap_err();
    assert!(err.to_string().contains("cannot decode image"), "{err}");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let dir = common::fixtures().join("tiny");
    let config = LlavaConfig::from_file(&dir.join("config.json")).unwrap();
    let builder = PromptBuilder::from_checkpoint(&dir, &config).unwrap();
    let context = ContextLimit(config.text.max_position_embeddings);
    assert_eq!(context.0, 4096, "the fixture's positions");
    let tokens = |words: usize| {
        let messages = [ChatMessage {
            role: Role::User,
            parts: vec![MessagePart::Text("llama ".repeat(words))],
        }];
        builder.build(&messages, vec![]).unwrap().token_ids.len()
    };
    // Alone too long, with or without a budget.
    let long = tokens(5000);
    assert!(long > 4096, "{long}");
    let err = context.fit(long, Some(16)).unwrap_err().to_string();
    assert!(err.contains("exceed the context of 4096 tokens"), "{err}");
    let err = context.fit(long, None).unwrap_err().to_string();
    assert!(err.contains("fills the context of 4096 tokens"), "{err}");
    // A prompt that fits, but not with the tokens asked for; without a budget it gets the rest.
    let short = tokens(2000);
    let err = context.fit(short, Some(4000)).unwrap_err().to_string();
    assert!(err.contains("max_tokens is 4000"), "{err}");
    assert_eq!(context.fit(short, None), Ok(4096 - short));
    assert_eq!(context.fit(4095, None), Ok(1));
    assert!(context.fit(4096, None).is_err());
    assert_eq!(context.fit(4000, Some(96)), Ok(96));
    assert!(context.fit(4000, Some(97)).is_err());
    assert!(context.fit(usize::MAX, Some(1)).is_err());
}

#[test]
fn image_count_must_match_placeholders() {
    let dir = common::fixtures().join("tiny");
    let config = LlavaConfig::from_file(&dir.join("config.json")).unwrap();
    let builder = PromptBuilder::from_checkpoint(&dir, &config).unwrap();
    let messages = [ChatMessage {
        role: Role::User,
        parts: vec![MessagePart::Image, MessagePart::Text("hi".into())],
    }];
    let err = builder.build(&messages, vec![]).unwrap_err().to_string();
    assert!(err.contains("1 image placeholders but 0 images"), "{err}");
}

#[test]
fn nonexistent_local_path_is_not_mistaken_for_a_hub_id() {
    let err = resolve_checkpoint("./no/such/dir").unwrap_err().to_string();
    assert!(err.contains("neither a local folder nor a hub id"), "{err}");
}
