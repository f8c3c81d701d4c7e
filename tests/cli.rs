//! The `generate` command end to end, as a user runs it: only the generated text on stdout, HF's greedy
//! text for the reference prompts, and clear errors (exit status 1, never a panic) for bad input.

mod common;

use std::process::{Command, Output};

fn generate(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llava-server"))
        .arg("generate")
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn refs(variant: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join(format!("refs/{variant}.json"))).unwrap(),
    )
    .unwrap()
}

fn case<'a>(refs: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    refs["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

#[test]
fn generate_prints_hf_greedy_text_on_the_default_fixture() {
    let refs = refs("tiny");
    let case = case(&refs, "chat_template");
    let image = common::fixtures().join("images/scene_640x480.png");
    let out = generate(
        &[
            "--prompt",
            "What is in the picture?",
            "--image",
            image.to_str().unwrap(),
            "--max-tokens",
            "16",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!("{}\n", case["greedy"]["text"].as_str().unwrap())
    );
}

#[test]
fn generate_with_two_images_on_a_sharded_f16_checkpoint() {
    let refs = refs("tiny_gqa");
    let case = case(&refs, "two_images");
    let dir = common::fixtures();
    let model = dir.join("tiny_gqa");
    let first = dir.join("images/gray_300x200.png");
    let second = dir.join("images/scene_336x336.png");
    let out = generate(
        &[
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Compare the two pictures.",
            "--image",
            first.to_str().unwrap(),
            "--image",
            second.to_str().unwrap(),
            "--max-tokens",
            "16",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!("{}\n", case["greedy"]["text"].as_str().unwrap())
    );
}

#[test]
fn generate_answers_as_hf_on_llava_next_and_the_original_format() {
    // LLaVA-NeXT: two images of different tile grids; the original format: a CLIP tower given by
    // --vision-tower and the template run_llava.py infers from the folder's name.
    let dir = common::fixtures();
    let next = refs("tiny_next_llama");
    let next_case = case(&next, "two_images");
    let original = refs("original");
    let original_case = case(&original, "v15_single");
    let runs = [
        (
            vec![
                "--model".to_owned(),
                dir.join("tiny_next_llama").display().to_string(),
                "--prompt".into(),
                "Compare the two pictures.".into(),
                "--image".into(),
                dir.join("images/gray_300x200.png").display().to_string(),
                "--image".into(),
                dir.join("images/scene_336x336.png").display().to_string(),
                "--max-tokens".into(),
                "16".into(),
            ],
            next_case["greedy"]["text"].as_str().unwrap().to_owned(),
        ),
        (
            vec![
                "--model".to_owned(),
                dir.join("original/llava-v1.5-tiny").display().to_string(),
                "--vision-tower".into(),
                dir.join("original/clip-336").display().to_string(),
                "--prompt".into(),
                original_case["messages"][0]["text"]
                    .as_str()
                    .unwrap()
                    .into(),
                "--image".into(),
                dir.join("images/scene_640x480.png").display().to_string(),
                "--max-tokens".into(),
                "12".into(),
            ],
            original_case["greedy"]["text"].as_str().unwrap().to_owned(),
        ),
    ];
    for (args, want) in runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = generate(&args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The original CLI strips its answer.
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), want.trim());
    }
}

#[test]
fn unreadable_image_fails_cleanly() {
    let bogus = common::fixtures().join("tiny/config.json");
    let out = generate(&["--prompt", "hi", "--image", bogus.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.json") && stderr.contains("not a recognised image format"),
        "{stderr}"
    );
    let out = generate(&["--prompt", "hi", "--image", "/no/such.png"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such.png"));
}

#[test]
fn unreachable_hub_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let out = generate(
        &["--model", "nobody/no-such-model", "--prompt", "hi"],
        &[
            // Port 9 on loopback (discard) refuses connections: the hub is unreachable.
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("HF_HOME", cache.path().to_str().unwrap()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot fetch nobody/no-such-model from the Hugging Face hub"),
        "{stderr}"
    );
}

#[test]
fn dummy_weights_run_and_builtin_shapes_need_the_dummy_format() {
    // Random weights of the tiny fixture's shapes: generation runs end to end.
    let out = generate(
        &[
            "--load-format",
            "dummy",
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8(out.stdout).unwrap().trim().is_empty());
    // A built-in shape name is not a checkpoint.
    let out = generate(&["--model", "llava-1.5-7b", "--prompt", "hi"], &[]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_memory_share_outside_zero_to_one_is_refused() {
    for bad in ["0", "1.5", "-0.2", "most"] {
        let out = Command::new(env!("CARGO_BIN_EXE_llava-server"))
            .args(["serve", &format!("--gpu-memory-utilization={bad}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--gpu-memory-utilization"), "{stderr}");
        assert!(
            stderr.contains("not a share of memory in (0, 1]"),
            "{stderr}"
        );
    }
}
