//! Parity with HF transformers on the fixture checkpoints: every reference case of `tiny` and
//! `tiny_gqa` (GQA, sharded f16 storage, 224-px CLIP, CLS kept, `do_pad`, tied embeddings, two images
//! in one prompt). Expected values come only from `tests/fixtures/refs`, made by `make_fixtures.py`.

mod common;

use candle_core::Device;
use common::{assert_close, event_ids, greedy_events, greedy_params, ids, last_logits, Fixture};
use llava_server::engine::inputs::pixel_values;
use llava_server::engine::{self, EngineConfig};
use llava_server::frontend::ChoiceText;

fn check_all_cases(variant: &str) {
    let fx = Fixture::load(variant);
    // The batched engine on its own copy of the model: greedy tokens come from it.
    let engine = engine::start(
        Fixture::load(variant).model,
        EngineConfig {
            num_kv_blocks: Some(64),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert!(!fx.cases().is_empty());
    for case in fx.cases() {
        let name = case["name"].as_str().unwrap();
        let images = fx.images(case);

        // Input ids: the rendered prompt tokenized with each image expanded.
        let prompt = fx
            .builder
            .tokenize(case["prompt"].as_str().unwrap(), images)
            .unwrap();
        assert_eq!(
            prompt.token_ids,
            ids(&case["input_ids"]),
            "{name}: input ids"
        );

        if !prompt.images.is_empty() {
            let pixels = pixel_values(&prompt.images, &Device::Cpu).unwrap();
            assert_close(
                &format!("{name}: pixel values"),
                &pixels,
                fx.tensor(case, "pixel_values").unwrap(),
                1e-6,
            );
            // The CLIP hidden states the projector reads (tiny stores them without the batch axis
            // squeezed; both have [images, tokens, hidden]).
            let vision_ref = fx
                .tensor(case, "vision_layer_m2_no_cls")
                .or_else(|| fx.tensor(case, "vision_features"))
                .unwrap();
            let vision = fx.model.vision_features(&pixels).unwrap();
            assert_close(
                &format!("{name}: vision features"),
                &vision,
                vision_ref,
                1e-5,
            );
            let features = fx.model.encode_images(&pixels).unwrap();
            assert_close(
                &format!("{name}: image features"),
                &features,
                fx.tensor(case, "image_features").unwrap(),
                1e-5,
            );
        }

        // Last-position logits of the prompt.
        let logits = last_logits(&fx.model, &prompt);
        assert_close(
            &format!("{name}: last logits"),
            &logits,
            fx.tensor(case, "last_logits").unwrap(),
            1e-4,
        );

        // 16 greedy tokens through the engine, ids and text (whole and incremental decoding).
        // The references never stopped at EOS.
        let want = ids(&case["greedy"]["ids"]);
        let events = greedy_events(&engine, prompt.clone(), want.len(), true);
        let got = event_ids(&events);
        assert_eq!(got, want, "{name}: greedy ids");
        // The same prompt three times at once: the prefix cache hands all three the blocks of the
        // first run, so they decode together over shared slots (`decode_attention`'s shared-prefix
        // pass, merged with each one's own slots) and must still give HF's tokens.
        let hits_before = engine.metrics().prefix_hit_tokens;
        let params = greedy_params(want.len(), true);
        let streams: Vec<_> = (0..3)
            .map(|_| engine.submit(prompt.clone(), params.clone()).unwrap())
            .collect();
        for (i, stream) in streams.into_iter().enumerate() {
            let got = event_ids(&engine::collect_blocking(stream).unwrap());
            assert_eq!(got, want, "{name}: greedy ids of concurrent request {i}");
        }
        assert!(
            engine.metrics().prefix_hit_tokens - hits_before >= 3 * 16,
            "{name}: the concurrent requests shared no cached blocks"
        );
        let want_text = case["greedy"]["text"].as_str().unwrap();
        assert_eq!(
            fx.builder.decode(&got).unwrap(),
            want_text,
            "{name}: greedy text"
        );
        let mut incremental = ChoiceText::new(fx.builder.tokenizer().clone(), true, vec![]);
        let mut streamed = String::new();
        for e in &events {
            streamed.push_str(&incremental.push(&e.token_ids).unwrap().text);
        }
        streamed.push_str(&incremental.finish().unwrap().text);
        assert_eq!(streamed, want_text, "{name}: streamed text");
    }
}

/// Through the CPU decode kernels (`model::small_gemm`, `model::decode_attention`), which debug
/// builds leave off unless asked; every test of this binary asks the same.
fn with_cpu_decode_kernels() {
    std::env::set_var("LLAVA_SERVER_CPU_DECODE_KERNELS", "on");
}

#[test]
fn tiny_matches_hf_on_every_case() {
    with_cpu_decode_kernels();
    check_all_cases("tiny");
}

#[test]
fn tiny_gqa_matches_hf_on_every_case() {
    with_cpu_decode_kernels();
    check_all_cases("tiny_gqa");
}
