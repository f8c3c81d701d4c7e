//! `x Wᵀ` for decode-sized row counts on the CPU: `small_gemm` beside candle's matmul (the `gemm`
//! crate), on the mid checkpoint's decoder shapes, f32. Prints ms per call and the weight-read rate;
//! the server sends at most `small_gemm::max_rows()` rows this way (where it is ahead).
//!   cargo bench --bench cpu_gemm
//!   cargo bench --bench cpu_gemm -- --read-floor   (the read bandwidth and the FMA peak, for
//!                                                    cpu_side_by_side.py's floors)
//!   cargo bench --bench cpu_gemm -- --stream       (one-row GEMV from memory against the read floor)
//!   cargo bench --bench cpu_gemm -- --packed       (the packed panels beside small_gemm, per shape)
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
        println!("fma peak {:.1} GFLOP/s", fma_peak_gflops());
        return;
    }
    if std::env::args().any(|a| a == "--stream") {
        streaming_gemv();
        return;
    }
    if std::env::args().any(|a| a == "--packed") {
        packed_beside_small_gemm();
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

/// One activation row against 1 GiB of weights in the decoder's shapes, from memory as in decode (the
/// set is 30× L3): the packed panels the server uses on AVX-512 and `small_gemm`, interleaved with the
/// read floor, so each round compares all three at one moment of the host.
fn streaming_gemv() {
    use llava_server::model::packed_gemm::PackedWeight;
    let shapes = [
        (3072usize, 1024usize),
        (1024, 1024),
        (5632, 1024),
        (1024, 2816),
    ];
    let per_set: usize = shapes.iter().map(|(n, k)| n * k).sum();
    let sets = (1usize << 28) / per_set;
    let dev = Device::Cpu;
    let ws: Vec<Vec<Vec<f32>>> = (0..sets)
        .map(|s| {
            shapes
                .iter()
                .map(|&(n, k)| (0..n * k).map(|i| ((i + s) % 97) as f32 * 1e-3).collect())
                .collect()
        })
        .collect();
    let packed: Vec<Vec<PackedWeight>> = ws
        .iter()
        .map(|set| {
            set.iter()
                .zip(&shapes)
                .map(|(w, &shape)| {
                    let t = Tensor::from_slice(w, shape, &dev).unwrap();
                    PackedWeight::pack(&t)
                        .unwrap()
                        .expect("AVX-512 and the CPU kernels")
                })
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..2816).map(|i| (i % 13) as f32 * 0.1).collect();
    let xs: Vec<Tensor> = shapes
        .iter()
        .map(|&(_, k)| Tensor::from_slice(&x[..k], (1, k), &dev).unwrap())
        .collect();
    let bytes = (sets * per_set * 4) as f64;
    let (mut to_packed, mut to_rows) = (vec![], vec![]);
    for round in 0..5 {
        let panels = best_of(3, || {
            for set in &packed {
                for (w, x) in set.iter().zip(&xs) {
                    std::hint::black_box(w.matmul(x).unwrap());
                }
            }
        });
        let rows = best_of(3, || {
            for set in &ws {
                for (w, &(n, k)) in set.iter().zip(&shapes) {
                    std::hint::black_box(small_gemm::matmul_transposed(&x[..k], w, 1, n, k));
                }
            }
        });
        let floor = read_bandwidth_gbs();
        let (panels, rows) = (bytes / panels / 1e9, bytes / rows / 1e9);
        to_packed.push(panels / floor);
        to_rows.push(rows / floor);
        println!(
            "round {round}: one row, packed panels {panels:.1} GB/s, small_gemm {rows:.1} GB/s; \
             read floor {floor:.1} GB/s"
        );
    }
    to_packed.sort_by(f64::total_cmp);
    to_rows.sort_by(f64::total_cmp);
    println!(
        "median: packed panels at {:.0}% of the read floor, small_gemm at {:.0}%",
        to_packed[2] * 100.0,
        to_rows[2] * 100.0
    );
}

/// Peak f32 multiply-add rate of the pool: every thread runs twelve independent 16-lane FMA chains
/// (enough to cover the latency), best of 5; the compute floor of a many-row decode step.
fn fma_peak_gflops() -> f64 {
    use rayon::prelude::*;
    const STEPS: usize = 20_000_000;
    let threads = rayon::current_num_threads();
    let seconds = best_of(5, || {
        let total: f32 = (0..threads)
            .into_par_iter()
            .map(|_| {
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F checked just above.
                    return unsafe { fma_chains(STEPS) };
                }
                0.0
            })
            .sum();
        std::hint::black_box(total);
    });
    (threads * STEPS * 12 * 16 * 2) as f64 / seconds / 1e9
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains(steps: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc: [__m512; 12] = std::array::from_fn(|i| _mm512_set1_ps(i as f32 * 1e-3));
    let (a, b) = (
        _mm512_set1_ps(std::hint::black_box(0.999)),
        _mm512_set1_ps(std::hint::black_box(1e-4)),
    );
    for _ in 0..steps {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    acc.iter().map(|c| _mm512_reduce_add_ps(*c)).sum()
}

/// The packed panels the server uses on AVX-512 (`packed_gemm`) beside `small_gemm`'s tiles over the
/// `[out, in]` rows, per decoder shape at decode and prefill row counts, interleaved (the host's speed
/// moves within seconds). The weights stay in L3 between calls here: this is the arithmetic, not the
/// memory (`--stream` is the memory).
fn packed_beside_small_gemm() {
    use llava_server::model::packed_gemm::PackedWeight;
    let dev = Device::Cpu;
    let shapes = [
        (3072usize, 1024usize),
        (5632, 1024),
        (1024, 2816),
        (32064, 1024),
    ];
    println!("| n × k | rows | small_gemm GFLOP/s | packed panels GFLOP/s | panels / small_gemm |");
    println!("|---|---|---|---|---|");
    for (n, k) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let ws = flat(&w);
        let packed = PackedWeight::pack(&w)
            .unwrap()
            .expect("AVX-512 and the CPU kernels");
        for m in [8usize, 16, 32, 600] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let xs = flat(&x);
            let (a, b) = (
                small_gemm::matmul_transposed(&xs, &ws, m, n, k),
                flat(&packed.matmul(&x).unwrap()),
            );
            let diff = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-3, "{n}×{k} m={m}: results differ by {diff}");
            // Best of 3 interleaved rounds of 5 each.
            let (mut rows, mut panels) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                rows = rows.min(best_of(5, || {
                    std::hint::black_box(small_gemm::matmul_transposed(&xs, &ws, m, n, k));
                }));
                panels = panels.min(best_of(5, || {
                    std::hint::black_box(packed.matmul(&x).unwrap());
                }));
            }
            let flops = 2.0 * (n * m * k) as f64;
            println!(
                "| {n} × {k} | {m} | {:.0} | {:.0} | {:.2}× |",
                flops / rows / 1e9,
                flops / panels / 1e9,
                rows / panels
            );
        }
    }
    println!("\nFMA peak of the pool: {:.0} GFLOP/s", fma_peak_gflops());
}
