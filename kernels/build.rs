//! With the `cuda` feature, compiles `src/cuda/*.cu` to PTX with nvcc for `CUDA_COMPUTE_CAP` (default
//! 90: H100/H200); the PTX is embedded in the crate and loaded by candle at first use. Without the
//! feature nothing is built, so CPU builds never need nvcc.

use std::path::PathBuf;
use std::process::Command;

/// Each source and whether it may use fast math. Sampling may not: its draws should match the host's
/// IEEE division and logarithms (a seed gives the same tokens on either path).
const SOURCES: &[(&str, bool)] = &[
    ("elementwise", true),
    ("attention", true),
    ("sampling", false),
];

fn main() {
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .unwrap_or_else(|_| PathBuf::from("nvcc"));
    for &(name, fast_math) in SOURCES {
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17"])
            .args(fast_math.then_some("--use_fast_math"))
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(out.join(format!("{name}.ptx")))
            .arg(format!("src/cuda/{name}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (set CUDA_HOME)", nvcc.display()));
        assert!(status.success(), "nvcc failed on src/cuda/{name}.cu");
    }
}
