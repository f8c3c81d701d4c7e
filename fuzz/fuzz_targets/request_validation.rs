//! Arbitrary bytes → JSON → both request types (as `api::body::parse_json` does) → the validation
//! boundary, with a realistic fixed `Limits`. Checks that nothing panics and that what passes
//! validation keeps the limits it was checked against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llava_server::api::validate::{
    validate_chat, validate_completion, CompletionPrompt, Limits, MAX_PROMPTS,
};
use llava_server::api::wire::{ChatCompletionRequest, CompletionRequest};
use llava_server::frontend::MessagePart;
use llava_server::types::ContextLimit;

const CONTEXT: usize = 4096;

fn limits(salt_per_api_key: bool) -> Limits {
    Limits {
        vocab_size: 32064,
        context: ContextLimit(CONTEXT),
        max_images: 4,
        features_per_image: 576,
        max_token_bytes: 16,
        salt_per_api_key,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // The first byte picks the API key and salting mode; the JSON is the whole input either way.
    let key = data.first().copied().unwrap_or(0);
    let api_key = (key & 1 == 1).then_some("sk-fuzz");
    let limits = limits(key & 2 == 2);

    if let Ok(req) = serde_path_to_error::deserialize::<_, ChatCompletionRequest>(&value) {
        match validate_chat(&req, &limits, api_key) {
            Ok(valid) => {
                let images = valid
                    .messages
                    .iter()
                    .flat_map(|m| &m.parts)
                    .filter(|p| matches!(p, MessagePart::Image))
                    .count();
                assert_eq!(images, valid.image_urls.len());
                assert!(images <= limits.max_images);
                check_generation(&valid.generation);
            }
            Err(e) => drop(e.to_string()),
        }
    }
    if let Ok(req) = serde_path_to_error::deserialize::<_, CompletionRequest>(&value) {
        match validate_completion(&req, &limits, api_key) {
            Ok(valid) => {
                assert!((1..=MAX_PROMPTS).contains(&valid.prompts.len()));
                for prompt in &valid.prompts {
                    match prompt {
                        CompletionPrompt::Text(t) => {
                            assert!(t.len() / limits.max_token_bytes < CONTEXT)
                        }
                        CompletionPrompt::Ids(ids) => {
                            assert!(!ids.is_empty() && ids.len() < CONTEXT);
                            assert!(ids.iter().all(|&id| id < 32064));
                        }
                    }
                }
                // Only `echo` asks for nothing to be generated.
                if valid.echo_only {
                    assert!(valid.echo && valid.generation.asked_max_tokens == Some(0));
                } else {
                    check_generation(&valid.generation);
                }
            }
            Err(e) => drop(e.to_string()),
        }
    }
});

fn check_generation(g: &llava_server::api::validate::ValidGeneration) {
    let p = &g.params;
    assert!((1..=16).contains(&p.n));
    assert!(p.temperature.is_finite() && (0.0..=2.0).contains(&p.temperature));
    assert!(p.top_p > 0.0 && p.top_p <= 1.0, "top_p {}", p.top_p);
    assert!((0.0..=1.0).contains(&p.min_p));
    assert!(p.repetition_penalty > 0.0 && p.repetition_penalty <= 2.0);
    assert!((-2.0..=2.0).contains(&p.presence_penalty));
    assert!((-2.0..=2.0).contains(&p.frequency_penalty));
    assert!(p.stop.len() <= 4 && p.stop.iter().all(|s| !s.is_empty()));
    assert!(p.logprobs.is_none_or(|k| k <= 20));
    for &(id, bias) in &p.logit_bias {
        assert!((id as usize) < 32064);
        assert!(bias.is_finite() && (-100.0..=100.0).contains(&bias));
    }
    if let Some(m) = g.asked_max_tokens {
        assert!(
            m >= 1 && m <= CONTEXT,
            "max_tokens {m} passed a {CONTEXT}-token context"
        );
    }
}
