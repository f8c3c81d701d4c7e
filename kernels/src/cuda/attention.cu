// Attention over the paged KV cache. The cache is [slots, kv_heads, head_dim]; the slot of position
// `p` of sequence `s` is block_tables[s][p / block_size] * block_size + p % block_size.
//
// One warp per (query, head[, partition]): lanes split head_dim (HEAD_DIM / 32 values each), a warp
// reduction gives each score, and an online softmax accumulates values in registers. Decode splits
// long contexts into partitions of PARTITION tokens across blocks and merges them in a second kernel.
#include "common.cuh"
#include <float.h>

#define PARTITION 512
#define WARPS_PER_BLOCK 4

template <typename T, int HEAD_DIM>
struct Attend {
  static constexpr int PER_LANE = HEAD_DIM / 32;
  float q[PER_LANE];
  float acc[PER_LANE];
  float max_score = -FLT_MAX;
  float sum = 0.f;

  __device__ void load_query(const T* qrow, float scale) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      q[j] = to_float(qrow[lane * PER_LANE + j]) * scale;
      acc[j] = 0.f;
    }
  }

  // Keys/values at positions [begin, end) of one sequence, kv head `kvh`.
  __device__ void run(const T* k_cache, const T* v_cache, const uint32_t* table, int block_size,
                      int kv_heads, int kvh, int begin, int end) {
    const int lane = threadIdx.x & 31;
    for (int pos = begin; pos < end; ++pos) {
      const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
      const size_t base = (slot * kv_heads + kvh) * HEAD_DIM + lane * PER_LANE;
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) dot += q[j] * to_float(k_cache[base + j]);
      const float score = warp_sum(dot);
      const float new_max = fmaxf(max_score, score);
      const float correction = __expf(max_score - new_max);
      const float p = __expf(score - new_max);
      sum = sum * correction + p;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) acc[j] = acc[j] * correction + p * to_float(v_cache[base + j]);
      max_score = new_max;
    }
  }
};

// Prefill (and any multi-token step): query token t of sequence token_seq[t] at position positions[t]
// attends causally to positions 0..=positions[t]. q: [tokens, heads, D]; out: [tokens, heads, D].
template <typename T, int D>
__device__ void prefill(const T* q, const T* k_cache, const T* v_cache, const uint32_t* positions,
                        const uint32_t* token_seq, const uint32_t* block_tables, int max_blocks, T* out,
                        int tokens, int heads, int kv_heads, int block_size, float scale) {
  const int item = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (item >= tokens * heads) return;
  const int token = item / heads, head = item % heads;
  const int kvh = head / (heads / kv_heads);
  Attend<T, D> a;
  a.load_query(q + (size_t)item * D, scale);
  a.run(k_cache, v_cache, block_tables + (size_t)token_seq[token] * max_blocks, block_size, kv_heads, kvh, 0,
        positions[token] + 1);
  const int lane = threadIdx.x & 31;
  const float inv = 1.f / a.sum;
#pragma unroll
  for (int j = 0; j < Attend<T, D>::PER_LANE; ++j)
    out[(size_t)item * D + lane * Attend<T, D>::PER_LANE + j] = from_float<T>(a.acc[j] * inv);
}

// Decode, pass 1: one query per sequence; partition `part` covers [part * PARTITION, ...) of its context.
// Partial results: acc [seqs, heads, parts, D] (unnormalised), max and sum [seqs, heads, parts].
template <typename T, int D>
__device__ void decode_partial(const T* q, const T* k_cache, const T* v_cache, const uint32_t* context_lens,
                               const uint32_t* block_tables, int max_blocks, float* part_acc, float* part_max,
                               float* part_sum, int seqs, int heads, int kv_heads, int block_size, int parts,
                               float scale) {
  const int item = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
  if (item >= seqs * heads * parts) return;
  const int part = item % parts, sh = item / parts;
  const int seq = sh / heads, head = sh % heads;
  const int kvh = head / (heads / kv_heads);
  const int len = context_lens[seq];
  const int begin = part * PARTITION, end = min(len, begin + PARTITION);
  Attend<T, D> a;
  a.load_query(q + (size_t)sh * D, scale);
  if (begin < end)
    a.run(k_cache, v_cache, block_tables + (size_t)seq * max_blocks, block_size, kv_heads, kvh, begin, end);
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < Attend<T, D>::PER_LANE; ++j)
    part_acc[(size_t)item * D + lane * Attend<T, D>::PER_LANE + j] = a.acc[j];
  if (lane == 0) {
    part_max[item] = a.max_score;
    part_sum[item] = a.sum;
  }
}

// Decode, pass 2: merge the partitions of each (sequence, head) with their log-sum-exp weights.
template <typename T, int D>
__device__ void decode_merge(const float* part_acc, const float* part_max, const float* part_sum, T* out,
                             int seqs_heads, int parts) {
  const int sh = blockIdx.x;
  if (sh >= seqs_heads) return;
  float m = -FLT_MAX;
  for (int p = 0; p < parts; ++p) m = fmaxf(m, part_max[sh * parts + p]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int p = 0; p < parts; ++p) {
      const float w = part_sum[sh * parts + p] > 0.f ? __expf(part_max[sh * parts + p] - m) : 0.f;
      num += w * part_acc[((size_t)sh * parts + p) * D + d];
      den += w * part_sum[sh * parts + p];
    }
    out[(size_t)sh * D + d] = from_float<T>(num / den);
  }
}

#define ATTENTION_ENTRY(T, S, D)                                                                          \
  extern "C" __global__ void prefill_attention_##S##_d##D(                                                \
      const T* q, const T* kc, const T* vc, const uint32_t* pos, const uint32_t* seq,                      \
      const uint32_t* tables, int max_blocks, T* out, int tokens, int heads, int kv_heads, int block_size, \
      float scale) {                                                                                      \
    prefill<T, D>(q, kc, vc, pos, seq, tables, max_blocks, out, tokens, heads, kv_heads, block_size, scale); \
  }                                                                                                       \
  extern "C" __global__ void decode_attention_partial_##S##_d##D(                                         \
      const T* q, const T* kc, const T* vc, const uint32_t* lens, const uint32_t* tables, int max_blocks,  \
      float* acc, float* mx, float* sm, int seqs, int heads, int kv_heads, int block_size, int parts,      \
      float scale) {                                                                                      \
    decode_partial<T, D>(q, kc, vc, lens, tables, max_blocks, acc, mx, sm, seqs, heads, kv_heads,          \
                         block_size, parts, scale);                                                       \
  }                                                                                                       \
  extern "C" __global__ void decode_attention_merge_##S##_d##D(const float* acc, const float* mx,          \
                                                               const float* sm, T* out, int sh, int parts) { \
    decode_merge<T, D>(acc, mx, sm, out, sh, parts);                                                      \
  }
#define ATTENTION_DIMS(T, S) ATTENTION_ENTRY(T, S, 64) ATTENTION_ENTRY(T, S, 128)
FOR_EACH_DTYPE(ATTENTION_DIMS)

// KV-cache write: rows of `src` ([tokens, row]) into the cache rows named by `slots`.
template <typename T>
__device__ void write_kv(T* cache, const T* src, const uint32_t* slots, int tokens, int row) {
  const size_t n = (size_t)tokens * row;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t t = i / row, c = i % row;
    cache[(size_t)slots[t] * row + c] = src[i];
  }
}
#define WRITE_ENTRY(T, S)                                                                              \
  extern "C" __global__ void write_kv_##S(T* cache, const T* src, const uint32_t* slots, int tokens,    \
                                          int row) {                                                   \
    write_kv<T>(cache, src, slots, tokens, row);                                                       \
  }
FOR_EACH_DTYPE(WRITE_ENTRY)
