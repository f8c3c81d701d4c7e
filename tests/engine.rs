//! The batched engine against HF's references: requests mixed in one batch (chunked prefills beside
//! decodes), prefix and image caches, preemption, aborts in every state, seeds and `n > 1`.

mod common;

use common::{ids, Fixture};
use llava_server::engine::{self, collect_blocking, DecodeGraphs, EngineConfig, EngineHandle};
use llava_server::types::{FinishReason, SamplingParams, TokenEvent, TokenizedPrompt};
use std::time::{Duration, Instant};

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn prompt(fx: &Fixture, name: &str) -> TokenizedPrompt {
    let case = fx.case(name);
    fx.builder
        .tokenize(case["prompt"].as_str().unwrap(), fx.images(case))
        .unwrap()
}

fn reference(fx: &Fixture, name: &str) -> Vec<u32> {
    ids(&fx.case(name)["greedy"]["ids"])
}

fn tokens(events: &[TokenEvent], index: usize) -> Vec<u32> {
    events
        .iter()
        .filter(|e| e.index == index)
        .flat_map(|e| e.token_ids.clone())
        .collect()
}

fn start(fx_variant: &str, config: EngineConfig) -> EngineHandle {
    engine::start(Fixture::load(fx_variant).model, config).unwrap()
}

/// Waits (bounded) until the engine has no sequence left and no block in use.
fn wait_idle(engine: &EngineHandle) -> llava_server::engine::MetricsSnapshot {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = engine.metrics();
        if m.kv_blocks_used == 0 && m.running == 0 && m.waiting == 0 {
            return m;
        }
        assert!(Instant::now() < deadline, "engine never went idle: {m:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const TINY_CASES: [&str; 6] = [
    "img_landscape",
    "img_square336",
    "img_portrait_upscale",
    "img_grayscale",
    "text_only",
    "chat_template",
];

#[test]
fn batched_requests_equal_alone_and_the_hf_reference() {
    let fx = Fixture::load("tiny");
    // A small token budget: prompts of 595 tokens are prefilled in chunks while others decode.
    let engine = start(
        "tiny",
        EngineConfig {
            max_num_batched_tokens: 256,
            num_kv_blocks: Some(512),
            ..EngineConfig::default()
        },
    );
    let streams: Vec<_> = TINY_CASES
        .iter()
        .map(|n| engine.submit(prompt(&fx, n), greedy(16)).unwrap())
        .collect();
    for (name, stream) in TINY_CASES.iter().zip(streams) {
        let events = collect_blocking(stream).unwrap();
        assert_eq!(tokens(&events, 0), reference(&fx, name), "{name} batched");
        let last = events.last().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Length));
        let usage = last.usage.unwrap();
        assert_eq!(usage.completion_tokens, 16);
        assert_eq!(
            usage.prompt_tokens,
            fx.case(name)["num_input_ids"].as_u64().unwrap() as usize
        );
        assert_eq!(
            usage.image_tokens,
            fx.case(name)["num_image_tokens"].as_u64().unwrap() as usize
        );
    }
    // Alone, one after another, on a fresh engine (no cache to help).
    let alone = start("tiny", EngineConfig::default());
    for name in ["img_grayscale", "text_only"] {
        let events =
            collect_blocking(alone.submit(prompt(&fx, name), greedy(16)).unwrap()).unwrap();
        assert_eq!(tokens(&events, 0), reference(&fx, name), "{name} alone");
    }
    let m = wait_idle(&engine);
    assert_eq!(m.kv_blocks_used, 0);
}

#[test]
fn prefix_and_image_caches_skip_work_and_keep_outputs() {
    let fx = Fixture::load("tiny");
    let engine = start("tiny", EngineConfig::default());
    let first = collect_blocking(
        engine
            .submit(prompt(&fx, "img_landscape"), greedy(16))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tokens(&first, 0), reference(&fx, "img_landscape"));
    assert_eq!(first.last().unwrap().usage.unwrap().cached_prompt_tokens, 0);
    let before = engine.metrics();
    assert_eq!(before.images_encoded, 1);

    // Same image, another question: the 585 common tokens hold 36 full blocks of 16.
    let second = collect_blocking(
        engine
            .submit(prompt(&fx, "chat_template"), greedy(16))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tokens(&second, 0), reference(&fx, "chat_template"));
    assert_eq!(
        second.last().unwrap().usage.unwrap().cached_prompt_tokens,
        576
    );
    let after = engine.metrics();
    assert_eq!(after.prefix_hit_tokens - before.prefix_hit_tokens, 576);
    // Placeholders 577..581 are still computed: their features come from the image cache.
    assert_eq!(after.images_encoded, 1, "the image is encoded once");
    assert_eq!(after.image_cache_hits, 1);

    // The very same prompt again: everything but the last block's tokens is reused.
    let third = collect_blocking(
        engine
            .submit(prompt(&fx, "img_landscape"), greedy(16))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tokens(&third, 0), reference(&fx, "img_landscape"));
    assert_eq!(
        third.last().unwrap().usage.unwrap().cached_prompt_tokens,
        592
    );
}

#[test]
fn preemption_under_a_small_pool_keeps_every_output() {
    let fx = Fixture::load("tiny");
    // Prompts of 595 tokens need 38 blocks; two fill 76 blocks, and the first decode past 608
    // tokens needs a 39th: the newest is preempted and recomputed later.
    let engine = start(
        "tiny",
        EngineConfig {
            num_kv_blocks: Some(77),
            ..EngineConfig::default()
        },
    );
    let names = ["img_landscape", "img_square336", "img_portrait_upscale"];
    let streams: Vec<_> = names
        .iter()
        .map(|n| engine.submit(prompt(&fx, n), greedy(16)).unwrap())
        .collect();
    for (name, stream) in names.iter().zip(streams) {
        let events = collect_blocking(stream).unwrap();
        assert_eq!(tokens(&events, 0), reference(&fx, name), "{name}");
    }
    let m = wait_idle(&engine);
    assert!(m.preemptions > 0, "the pool was meant to run out: {m:?}");
    assert_eq!(m.kv_blocks_used, 0);
}

#[test]
fn aborting_in_every_state_returns_every_block() {
    let fx = Fixture::load("tiny");
    let engine = start(
        "tiny",
        EngineConfig {
            max_num_batched_tokens: 64,
            max_num_seqs: 2,
            num_kv_blocks: Some(200),
            ..EngineConfig::default()
        },
    );
    // Decoding: dropped after its first token.
    let mut decoding = engine
        .submit(prompt(&fx, "text_only"), greedy(200))
        .unwrap();
    decoding.blocking_next().unwrap().unwrap();
    // Prefilling (595 tokens at 64 a step) and queued (the sequence cap is 2).
    let prefilling = engine
        .submit(prompt(&fx, "img_landscape"), greedy(16))
        .unwrap();
    let queued = engine
        .submit(prompt(&fx, "img_square336"), greedy(16))
        .unwrap();
    let queued_too = engine
        .submit(prompt(&fx, "img_grayscale"), greedy(16))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(engine.metrics().kv_blocks_used > 0);
    drop(queued);
    drop(prefilling);
    drop(decoding);
    drop(queued_too);
    let m = wait_idle(&engine);
    assert_eq!(m.kv_blocks_used, 0);
    assert_eq!(m.kv_blocks_total, 200);
}

#[test]
fn a_seed_gives_the_same_tokens_whatever_the_batch() {
    let fx = Fixture::load("tiny");
    let sampled = SamplingParams {
        max_tokens: 12,
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(1234),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let engine = start("tiny", EngineConfig::default());
    let alone = tokens(
        &collect_blocking(
            engine
                .submit(prompt(&fx, "text_only"), sampled.clone())
                .unwrap(),
        )
        .unwrap(),
        0,
    );
    let others: Vec<_> = ["img_grayscale", "img_square336"]
        .iter()
        .map(|n| engine.submit(prompt(&fx, n), greedy(12)).unwrap())
        .collect();
    let batched = tokens(
        &collect_blocking(engine.submit(prompt(&fx, "text_only"), sampled).unwrap()).unwrap(),
        0,
    );
    drop(others);
    assert_eq!(alone, batched);
    assert_eq!(alone.len(), 12);
}

#[test]
fn n_choices_share_the_prompt_blocks() {
    let fx = Fixture::load("tiny");
    let engine = start("tiny", EngineConfig::default());
    let params = SamplingParams { n: 3, ..greedy(16) };
    let before = engine.metrics();
    let events =
        collect_blocking(engine.submit(prompt(&fx, "img_grayscale"), params).unwrap()).unwrap();
    for index in 0..3 {
        assert_eq!(
            tokens(&events, index),
            reference(&fx, "img_grayscale"),
            "choice {index}"
        );
    }
    let usage = events.last().unwrap().usage.unwrap();
    assert_eq!(usage.completion_tokens, 48);
    // Choices 1 and 2 reuse the 37 full blocks of choice 0's 595-token prompt.
    let hits = engine.metrics().prefix_hit_tokens - before.prefix_hit_tokens;
    assert_eq!(hits, 2 * 592);
    assert_eq!(engine.metrics().images_encoded, 1);
}

#[test]
fn eos_and_stop_tokens_end_a_choice() {
    let fx = Fixture::load("tiny");
    let engine = start("tiny", EngineConfig::default());
    let want = reference(&fx, "text_only");
    // Treat the 4th greedy token as a stop token: generation ends with it, reason "stop".
    let params = SamplingParams {
        stop_token_ids: vec![want[3]],
        ..greedy(16)
    };
    let events =
        collect_blocking(engine.submit(prompt(&fx, "text_only"), params).unwrap()).unwrap();
    let got = tokens(&events, 0);
    let cut = want.iter().position(|&t| t == want[3]).unwrap() + 1;
    assert_eq!(got, want[..cut]);
    assert_eq!(
        events.last().unwrap().finish_reason,
        Some(FinishReason::Stop)
    );
}

#[test]
fn requests_the_engine_cannot_hold_are_refused() {
    let fx = Fixture::load("tiny");
    let engine = start(
        "tiny",
        EngineConfig {
            num_kv_blocks: Some(10),
            ..EngineConfig::default()
        },
    );
    let err = match engine.submit(prompt(&fx, "img_landscape"), greedy(16)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a 611-token request fit in 160 slots"),
    };
    // The KV cache (10 blocks of 16) is smaller than the 4,096 positions, so it is the context.
    assert!(err.contains("exceed the context of 160 tokens"), "{err}");
    let err = match engine.submit(prompt(&fx, "text_only"), greedy(5000)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("accepted"),
    };
    assert!(err.contains("max_tokens is 5000"), "{err}");
    engine.shutdown();
    assert!(engine.submit(prompt(&fx, "text_only"), greedy(1)).is_err());
}

/// Pure decode steps padded to fixed sizes (the inputs a CUDA graph replays) give HF's tokens, both
/// when only the argmax is read back (greedy) and when the logits rows are (logprobs wanted).
#[test]
fn padded_decode_steps_equal_the_hf_reference() {
    let fx = Fixture::load("tiny");
    let engine = start(
        "tiny",
        EngineConfig {
            num_kv_blocks: Some(512),
            decode_graphs: DecodeGraphs::Padded,
            ..EngineConfig::default()
        },
    );
    // Six sequences decode together: a step padded from 6 to 8 rows.
    let streams: Vec<_> = TINY_CASES
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let params = SamplingParams {
                logprobs: (i == 0).then_some(2),
                ..greedy(16)
            };
            engine.submit(prompt(&fx, n), params).unwrap()
        })
        .collect();
    for (name, stream) in TINY_CASES.iter().zip(streams) {
        let events = collect_blocking(stream).unwrap();
        assert_eq!(tokens(&events, 0), reference(&fx, name), "{name}");
    }
    // 15 decode steps after the prefills, or fewer if a prefill step also decoded someone.
    let m = wait_idle(&engine);
    assert!(m.fixed_decode_steps >= 10, "{m:?}");
}

/// A choice the frontend stops (a stop string) frees its sequence; its sibling runs to the end, and the
/// request ends with it.
#[test]
fn a_stopped_choice_ends_while_its_sibling_goes_on() {
    let fx = Fixture::load("tiny");
    let engine = start("tiny", EngineConfig::default());
    let before = engine.metrics();
    let params = SamplingParams { n: 2, ..greedy(64) };
    let mut stream = engine.submit(prompt(&fx, "text_only"), params).unwrap();
    let mut events = Vec::new();
    let mut stopped = false;
    while let Some(event) = stream.blocking_next() {
        let event = event.unwrap();
        if event.index == 1 && !stopped {
            stream.stop_choice(1);
            stopped = true;
        }
        events.push(event);
    }
    assert_eq!(tokens(&events, 0).len(), 64, "choice 0 runs to max_tokens");
    let last = events.last().unwrap();
    assert_eq!(last.index, 0);
    assert!(
        last.usage.is_some(),
        "the request ends with its last choice"
    );
    // Choice 1 stopped after at most a few steps in flight, far short of its 64 tokens.
    let choice_1 = tokens(&events, 1).len();
    assert!(choice_1 < 16, "choice 1 kept going: {choice_1} tokens");
    // Counters are settled once the engine is idle (a step counts its tokens after sending them).
    let generated = wait_idle(&engine).generated_tokens - before.generated_tokens;
    assert_eq!(generated as usize, 64 + choice_1);
}

/// Unfiltered temperature sampling is drawn where the logits are unless the sequence itself needs
/// them on the host (here: it asks for logprobs): a seed gives the same tokens either way, and in
/// padded decode steps. A neighbour that needs the host does not pull other rows there.
#[test]
fn a_seeded_draw_is_the_same_on_the_device_path_and_the_host_path() {
    let fx = Fixture::load("tiny");
    let sampled = SamplingParams {
        temperature: 0.8,
        seed: Some(11),
        ..greedy(12)
    };
    // (tokens, how many of all tokens were chosen where the logits are)
    let run = |config: EngineConfig, own_logprobs: bool, neighbour: bool| -> (Vec<u32>, u64) {
        let engine = start("tiny", config);
        // A greedy neighbour that wants logprobs (its rows go to the host), submitted first and
        // running longer, so it shares every step.
        let other = neighbour.then(|| {
            let params = SamplingParams {
                logprobs: Some(1),
                ..greedy(40)
            };
            engine.submit(prompt(&fx, "chat_template"), params).unwrap()
        });
        let params = SamplingParams {
            logprobs: own_logprobs.then_some(1),
            ..sampled.clone()
        };
        let main = engine.submit(prompt(&fx, "text_only"), params).unwrap();
        let events = collect_blocking(main).unwrap();
        if let Some(other) = other {
            collect_blocking(other).unwrap();
        }
        (
            tokens(&events, 0),
            wait_idle(&engine).tokens_chosen_in_place,
        )
    };
    let (device, in_place) = run(EngineConfig::default(), false, false);
    assert_eq!(
        (device.len(), in_place),
        (12, 12),
        "every token drawn in place"
    );
    assert_ne!(device, reference(&fx, "text_only")[..12], "not a draw");
    assert_eq!(
        run(EngineConfig::default(), true, false),
        (device.clone(), 0),
        "host path"
    );
    assert_eq!(
        run(EngineConfig::default(), false, true),
        (device.clone(), 12),
        "in place beside a host row"
    );
    let padded = EngineConfig {
        decode_graphs: DecodeGraphs::Padded,
        ..EngineConfig::default()
    };
    assert_eq!(
        run(padded, false, false),
        (device, 12),
        "padded decode steps"
    );
}

#[test]
fn an_image_is_encoded_once_however_its_prompt_is_chunked() {
    // Without a content cache, a 595-token prompt prefills in 64-token chunks, ten of which overlap
    // its image: the runner holds the features the scheduler had it encode (counted against the
    // encoder budget once) until the prefill has passed the image, so the image is encoded once and
    // the answer is HF's.
    let fx = Fixture::load("tiny");
    let engine = start(
        "tiny",
        EngineConfig {
            max_num_batched_tokens: 64,
            image_cache_size: 0,
            ..EngineConfig::default()
        },
    );
    for name in ["img_landscape", "img_grayscale"] {
        let events =
            collect_blocking(engine.submit(prompt(&fx, name), greedy(16)).unwrap()).unwrap();
        assert_eq!(tokens(&events, 0), reference(&fx, name), "{name}");
    }
    let m = engine.metrics();
    assert_eq!((m.images_encoded, m.image_cache_hits), (2, 0));
}
