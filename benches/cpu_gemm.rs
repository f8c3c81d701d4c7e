//! `x Wᵀ` for decode-sized row counts on the CPU: `small_gemm` beside candle's matmul (the `gemm`
//! crate), on the mid checkpoint's decoder shapes, f32. Prints ms per call and the weight-read rate;
//! the server sends at most `small_gemm::max_rows()` rows this way (where it is ahead).
//!   cargo bench --bench cpu_gemm
//!   cargo bench --bench cpu_gemm -- --read-floor   (only the read bandwidth, for cpu_side_by_side.py)
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

/// Sum of `xs` with eight independent 16-lane accumulators: as fast a pure read as we can write.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let blocks = xs.chunks_exact(128);
    let tail: f32 = blocks.remainder().iter().sum();
    for block in blocks {
        for (a, lane) in acc.iter_mut().zip(block.chunks_exact(16)) {
            *a = _mm512_add_ps(*a, _mm512_loadu_ps(lane.as_ptr()));
        }
    }
    acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum::<f32>() + tail
}

/// Bytes per second this machine reads from memory, over 1 GiB (far beyond the caches) split across
/// the thread pool: the best of five passes of an AVX-512 sum (torch's threaded sum where there is no
/// AVX-512 is the script's other measure). The decode weight-read floor is weights ÷ this.
fn read_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let xs = vec![1f32; 1 << 28];
    let per_thread = xs.len() / rayon::current_num_threads();
    let seconds = best_of(5, || {
        let total: f32 = xs
            .par_chunks(per_thread)
            .map(|c| {
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F checked just above.
                    return unsafe { sum_avx512(c) };
                }
                c.iter().sum()
            })
            .sum();
        std::hint::black_box(total);
    });
    (xs.len() * 4) as f64 / seconds / 1e9
}

fn main() {
    llava_server::model::fix_cpu_thread_count();
    if std::env::args().any(|a| a == "--read-floor") {
        println!("read bandwidth {:.1} GB/s", read_bandwidth_gbs());
        return;
    }
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
    println!(
        "\nread bandwidth (AVX-512 sum over 1 GiB, {} threads): {:.1} GB/s",
        rayon::current_num_threads(),
        read_bandwidth_gbs()
    );
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
