//! The paged KV cache: per layer one preallocated pool of `num_blocks × block_size` slots for keys and
//! one for values. Which slots a sequence owns is the scheduler's business; the model only writes the
//! slots it is told to and reads back through block tables. One block more than the pool hands out is
//! allocated: the scratch block, where the padding rows of fixed-shape decode steps write their K/V.

use candle_core::{DType, Device, Tensor};

/// Shape of the pool, decided once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Slots allocated per layer: the pool's blocks plus the scratch block.
    pub fn num_slots(&self) -> usize {
        (self.num_blocks + 1) * self.block_size
    }

    /// The block no sequence ever owns (the scheduler's pool ids stop before it).
    pub fn scratch_block(&self) -> u32 {
        self.num_blocks as u32
    }

    /// Bytes of keys plus values for one token across all layers.
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

/// Keys and values of every layer, each `[num_slots, num_kv_heads * head_dim]`.
pub struct KvCache {
    pub shape: KvCacheShape,
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new(shape: KvCacheShape, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let row = shape.num_kv_heads * shape.head_dim;
        let pool = || committed_zeros((shape.num_slots(), row), dtype, device);
        let layers = (0..shape.num_layers)
            .map(|_| Ok((pool()?, pool()?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { shape, layers })
    }

    pub fn layer(&self, index: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[index];
        (k, v)
    }
}

/// Zeros whose memory is written once now. On the CPU `Tensor::zeros` is calloc: the OS backs a page
/// only when it is first written, so an untouched pool made the server's RSS creep up for as long as
/// the prefix cache's LRU kept reaching blocks never used before — growth that looked like a leak
/// under load. Writing the pool at load commits it, and RSS shows the true size from the start.
fn committed_zeros(
    shape: (usize, usize),
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let lazy = Tensor::zeros(shape, dtype, device)?;
    if !device.is_cpu() {
        return Ok(lazy);
    }
    // An elementwise map writes every element into a fresh buffer; the calloc'd one, never
    // touched, is returned to the OS untouched.
    lazy.affine(1.0, 0.0)
}
