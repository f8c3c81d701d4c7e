//! The dependency rule of DESIGN.md, checked on the sources: `model` and `scheduler` know nothing of
//! HTTP or async (axum, utoipa, tokio, `crate::api`), and never import each other.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn module_dir(module: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src")
        .join(module)
}

/// Lines of code (comments stripped) under `dir` that mention any of `needles`.
fn offending_lines(dir: &Path, needles: &[&str]) -> Vec<String> {
    let files = rust_files(dir);
    assert!(!files.is_empty(), "{} has no sources", dir.display());
    let mut hits = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            for needle in needles {
                if code.contains(needle) {
                    hits.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    hits
}

const SERVING_STACK: &[&str] = &["axum", "utoipa", "tokio", "crate::api", "super::api"];

#[test]
fn model_knows_nothing_of_serving_or_scheduling() {
    let mut needles = SERVING_STACK.to_vec();
    needles.extend(["crate::scheduler", "crate::engine", "crate::frontend"]);
    let hits = offending_lines(&module_dir("model"), &needles);
    assert!(
        hits.is_empty(),
        "model crosses a layer:\n{}",
        hits.join("\n")
    );
}

#[test]
fn scheduler_knows_nothing_of_serving_or_the_model() {
    let mut needles = SERVING_STACK.to_vec();
    needles.extend(["crate::model", "candle", "crate::engine", "crate::frontend"]);
    let hits = offending_lines(&module_dir("scheduler"), &needles);
    assert!(
        hits.is_empty(),
        "scheduler crosses a layer:\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_checker_sees_a_violation_but_not_a_comment() {
    // Guard against a checker that can never fail.
    let dir = std::env::temp_dir().join(format!("layering-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    std::fs::write(dir.join("a.rs"), "// axum is mentioned in a comment only\n").unwrap();
    std::fs::write(dir.join("nested/b.rs"), "use crate::model::LlavaModel;\n").unwrap();
    assert!(offending_lines(&dir, &["axum"]).is_empty());
    assert_eq!(offending_lines(&dir, &["crate::model"]).len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
