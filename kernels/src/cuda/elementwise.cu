// Fused elementwise kernels of the decoder layer: residual add + RMSNorm, SiLU(gate)·up over the merged
// gate/up projection, and the rotary embedding of the q and k heads of the merged qkv projection at
// explicit positions. One launch each where candle needs several ops (and copies to split the merges).
#include "common.cuh"

// out[0:rows] = rmsnorm(x + residual) * weight, out[rows:2rows] = x + residual (the new residual).
// The sum is rounded to T first, as HF adds in the model dtype before normalising in f32.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* residual, const T* weight, T* out, int rows,
                             int dim, float eps) {
  const int row = blockIdx.x;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * dim;
  const T* rr = residual + (size_t)row * dim;
  T* normed = out + (size_t)row * dim;
  T* summed = out + ((size_t)rows + row) * dim;
  float squares = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const T s = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    summed[i] = s;
    const float f = to_float(s);
    squares += f * f;
  }
  const float inv = rsqrtf(block_sum(squares) / dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    normed[i] = from_float<T>(to_float(weight[i]) * to_float(from_float<T>(to_float(summed[i]) * inv)));
  }
}

// gate_up: [rows, 2·cols], each row the gate then the up projection; out: [rows, cols].
template <typename T>
__device__ void silu_mul(const T* gate_up, T* out, size_t rows, int cols) {
  const size_t n = rows * cols;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const T* row = gate_up + (i / cols) * 2 * cols;
    const int c = i % cols;
    const float g = to_float(row[c]);
    out[i] = from_float<T>(g / (1.f + __expf(-g)) * to_float(row[cols + c]));
  }
}

// qkv: [tokens, (q_heads + 2·kv_heads)·dim], each row the q, k and v heads. Rotates the q and k heads
// at positions[token] with table ([max_positions, dim] f32, cos then sin; HF's rotate-half pairs
// (i, i + dim/2)). out: q as [tokens, q_heads, dim], then k as [tokens, kv_heads, dim].
template <typename T>
__device__ void rotary_qk(const T* qkv, const float* table, const uint32_t* positions, T* out, int tokens,
                          int q_heads, int kv_heads, int dim) {
  const int half = dim / 2, heads = q_heads + kv_heads;
  const size_t row = (size_t)(q_heads + 2 * kv_heads) * dim;
  const size_t pairs = (size_t)tokens * heads * half;
  for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
    const int i = p % half;
    const size_t th = p / half;
    const int token = th / heads, head = th % heads;
    const float* angles = table + (size_t)positions[token] * dim;
    const float c = angles[i], s = angles[half + i];
    const T* x = qkv + token * row + (size_t)head * dim;
    T* o = head < q_heads
               ? out + ((size_t)token * q_heads + head) * dim
               : out + (size_t)tokens * q_heads * dim + ((size_t)token * kv_heads + head - q_heads) * dim;
    const float a = to_float(x[i]), b = to_float(x[half + i]);
    o[i] = from_float<T>(a * c - b * s);
    o[half + i] = from_float<T>(b * c + a * s);
  }
}

#define ENTRY(T, S)                                                                                   \
  extern "C" __global__ void add_rms_norm_##S(const T* x, const T* r, const T* w, T* out, int rows,   \
                                              int dim, float eps) {                                   \
    add_rms_norm<T>(x, r, w, out, rows, dim, eps);                                                    \
  }                                                                                                   \
  extern "C" __global__ void silu_mul_##S(const T* gate_up, T* out, size_t rows, int cols) {          \
    silu_mul<T>(gate_up, out, rows, cols);                                                            \
  }                                                                                                   \
  extern "C" __global__ void rotary_qk_##S(const T* qkv, const float* table, const uint32_t* pos,      \
                                           T* out, int tokens, int q_heads, int kv_heads, int dim) {  \
    rotary_qk<T>(qkv, table, pos, out, tokens, q_heads, kv_heads, dim);                               \
  }
FOR_EACH_DTYPE(ENTRY)
