//! `x Wᵀ` for decode-sized row counts on the CPU: `small_gemm` beside candle's matmul (the `gemm`
//! crate), on the mid checkpoint's decoder shapes, f32. Prints ms per call and the weight-read rate;
//! the server sends at most `small_gemm::max_rows()` rows this way (where it is ahead).
//!   cargo bench --bench cpu_gemm
use std::time::Instant;

use candle_core::{Device, Tensor};
use llava_server::model::small_gemm;

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn main() {
    llava_server::model::fix_cpu_thread_count();
    let dev = Device::Cpu;
    // (name, out, in): the mid decoder's merged qkv, merged gate/up, down and lm_head.
    let shapes = [
        ("qkv 1024→3072", 3072, 1024),
        ("gate_up 1024→5632", 5632, 1024),
        ("down 2816→1024", 1024, 2816),
        ("lm_head 1024→32064", 32064, 1024),
    ];
    println!(
        "| shape | rows | candle matmul ms | small_gemm ms | speed-up | small_gemm weight GB/s |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, n, k) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        for m in [1usize, 2, 4, 8, 12, 16, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let runs = 20;
            let (xs, ws) = (flat(&x), flat(&w));
            let gemm = best_of(runs, || {
                x.matmul(&w.t().unwrap()).unwrap();
            });
            let ours = best_of(runs, || {
                small_gemm::matmul_transposed(&xs, &ws, m, n, k);
            });
            let want = flat(&x.matmul(&w.t().unwrap()).unwrap());
            let got = small_gemm::matmul_transposed(&xs, &ws, m, n, k);
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-3, "{name} m={m}: results differ by {diff}");
            println!(
                "| {name} | {m} | {:.3} | {:.3} | {:.2}× | {:.1} |",
                gemm * 1e3,
                ours * 1e3,
                gemm / ours,
                (n * k * 4) as f64 / ours / 1e9
            );
        }
    }
    // Prefill and CLIP sizes, where candle's GEMM does the work: its rate bounds TTFT.
    let prefill = [
        ("qkv 1024→3072", 3072, 1024),
        ("gate_up 1024→5632", 5632, 1024),
        ("down 2816→1024", 1024, 2816),
        ("CLIP fc1 768→3072", 3072, 768),
    ];
    println!();
    println!("| shape | rows | candle matmul ms | GFLOP/s |");
    println!("|---|---|---|---|");
    for (name, n, k) in prefill {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let m = 600;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let t = best_of(5, || {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        let gflops = 2.0 * (m * n * k) as f64 / t / 1e9;
        println!("| {name} | {m} | {:.2} | {gflops:.0} |", t * 1e3);
    }
}
