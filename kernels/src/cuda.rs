//! CUDA sides of the custom ops: the PTX that `build.rs` made, loaded once per device by candle, and
//! one launch per op (two for partitioned decode attention).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use crate::ops::{decode_split, strided_rows, AddRmsNorm, PagedAttention, Queries, RotaryQk};

const ELEMENTWISE: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
const ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const SAMPLING: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
/// Must match `SAMPLE_THREADS` in sampling.cu.
const SAMPLE_THREADS: u32 = 256;
/// Must match `WARPS_PER_BLOCK` and `TILE_THREADS` in attention.cu.
const WARPS_PER_BLOCK: u32 = 4;
const TILE_THREADS: u32 = 128;

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("kernels take f32, f16 or bf16, not {other:?}"),
    })
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel inputs must be contiguous".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// Runs `$body` with `$T` bound to the Rust element type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => bail!("kernels take f32, f16 or bf16, not {other:?}"),
        }
    };
}

fn grid_for(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A u32 metadata tensor's device view.
fn with_u32<R>(t: &Tensor, f: impl FnOnce(CudaView<'_, u32>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(view::<u32>(s, layout)?),
        _ => bail!("kernel metadata must be on the GPU"),
    }
}

pub(crate) fn add_rms_norm(
    op: &AddRmsNorm,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device.clone();
    let (rows, dim) = l1.shape().dims2()?;
    if rows == 0 {
        return Ok((s1.try_clone(l1)?, Shape::from((0, dim))));
    }
    let func = dev.get_or_load_custom_func(
        &format!("add_rms_norm_{}", suffix(s1.dtype())?),
        "llava_elementwise",
        ELEMENTWISE,
    )?;
    by_dtype!(s1.dtype(), T => {
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(2 * rows * dim)? };
        let (x, r, w) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&r);
        b.arg(&w);
        b.arg(&out);
        candle_core::builder_arg!(b, rows as i32, dim as i32, op.eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: ((dim.div_ceil(32) * 32).min(1024) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches add_rms_norm_* in elementwise.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2 * rows, dim))))
    })
}

pub(crate) fn silu_mul(
    s1: &CudaStorage,
    l1: &Layout,
    rows: usize,
    cols: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device.clone();
    let func = dev.get_or_load_custom_func(
        &format!("silu_mul_{}", suffix(s1.dtype())?),
        "llava_elementwise",
        ELEMENTWISE,
    )?;
    by_dtype!(s1.dtype(), T => {
        let out: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * cols)? };
        let gate_up = view::<T>(s1, l1)?;
        let mut b = func.builder();
        b.arg(&gate_up);
        b.arg(&out);
        candle_core::builder_arg!(b, rows, cols as i32);
        // SAFETY: argument list matches silu_mul_* in elementwise.cu.
        unsafe { b.launch(grid_for(rows * cols)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, cols))))
    })
}

pub(crate) fn rotary_qk(
    op: &RotaryQk,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    tokens: usize,
    dim: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device.clone();
    let heads = op.q_heads + op.kv_heads;
    let func = dev.get_or_load_custom_func(
        &format!("rotary_qk_{}", suffix(s1.dtype())?),
        "llava_elementwise",
        ELEMENTWISE,
    )?;
    with_u32(&op.positions, |positions| {
        by_dtype!(s1.dtype(), T => {
            let len = tokens * heads * dim;
            let out: CudaSlice<T> = unsafe { dev.alloc::<T>(len)? };
            let (qkv, table) = (view::<T>(s1, l1)?, view::<f32>(s2, l2)?);
            let mut b = func.builder();
            b.arg(&qkv);
            b.arg(&table);
            b.arg(&positions);
            b.arg(&out);
            candle_core::builder_arg!(
                b,
                tokens as i32,
                op.q_heads as i32,
                op.kv_heads as i32,
                dim as i32
            );
            // SAFETY: argument list matches rotary_qk_* in elementwise.cu.
            unsafe { b.launch(grid_for(len / 2)) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(len)))
        })
    })
}

pub(crate) fn write_kv(
    s1: &mut CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<()> {
    let dev = s1.device.clone();
    let row = l1.shape().dims2()?.1;
    let rows = strided_rows(l2, row)?;
    let func = dev.get_or_load_custom_func(
        &format!("write_kv_{}", suffix(s1.dtype())?),
        "llava_attention",
        ATTENTION,
    )?;
    let slots = view::<u32>(s3, l3)?;
    by_dtype!(s1.dtype(), T => {
        let src = s2.as_cuda_slice::<T>()?.slice(rows.start..);
        let start = l1.start_offset();
        let cache = s1.as_cuda_slice_mut::<T>()?;
        let mut cache = cache.slice_mut(start..);
        let mut b = func.builder();
        b.arg(&mut cache);
        b.arg(&src);
        b.arg(&slots);
        candle_core::builder_arg!(b, rows.rows as i32, row as i32, rows.stride as i32);
        // SAFETY: argument list matches write_kv_* in attention.cu; slots index inside the cache, and
        // the last source row ends inside `src` (`strided_rows` read it from a valid layout).
        unsafe { b.launch(grid_for(rows.rows * row)) }.w()?;
        Ok(())
    })
}

pub(crate) fn sample_rows(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    rows: usize,
    vocab: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device.clone();
    let out: CudaSlice<u32> = unsafe { dev.alloc::<u32>(rows)? };
    if rows == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(0)));
    }
    let func = dev.get_or_load_custom_func("sample_rows", "llava_sampling", SAMPLING)?;
    let (logits, params) = (view::<f32>(s1, l1)?, view::<u32>(s2, l2)?);
    let mut b = func.builder();
    b.arg(&logits);
    b.arg(&params);
    b.arg(&out);
    candle_core::builder_arg!(b, rows as i32, vocab as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches sample_rows in sampling.cu.
    unsafe { b.launch(cfg) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}

pub(crate) fn upload_u32(
    s: &mut CudaStorage,
    range: std::ops::Range<usize>,
    data: &[u32],
) -> Result<()> {
    let stream = s.device.cuda_stream();
    let slice = s.as_cuda_slice_mut::<u32>()?;
    let mut dst = slice.slice_mut(range);
    // Stream-ordered after whatever read the buffer before, so an in-flight step is never overwritten.
    stream.memcpy_htod(data, &mut dst).w()
}

pub(crate) fn paged_attention(
    op: &PagedAttention,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device.clone();
    let (n, heads, dim) = l1.shape().dims3()?;
    if dim != 64 && dim != 128 {
        bail!("paged attention kernels exist for head dims 64 and 128, not {dim}");
    }
    let sfx = suffix(s1.dtype())?;
    let max_blocks = op.paged.block_tables.dim(1)? as i32;
    let (kv_heads, block_size) = (op.paged.num_kv_heads as i32, op.paged.block_size as i32);
    // One block per (query, head[, partition]); its warps share the positions.
    let blocks = |items: usize| LaunchConfig {
        grid_dim: (items as u32, 1, 1),
        block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    with_u32(&op.paged.block_tables, |tables| {
        by_dtype!(s1.dtype(), T => {
            let (q, kc, vc) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
            let out: CudaSlice<T> = unsafe { dev.alloc::<T>(n * heads * dim)? };
            if n == 0 {
                return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l1.shape().clone()));
            }
            match &op.queries {
                Queries::Prefill { positions, token_seq, work } => with_u32(positions, |positions| {
                    with_u32(token_seq, |token_seq| {
                        // Both prefill kernels take the same arguments: an index list (tile starts or
                        // single queries) and how many tokens respectively singles there are.
                        let launch = |kernel: &str, index: &Tensor, count: usize, cfg: LaunchConfig| {
                            with_u32(index, |index| {
                                let func = dev.get_or_load_custom_func(&format!("{kernel}_{sfx}_d{dim}"), "llava_attention", ATTENTION)?;
                                let mut b = func.builder();
                                b.arg(&q);
                                b.arg(&kc);
                                b.arg(&vc);
                                b.arg(&positions);
                                b.arg(&token_seq);
                                b.arg(&index);
                                b.arg(&tables);
                                candle_core::builder_arg!(b, max_blocks);
                                b.arg(&out);
                                candle_core::builder_arg!(b, count as i32, heads as i32, kv_heads, block_size, op.scale);
                                // SAFETY: argument list matches prefill_attention_* and
                                // single_query_attention_* in attention.cu; indices lie inside the batch.
                                unsafe { b.launch(cfg) }.w()?;
                                Ok(())
                            })
                        };
                        let (tiles, singles) = (work.tiles.dim(0)?, work.singles.dim(0)?);
                        if tiles > 0 {
                            let cfg = LaunchConfig {
                                grid_dim: (tiles as u32, heads as u32, 1),
                                block_dim: (TILE_THREADS, 1, 1),
                                shared_mem_bytes: 0,
                            };
                            launch("prefill_attention", &work.tiles, n, cfg)?;
                        }
                        if singles > 0 {
                            launch("single_query_attention", &work.singles, singles, blocks(singles * heads))?;
                        }
                        Ok(())
                    })
                })?,
                Queries::Decode { context_lens, max_context } => with_u32(context_lens, |lens| {
                    let (parts, part_len) = decode_split(*max_context, n * heads);
                    let items = n * heads * parts;
                    let acc: CudaSlice<f32> = unsafe { dev.alloc::<f32>(items * dim)? };
                    let mx: CudaSlice<f32> = unsafe { dev.alloc::<f32>(items)? };
                    let sm: CudaSlice<f32> = unsafe { dev.alloc::<f32>(items)? };
                    let partial = dev.get_or_load_custom_func(&format!("decode_attention_partial_{sfx}_d{dim}"), "llava_attention", ATTENTION)?;
                    let mut b = partial.builder();
                    b.arg(&q);
                    b.arg(&kc);
                    b.arg(&vc);
                    b.arg(&lens);
                    b.arg(&tables);
                    candle_core::builder_arg!(b, max_blocks);
                    b.arg(&acc);
                    b.arg(&mx);
                    b.arg(&sm);
                    candle_core::builder_arg!(b, n as i32, heads as i32, kv_heads, block_size, parts as i32, part_len as i32, op.scale);
                    // SAFETY: argument list matches decode_attention_partial_* in attention.cu.
                    unsafe { b.launch(blocks(items)) }.w()?;
                    let merge = dev.get_or_load_custom_func(&format!("decode_attention_merge_{sfx}_d{dim}"), "llava_attention", ATTENTION)?;
                    let mut b = merge.builder();
                    b.arg(&acc);
                    b.arg(&mx);
                    b.arg(&sm);
                    b.arg(&out);
                    candle_core::builder_arg!(b, (n * heads) as i32, parts as i32);
                    let cfg = LaunchConfig {
                        grid_dim: ((n * heads) as u32, 1, 1),
                        block_dim: (dim as u32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: argument list matches decode_attention_merge_* in attention.cu.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(())
                })?,
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l1.shape().clone()))
        })
    })
}
