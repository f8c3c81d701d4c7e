//! What the CPU kernels share: the switch that turns them on, the instruction-set checks, and access
//! to a tensor's f32 elements where they lie.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// Whether the CPU kernels (`small_gemm`, `decode_attention`, `cpu_attention`, `cpu_math`) are used
/// (read once). `LLAVA_SERVER_CPU_DECODE_KERNELS=off` (named when only decode had kernels) restores
/// candle's ops: its matmul, composed softmax and activations, the gathering attention, so that
/// benchmarks can compare both in one build; `=on` forces them. Unset: on in optimised builds, off in
/// debug builds, where these loops are compiled without optimisation (our crate is `opt-level` 0 in
/// `dev`) and would be slower than candle's optimised GEMM; tests that cover them set `on`.
pub fn cpu_kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var("LLAVA_SERVER_CPU_DECODE_KERNELS") {
        Ok(v) => v != "off",
        Err(_) => !cfg!(debug_assertions),
    })
}

/// The contiguous f32 elements of a CPU tensor, from its layout's offset.
pub(crate) fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(data)) if layout.is_contiguous() => {
            Some(&data[layout.start_offset()..][..layout.shape().elem_count()])
        }
        _ => None,
    }
}

/// Calls `f` with the contiguous f32 elements of three CPU tensors (queries, keys, values), holding
/// their storage while it runs; `Ok(None)` when any of them is not one (callers fall back to candle).
pub(crate) fn with_f32_slices<R>(
    tensors: [&Tensor; 3],
    f: impl FnOnce(&[f32], &[f32], &[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<Option<R>> {
    let [a, b, c] = tensors.map(|t| t.storage_and_layout());
    match (
        f32_slice(&a.0, a.1),
        f32_slice(&b.0, b.1),
        f32_slice(&c.0, c.1),
    ) {
        (Some(q), Some(k), Some(v)) => f(q, k, v).map(Some),
        _ => Ok(None),
    }
}

/// Whether the CPU runs the AVX2 + FMA (+ F16C) kernels.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU runs the AVX-512 kernels (`small_gemm::rows_avx512`).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
