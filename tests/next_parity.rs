//! LLaVA-NeXT (anyres) parity with HF transformers 5.24 on the `tiny_next_mistral` (Mistral decoder,
//! GQA, tied embeddings, `[INST]` template) and `tiny_next_llama` (LLaMA, f16 shards, sparse config)
//! fixtures: prompts, ids and per-image token counts, pixel values bit for bit, the packed image
//! features, last logits and 16 greedy tokens for every case of `refs/tiny_next_*.json` (made by
//! `make_next_fixtures.py`), and HF's token counts for the real 336-px configuration.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{
    assert_close, event_ids, fixtures, greedy_events, hf_messages, ids, last_logits, strided,
};
use llava_server::engine::inputs::{encode_images, pixel_values};
use llava_server::engine::{self, EngineConfig};
use llava_server::frontend::{ChatMessage, ImageProcessorConfig, MessagePart, PromptBuilder, Role};
use llava_server::model::anyres::AnyRes;
use llava_server::model::{load_model, LlavaModel, LoadFormat};
use llava_server::types::ProcessedImage;
use serde_json::Value;
use sha2::Digest;
use std::collections::HashMap;

struct Loaded {
    model: LlavaModel,
    builder: PromptBuilder,
    processor: ImageProcessorConfig,
}

fn load(variant: &str) -> Loaded {
    let dir = fixtures().join(variant);
    let (model, assets) = load_model(
        dir.to_str().unwrap(),
        LoadFormat::Auto,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let builder = PromptBuilder::from_checkpoint(&assets.root, &model.config).unwrap();
    let processor = ImageProcessorConfig::for_checkpoint(&assets.root, &model.config).unwrap();
    Loaded {
        model,
        builder,
        processor,
    }
}

fn refs(variant: &str) -> (Value, HashMap<String, Tensor>) {
    let dir = fixtures().join("refs");
    let json = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{variant}.json"))).unwrap(),
    )
    .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{variant}.safetensors")), &Device::Cpu)
            .unwrap();
    (json, tensors)
}

/// Pixel values laid out as HF batches them: `[images, max_tiles, c, h, w]`, short images padded
/// with zero tiles.
fn hf_batched_pixels(images: &[ProcessedImage]) -> Vec<f32> {
    let max_tiles = images.iter().map(|i| i.tiles).max().unwrap_or(0);
    let mut out = Vec::new();
    for img in images {
        out.extend_from_slice(&img.pixel_values);
        let tile = img.channels * img.height * img.width;
        out.extend(std::iter::repeat_n(0f32, (max_tiles - img.tiles) * tile));
    }
    out
}

fn check_cases(variant: &str) {
    let (refs, tensors) = refs(variant);
    let tensor = |case: &Value, what: &str| -> Option<&Tensor> {
        tensors.get(&format!("{}.{what}", case["name"].as_str().unwrap()))
    };
    let l = load(variant);
    let engine = engine::start(
        load(variant).model,
        EngineConfig {
            num_kv_blocks: Some(64),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = l.builder.render(&hf_messages(&case["messages"])).unwrap();
        assert_eq!(text, case["prompt"].as_str().unwrap(), "{name}: prompt");
        let images: Vec<ProcessedImage> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let bytes = std::fs::read(fixtures().join("images").join(f.as_str().unwrap()));
                l.processor.process_bytes(&bytes.unwrap()).unwrap()
            })
            .collect();
        let prompt = l.builder.tokenize(&text, images).unwrap();
        assert_eq!(
            prompt.token_ids,
            ids(&case["input_ids"]),
            "{name}: input ids"
        );
        let counts: Vec<u64> = prompt.image_spans.iter().map(|s| s.len as u64).collect();
        let want_counts: Vec<u64> = case["num_image_tokens_per_image"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap()).collect())
            .unwrap_or_default();
        assert_eq!(counts, want_counts, "{name}: tokens per image");

        if !prompt.images.is_empty() {
            let tiles: Vec<u64> = prompt.images.iter().map(|i| i.tiles as u64).collect();
            assert_eq!(
                tiles,
                ids(&case["num_tiles_per_image"])
                    .iter()
                    .map(|&t| t as u64)
                    .collect::<Vec<_>>(),
                "{name}: tiles"
            );
            // Bit for bit: the SHA-256 of HF's batched f32 pixel values.
            let batched = hf_batched_pixels(&prompt.images);
            let bytes: Vec<u8> = batched.iter().flat_map(|v| v.to_le_bytes()).collect();
            let hex: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                hex,
                case["pixel_values_sha256_f32le"].as_str().unwrap(),
                "{name}: pixels"
            );
            let batched = Tensor::new(batched, &Device::Cpu).unwrap();
            assert_close(
                &format!("{name}: pixel values"),
                &strided(&batched),
                tensor(case, "pixel_values_s97").unwrap(),
                1e-6,
            );

            let first = pixel_values(&prompt.images[..1], &Device::Cpu).unwrap();
            let vision = l.model.vision_features(&first).unwrap();
            assert_close(
                &format!("{name}: CLIP features"),
                &strided(&vision),
                tensor(case, "vision_features_s97").unwrap(),
                1e-5,
            );
            let features = encode_images(&l.model, &prompt.images).unwrap();
            let features = Tensor::cat(&features, 0).unwrap();
            assert_close(
                &format!("{name}: packed image features"),
                &features,
                tensor(case, "image_features").unwrap(),
                1e-5,
            );
        }

        let logits = last_logits(&l.model, &prompt);
        assert_close(
            &format!("{name}: last logits"),
            &strided(&logits),
            tensor(case, "last_logits_s97").unwrap(),
            1e-4,
        );
        let argmax = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(
            argmax as u64,
            case["last_logits"]["argmax"].as_u64().unwrap(),
            "{name}"
        );

        let want = ids(&case["greedy"]["ids"]);
        let got = event_ids(&greedy_events(&engine, prompt, want.len(), true));
        assert_eq!(got, want, "{name}: greedy ids");
        assert_eq!(
            l.builder.decode(&got).unwrap(),
            case["greedy"]["text"].as_str().unwrap(),
            "{name}: greedy text"
        );
    }
}

#[test]
fn tiny_next_mistral_matches_hf_on_every_case() {
    std::env::set_var("LLAVA_SERVER_CPU_DECODE_KERNELS", "on");
    check_cases("tiny_next_mistral");
}

#[test]
fn tiny_next_llama_matches_hf_on_every_case() {
    std::env::set_var("LLAVA_SERVER_CPU_DECODE_KERNELS", "on");
    check_cases("tiny_next_llama");
}

#[test]
fn token_counts_match_hfs_processor_for_the_real_configuration() {
    let (refs, _) = refs("tiny_next_mistral");
    let table = &refs["token_counts"];
    let anyres = AnyRes {
        pinpoints: table["config"]["image_grid_pinpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().unwrap() as usize,
                    p[1].as_u64().unwrap() as usize,
                )
            })
            .collect(),
        tile: 336,
        patches_per_side: 24,
    };
    let sizes = table["sizes"].as_array().unwrap();
    assert!(sizes.len() >= 25);
    for s in sizes {
        let (w, h) = (
            s["width"].as_u64().unwrap() as usize,
            s["height"].as_u64().unwrap() as usize,
        );
        let best = &s["best_resolution_hw"];
        assert_eq!(
            anyres.best_resolution(h, w),
            (
                best[0].as_u64().unwrap() as usize,
                best[1].as_u64().unwrap() as usize
            ),
            "{w}×{h}"
        );
        assert_eq!(
            anyres.tiles(h, w) as u64,
            s["num_tiles_with_base"].as_u64().unwrap(),
            "{w}×{h}"
        );
        assert_eq!(
            anyres.token_count(h, w, 576) as u64,
            s["num_image_tokens"].as_u64().unwrap(),
            "{w}×{h}"
        );
    }
}

#[test]
fn built_in_next_shapes_have_matching_assets() {
    // `--load-format dummy --model llava-v1.6-mistral-7b` (or -34b): the config's tiling and the
    // assets' processor agree, so a GPU run gets HF's token counts (weights are not made here).
    for name in ["llava-v1.6-mistral-7b", "llava-v1.6-34b"] {
        let json = llava_server::model::dummy::builtin_config(name).unwrap();
        let config = llava_server::model::LlavaConfig::from_json(&json).unwrap();
        let assets = fixtures().join(llava_server::model::dummy::builtin_assets(name));
        let processor = ImageProcessorConfig::for_checkpoint(&assets, &config).unwrap();
        let builder = PromptBuilder::from_checkpoint(&assets, &config).unwrap();
        let bytes = std::fs::read(fixtures().join("images/scene_640x480.png")).unwrap();
        let image = processor.process_bytes(&bytes).unwrap();
        assert_eq!((image.tiles, image.height, image.width), (5, 336, 336));
        let prompt = builder
            .build(
                &[ChatMessage {
                    role: Role::User,
                    parts: vec![MessagePart::Image, MessagePart::Text("Hi".into())],
                }],
                vec![image],
            )
            .unwrap();
        assert_eq!(prompt.image_spans[0].len, 2340, "{name}");
    }
}

#[test]
fn the_pixel_cap_covers_every_tiling_intermediate() {
    // A 2000×20 strip is 40,000 pixels, but squashing it to the 56×56 base image passes through
    // 2000×56 = 112,000 (Pillow resizes one axis, then the other).
    let l = load("tiny_next_mistral");
    let mut png = Vec::new();
    image::RgbImage::from_pixel(2000, 20, image::Rgb([10, 200, 30]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let err = l
        .processor
        .process_bytes_within(&png, 100_000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tiling it needs 2000×56 pixels"), "{err}");
    let image = l.processor.process_bytes_within(&png, 112_000).unwrap();
    assert_eq!((image.source_size, image.tiles), ((20, 2000), 4));
}
