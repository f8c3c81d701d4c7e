// Fused elementwise kernels of the decoder layer: residual add + RMSNorm, SiLU(gate)·up, and the
// rotary embedding at explicit positions. One launch each where candle needs several ops.
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

template <typename T>
__device__ void silu_mul(const T* gate, const T* up, T* out, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g / (1.f + __expf(-g)) * to_float(up[i]));
  }
}

// x: [tokens, heads, dim]; table: [max_positions, dim] f32 holding cos (first half) then sin.
// HF's rotate-half layout: pairs (i, i + dim/2).
template <typename T>
__device__ void rotary(const T* x, const float* table, const uint32_t* positions, T* out, int tokens,
                       int heads, int dim) {
  const int half = dim / 2;
  const size_t pairs = (size_t)tokens * heads * half;
  for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
    const int i = p % half;
    const size_t th = p / half;
    const int token = th / heads;
    const float* row = table + (size_t)positions[token] * dim;
    const float c = row[i], s = row[half + i];
    const size_t base = th * dim;
    const float a = to_float(x[base + i]), b = to_float(x[base + half + i]);
    out[base + i] = from_float<T>(a * c - b * s);
    out[base + half + i] = from_float<T>(b * c + a * s);
  }
}

#define ENTRY(T, S)                                                                                   \
  extern "C" __global__ void add_rms_norm_##S(const T* x, const T* r, const T* w, T* out, int rows,   \
                                              int dim, float eps) {                                   \
    add_rms_norm<T>(x, r, w, out, rows, dim, eps);                                                    \
  }                                                                                                   \
  extern "C" __global__ void silu_mul_##S(const T* g, const T* u, T* out, size_t n) {                 \
    silu_mul<T>(g, u, out, n);                                                                        \
  }                                                                                                   \
  extern "C" __global__ void rotary_##S(const T* x, const float* table, const uint32_t* pos, T* out,   \
                                        int tokens, int heads, int dim) {                             \
    rotary<T>(x, table, pos, out, tokens, heads, dim);                                                \
  }
FOR_EACH_DTYPE(ENTRY)
