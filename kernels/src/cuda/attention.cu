// Attention over the paged KV cache. The cache is [slots, kv_heads, head_dim]; the slot of position
// `p` of sequence `s` is block_tables[s][p / block_size] * block_size + p % block_size.
//
// Prompts (several queries of one sequence) go through `prefill_tiled`, below. Otherwise one block of
// 4 warps per (query, head[, partition]). Each warp splits into 4 groups of 8 lanes and
// each group reads one position at a time (a lane holds HEAD_DIM / 8 values), so 16 positions are in
// flight per block: a lone decode query is not left waiting on one load after another. Every group
// keeps an online softmax; the block merges the 16 states at the end. Decode splits long contexts
// into partitions across blocks and merges those in a second kernel.
#include "common.cuh"
#include <float.h>
#include <mma.h>
#include <type_traits>

#define WARPS_PER_BLOCK 4
#define GROUP_LANES 8
#define GROUPS (32 / GROUP_LANES)
#define STREAMS (WARPS_PER_BLOCK * GROUPS)

template <typename T, int HEAD_DIM>
struct Attend {
  static constexpr int PER_LANE = HEAD_DIM / GROUP_LANES;
  float q[PER_LANE];
  float acc[PER_LANE];
  float max_score = -FLT_MAX;
  float sum = 0.f;

  __device__ static int sub() { return threadIdx.x & (GROUP_LANES - 1); }
  __device__ static int group() { return (threadIdx.x & 31) / GROUP_LANES; }
  __device__ static int warp() { return threadIdx.x >> 5; }

  __device__ void load_query(const T* qrow, float scale) {
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      q[j] = to_float(qrow[sub() * PER_LANE + j]) * scale;
      acc[j] = 0.f;
    }
  }

  // Keys/values at positions [begin, end) of one sequence, kv head `kvh`. Group g of warp w takes
  // positions begin + w * GROUPS + g, then every STREAMS-th. The loop bound depends on the warp only,
  // so every lane reaches the shuffles; a group past the end just skips its update.
  __device__ void run(const T* k_cache, const T* v_cache, const uint32_t* table, int block_size,
                      int kv_heads, int kvh, int begin, int end) {
    for (int first = begin + warp() * GROUPS; first < end; first += STREAMS) {
      const int pos = first + group();
      const bool valid = pos < end;
      size_t base = 0;
      float dot = 0.f;
      if (valid) {
        const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        base = (slot * kv_heads + kvh) * HEAD_DIM + sub() * PER_LANE;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) dot += q[j] * to_float(k_cache[base + j]);
      }
#pragma unroll
      for (int o = GROUP_LANES / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (valid) {
        const float new_max = fmaxf(max_score, dot);
        const float correction = __expf(max_score - new_max);
        const float p = __expf(dot - new_max);
        sum = sum * correction + p;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) acc[j] = acc[j] * correction + p * to_float(v_cache[base + j]);
        max_score = new_max;
      }
    }
  }

  // Merges the block's STREAMS states. Afterwards thread d < HEAD_DIM finds the block's softmax
  // numerator for dim d (relative to the block max) with `numerator(d)`, and the block max and
  // denominator in `block_max` / `block_sum`. Every thread of the block must call it.
  float* s_acc;
  float* s_max;
  float* s_sum;
  float block_max = -FLT_MAX;
  float block_den = 0.f;

  __device__ void merge(float* shared_acc, float* shared_max, float* shared_sum) {
    s_acc = shared_acc;
    s_max = shared_max;
    s_sum = shared_sum;
    // The warp's 4 groups: lanes with the same `sub` hold the same dims (xor 8 and 16 keep `sub`).
    float m = max_score;
#pragma unroll
    for (int o = GROUP_LANES; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float f = __expf(max_score - m);
    float s = sum * f;
#pragma unroll
    for (int o = GROUP_LANES; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      float a = acc[j] * f;
#pragma unroll
      for (int o = GROUP_LANES; o < 32; o <<= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      acc[j] = a;
    }
    if (group() == 0) {
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) s_acc[warp() * HEAD_DIM + sub() * PER_LANE + j] = acc[j];
    }
    if ((threadIdx.x & 31) == 0) {
      s_max[warp()] = m;
      s_sum[warp()] = s;
    }
    __syncthreads();
    for (int w = 0; w < WARPS_PER_BLOCK; ++w) block_max = fmaxf(block_max, s_max[w]);
    for (int w = 0; w < WARPS_PER_BLOCK; ++w) block_den += __expf(s_max[w] - block_max) * s_sum[w];
  }

  __device__ float numerator(int d) const {
    float num = 0.f;
    for (int w = 0; w < WARPS_PER_BLOCK; ++w) num += __expf(s_max[w] - block_max) * s_acc[w * HEAD_DIM + d];
    return num;
  }
};

// A query that is its sequence's only one this step (a decode beside prefills): token singles[i] of
// sequence token_seq[token] at positions[token] attends to positions 0..=positions[token], streamed by
// the block's 16 lane groups. q: [tokens, heads, D]; out: [tokens, heads, D]; one block per (single, head).
template <typename T, int D>
__device__ void single_query(const T* q, const T* k_cache, const T* v_cache, const uint32_t* positions,
                             const uint32_t* token_seq, const uint32_t* singles, const uint32_t* block_tables,
                             int max_blocks, T* out, int num_singles, int heads, int kv_heads, int block_size,
                             float scale) {
  __shared__ float s_acc[WARPS_PER_BLOCK * D];
  __shared__ float s_max[WARPS_PER_BLOCK];
  __shared__ float s_sum[WARPS_PER_BLOCK];
  if ((int)blockIdx.x >= num_singles * heads) return;  // the same for the whole block
  const int token = singles[blockIdx.x / heads], head = blockIdx.x % heads;
  const size_t item = (size_t)token * heads + head;
  const int kvh = head / (heads / kv_heads);
  Attend<T, D> a;
  a.load_query(q + item * D, scale);
  a.run(k_cache, v_cache, block_tables + (size_t)token_seq[token] * max_blocks, block_size, kv_heads, kvh, 0,
        positions[token] + 1);
  a.merge(s_acc, s_max, s_sum);
  for (int d = threadIdx.x; d < D; d += blockDim.x) out[item * D + d] = from_float<T>(a.numerator(d) / a.block_den);
}

// Tiled prefill: one block per (query tile, head). A tile is up to TILE_Q consecutive query tokens of one
// sequence (`tile_starts` lists each tile's first token; the tile runs while token_seq stays the same).
// Key/value tiles of TILE_K positions go through shared memory once for all the tile's queries, instead
// of once per query: TILE_Q times less cache traffic for prompts. Query t sees positions
// 0..=positions[t]. Thread layout for the output: query row = tid / 8, dims tid % 8 + 8k.
#define TILE_Q 16
#define TILE_K 32
#define TILE_THREADS 128

// The queries of tile blockIdx.x: its first token, how many follow in the same sequence (at most
// TILE_Q), and that sequence's block table. Fills qpos with their positions, -1 for padding rows; the
// caller synchronises before reading it.
struct QueryTile {
  int t0;
  int nq;
  const uint32_t* table;
};

__device__ QueryTile query_tile(const uint32_t* tile_starts, const uint32_t* token_seq, const uint32_t* positions,
                                const uint32_t* block_tables, int max_blocks, int tokens, int* qpos) {
  QueryTile tile;
  tile.t0 = tile_starts[blockIdx.x];
  const uint32_t seq = token_seq[tile.t0];
  tile.nq = 0;
  while (tile.nq < TILE_Q && tile.t0 + tile.nq < tokens && token_seq[tile.t0 + tile.nq] == seq) ++tile.nq;
  tile.table = block_tables + (size_t)seq * max_blocks;
  if (threadIdx.x < TILE_Q) qpos[threadIdx.x] = (int)threadIdx.x < tile.nq ? (int)positions[tile.t0 + threadIdx.x] : -1;
  return tile;
}

template <typename T, int D>
__device__ void prefill_tiled(const T* q, const T* k_cache, const T* v_cache, const uint32_t* positions,
                              const uint32_t* token_seq, const uint32_t* tile_starts, const uint32_t* block_tables,
                              int max_blocks, T* out, int tokens, int heads, int kv_heads, int block_size,
                              float scale) {
  static_assert(TILE_Q * 8 == TILE_THREADS, "eight threads per query row");
  constexpr int PER_THREAD = D / 8;
  __shared__ float qs[TILE_Q][D];
  __shared__ float ks[TILE_K][D + 1];
  __shared__ float vs[TILE_K][D + 1];
  __shared__ float sc[TILE_Q][TILE_K + 1];
  __shared__ int qpos[TILE_Q];

  const int tid = threadIdx.x;
  const int head = blockIdx.y, kvh = head / (heads / kv_heads);
  const QueryTile tile = query_tile(tile_starts, token_seq, positions, block_tables, max_blocks, tokens, qpos);
  const int t0 = tile.t0, nq = tile.nq;
  const uint32_t* table = tile.table;
  for (int e = tid; e < TILE_Q * D; e += TILE_THREADS) {
    const int i = e / D, d = e % D;
    qs[i][d] = i < nq ? to_float(q[((size_t)(t0 + i) * heads + head) * D + d]) * scale : 0.f;
  }
  __syncthreads();
  int last = 0;
  for (int i = 0; i < nq; ++i) last = max(last, qpos[i]);

  const int row = tid / 8, lane8 = tid % 8;
  float acc[PER_THREAD];
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) acc[k] = 0.f;
  float m = -FLT_MAX, l = 0.f;

  for (int kb = 0; kb <= last; kb += TILE_K) {
    for (int e = tid; e < TILE_K * D; e += TILE_THREADS) {
      const int j = e / D, d = e % D;
      const int pos = kb + j;
      float kv = 0.f, vv = 0.f;
      if (pos <= last) {
        const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        const size_t at = (slot * kv_heads + kvh) * D + d;
        kv = to_float(k_cache[at]);
        vv = to_float(v_cache[at]);
      }
      ks[j][d] = kv;
      vs[j][d] = vv;
    }
    __syncthreads();
    for (int e = tid; e < TILE_Q * TILE_K; e += TILE_THREADS) {
      const int i = e / TILE_K, j = e % TILE_K;
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot += qs[i][d] * ks[j][d];
      sc[i][j] = dot;
    }
    __syncthreads();
    // Online softmax of this thread's query row over the tile's visible keys.
    const int visible = qpos[row] - kb;  // keys j <= visible are seen (none when the row is padding)
    float tile_max = -FLT_MAX;
    for (int j = 0; j < TILE_K; ++j)
      if (j <= visible) tile_max = fmaxf(tile_max, sc[row][j]);
    const float m_new = fmaxf(m, tile_max);
    const float correction = __expf(m - m_new);
    l *= correction;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) acc[k] *= correction;
    for (int j = 0; j < TILE_K; ++j) {
      if (j > visible) break;
      const float p = __expf(sc[row][j] - m_new);
      l += p;
#pragma unroll
      for (int k = 0; k < PER_THREAD; ++k) acc[k] += p * vs[j][lane8 + 8 * k];
    }
    m = m_new;
    __syncthreads();
  }
  if (row < nq) {
    T* o = out + ((size_t)(t0 + row) * heads + head) * D;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) o[lane8 + 8 * k] = from_float<T>(acc[k] / l);
  }
}

// The same tiling on tensor cores for f16/bf16: S = Q·Kᵀ and O += P·V as 16×16×16 WMMA products
// (f32 accumulation), the online softmax in f32 between them. O lives in shared memory so that each
// key tile can rescale its rows. Per key tile: warps 0-1 compute the two 16×16 score blocks, every
// thread then updates one query row's softmax over 4 of the 32 keys (8 threads a row), and each warp
// adds P·V into D/64 of the output's 16-column blocks.
template <typename T, int D>
__device__ void prefill_mma(const T* q, const T* k_cache, const T* v_cache, const uint32_t* positions,
                            const uint32_t* token_seq, const uint32_t* tile_starts, const uint32_t* block_tables,
                            int max_blocks, T* out, int tokens, int heads, int kv_heads, int block_size,
                            float scale) {
  using namespace nvcuda;
  constexpr int LD = D + 8;          // 16-bit rows: a multiple of 8, keeps every fragment 32-byte aligned
  constexpr int LDS = TILE_K + 4;    // f32 score rows
  constexpr int LDP = TILE_K + 8;    // 16-bit probability rows
  constexpr int LDO = D + 4;         // f32 output rows
  constexpr int O_BLOCKS = D / 16 / WARPS_PER_BLOCK;  // output column blocks per warp
  static_assert(sizeof(T) == 2, "tensor-core tiles take 16-bit types");
  static_assert(TILE_Q == 16 && TILE_K == 32, "one 16-row score block per warp 0-1, 4 keys per thread");
  static_assert(TILE_THREADS == 8 * TILE_Q && TILE_THREADS == 32 * WARPS_PER_BLOCK, "8 threads a row");
  static_assert(D % (16 * WARPS_PER_BLOCK) == 0 && TILE_K / 16 <= WARPS_PER_BLOCK, "warp split");
  __shared__ __align__(32) T qs[TILE_Q * LD];
  __shared__ __align__(32) T ks[TILE_K * LD];
  __shared__ __align__(32) T vs[TILE_K * LD];
  __shared__ __align__(32) float sc[TILE_Q * LDS];
  __shared__ __align__(32) T ps[TILE_Q * LDP];
  __shared__ __align__(32) float os[TILE_Q * LDO];
  __shared__ int qpos[TILE_Q];

  const int tid = threadIdx.x, warp = tid >> 5;
  const int head = blockIdx.y, kvh = head / (heads / kv_heads);
  const QueryTile tile = query_tile(tile_starts, token_seq, positions, block_tables, max_blocks, tokens, qpos);
  const int t0 = tile.t0, nq = tile.nq;
  const uint32_t* table = tile.table;
  for (int e = tid; e < TILE_Q * D; e += TILE_THREADS) {
    const int i = e / D, d = e % D;
    qs[i * LD + d] = i < nq ? q[((size_t)(t0 + i) * heads + head) * D + d] : from_float<T>(0.f);
    os[i * LDO + d] = 0.f;
  }
  __syncthreads();
  int last = 0;
  for (int i = 0; i < nq; ++i) last = max(last, qpos[i]);

  const int row = tid / 8, part = tid % 8;  // this thread's query row, and its 4 keys / D/8 dims
  float m = -FLT_MAX, l = 0.f;

  for (int kb = 0; kb <= last; kb += TILE_K) {
    // 16 bytes (8 values) per load: cache rows start at multiples of D, and LD keeps shared rows
    // 16-byte aligned.
    for (int e = tid; e < TILE_K * D / 8; e += TILE_THREADS) {
      const int j = e / (D / 8), d = (e % (D / 8)) * 8;
      const int pos = kb + j;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (pos <= last) {
        const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
        const size_t at = (slot * kv_heads + kvh) * D + d;
        kv = *reinterpret_cast<const uint4*>(k_cache + at);
        vv = *reinterpret_cast<const uint4*>(v_cache + at);
      }
      *reinterpret_cast<uint4*>(ks + j * LD + d) = kv;
      *reinterpret_cast<uint4*>(vs + j * LD + d) = vv;
    }
    __syncthreads();
    if (warp < TILE_K / 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // Kᵀ: K rows are its columns
        wmma::load_matrix_sync(a, qs + k * 16, LD);
        wmma::load_matrix_sync(b, ks + warp * 16 * LD + k * 16, LD);
        wmma::mma_sync(s, a, b, s);
      }
      wmma::store_matrix_sync(sc + warp * 16, s, LDS, wmma::mem_row_major);
    }
    __syncthreads();
    // Online softmax of row `row` over keys part*4 .. part*4+3 of the tile, the 8 threads of a row
    // combining through shuffles (they are 8 consecutive lanes of one warp).
    const int visible = qpos[row] - kb;  // keys j <= visible are seen (none for padding rows)
    float score[4];
    float tile_max = -FLT_MAX;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = part * 4 + c;
      score[c] = sc[row * LDS + j] * scale;
      if (j <= visible) tile_max = fmaxf(tile_max, score[c]);
    }
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
    const float m_new = fmaxf(m, tile_max);
    const float correction = __expf(m - m_new);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = part * 4 + c;
      // The denominator sums the probabilities as rounded for the P·V product, so they stay consistent.
      const T p = from_float<T>(j <= visible ? __expf(score[c] - m_new) : 0.f);
      sum += to_float(p);
      ps[row * LDP + j] = p;
    }
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    l = l * correction + sum;
    m = m_new;
    for (int d = part; d < D; d += 8) os[row * LDO + d] *= correction;
    __syncthreads();
#pragma unroll
    for (int b = 0; b < O_BLOCKS; ++b) {
      const int col = (warp * O_BLOCKS + b) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, os + col, LDO, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < TILE_K / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, ps + k * 16, LDP);
        wmma::load_matrix_sync(b, vs + k * 16 * LD + col, LD);
        wmma::mma_sync(o, a, b, o);
      }
      wmma::store_matrix_sync(os + col, o, LDO, wmma::mem_row_major);
    }
    __syncthreads();
  }
  if (row < nq) {
    T* dst = out + ((size_t)(t0 + row) * heads + head) * D;
    for (int d = part; d < D; d += 8) dst[d] = from_float<T>(os[row * LDO + d] / l);
  }
}

// Tensor cores take the 16-bit types; f32 keeps the CUDA-core tiles.
template <typename T, int D>
__device__ void prefill(const T* q, const T* k_cache, const T* v_cache, const uint32_t* positions,
                        const uint32_t* token_seq, const uint32_t* tile_starts, const uint32_t* block_tables,
                        int max_blocks, T* out, int tokens, int heads, int kv_heads, int block_size, float scale) {
  if constexpr (std::is_same<T, float>::value)
    prefill_tiled<T, D>(q, k_cache, v_cache, positions, token_seq, tile_starts, block_tables, max_blocks, out,
                        tokens, heads, kv_heads, block_size, scale);
  else
    prefill_mma<T, D>(q, k_cache, v_cache, positions, token_seq, tile_starts, block_tables, max_blocks, out,
                      tokens, heads, kv_heads, block_size, scale);
}

// Decode, pass 1: one query per sequence; partition `part` covers [part * part_len, ...) of its context
// (the host picks part_len: many short partitions for small batches, one for large ones).
// Partial results: acc [seqs, heads, parts, D] (relative to the partition's max), max and sum
// [seqs, heads, parts]; an empty partition only writes sum 0, which the merge skips.
template <typename T, int D>
__device__ void decode_partial(const T* q, const T* k_cache, const T* v_cache, const uint32_t* context_lens,
                               const uint32_t* block_tables, int max_blocks, float* part_acc, float* part_max,
                               float* part_sum, int seqs, int heads, int kv_heads, int block_size, int parts,
                               int part_len, float scale) {
  __shared__ float s_acc[WARPS_PER_BLOCK * D];
  __shared__ float s_max[WARPS_PER_BLOCK];
  __shared__ float s_sum[WARPS_PER_BLOCK];
  const int item = blockIdx.x;
  if (item >= seqs * heads * parts) return;  // the same for the whole block
  const int part = item % parts, sh = item / parts;
  const int seq = sh / heads, head = sh % heads;
  const int kvh = head / (heads / kv_heads);
  const int len = context_lens[seq];
  const int begin = part * part_len, end = min(len, begin + part_len);
  if (begin >= end) {  // the same for the whole block: a partition past this context
    if (threadIdx.x == 0) {
      part_max[item] = -FLT_MAX;
      part_sum[item] = 0.f;
    }
    return;
  }
  Attend<T, D> a;
  a.load_query(q + (size_t)sh * D, scale);
  a.run(k_cache, v_cache, block_tables + (size_t)seq * max_blocks, block_size, kv_heads, kvh, begin, end);
  a.merge(s_acc, s_max, s_sum);
  for (int d = threadIdx.x; d < D; d += blockDim.x) part_acc[(size_t)item * D + d] = a.numerator(d);
  if (threadIdx.x == 0) {
    part_max[item] = a.block_max;
    part_sum[item] = a.block_den;
  }
}

// Decode, pass 2: merge the partitions of each (sequence, head) with their log-sum-exp weights.
template <typename T, int D>
__device__ void decode_merge(const float* part_acc, const float* part_max, const float* part_sum, T* out,
                             int seqs_heads, int parts) {
  const int sh = blockIdx.x;
  if (sh >= seqs_heads) return;
  float m = -FLT_MAX;
  for (int p = 0; p < parts; ++p)
    if (part_sum[sh * parts + p] > 0.f) m = fmaxf(m, part_max[sh * parts + p]);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int p = 0; p < parts; ++p) {
      const float sum = part_sum[sh * parts + p];
      if (sum > 0.f) {  // an empty partition wrote no accumulator
        const float w = __expf(part_max[sh * parts + p] - m);
        num += w * part_acc[((size_t)sh * parts + p) * D + d];
        den += w * sum;
      }
    }
    out[(size_t)sh * D + d] = from_float<T>(num / den);
  }
}

#define ATTENTION_ENTRY(T, S, D)                                                                          \
  extern "C" __global__ void prefill_attention_##S##_d##D(                                                \
      const T* q, const T* kc, const T* vc, const uint32_t* pos, const uint32_t* seq,                      \
      const uint32_t* tiles, const uint32_t* tables, int max_blocks, T* out, int tokens, int heads,        \
      int kv_heads, int block_size, float scale) {                                                        \
    prefill<T, D>(q, kc, vc, pos, seq, tiles, tables, max_blocks, out, tokens, heads, kv_heads, block_size, \
                  scale);                                                                                 \
  }                                                                                                       \
  extern "C" __global__ void single_query_attention_##S##_d##D(                                            \
      const T* q, const T* kc, const T* vc, const uint32_t* pos, const uint32_t* seq,                      \
      const uint32_t* singles, const uint32_t* tables, int max_blocks, T* out, int num_singles, int heads,  \
      int kv_heads, int block_size, float scale) {                                                        \
    single_query<T, D>(q, kc, vc, pos, seq, singles, tables, max_blocks, out, num_singles, heads, kv_heads, \
                       block_size, scale);                                                                \
  }                                                                                                       \
  extern "C" __global__ void decode_attention_partial_##S##_d##D(                                         \
      const T* q, const T* kc, const T* vc, const uint32_t* lens, const uint32_t* tables, int max_blocks,  \
      float* acc, float* mx, float* sm, int seqs, int heads, int kv_heads, int block_size, int parts,      \
      int part_len, float scale) {                                                                        \
    decode_partial<T, D>(q, kc, vc, lens, tables, max_blocks, acc, mx, sm, seqs, heads, kv_heads,          \
                         block_size, parts, part_len, scale);                                             \
  }                                                                                                       \
  extern "C" __global__ void decode_attention_merge_##S##_d##D(const float* acc, const float* mx,          \
                                                               const float* sm, T* out, int sh, int parts) { \
    decode_merge<T, D>(acc, mx, sm, out, sh, parts);                                                      \
  }
#define ATTENTION_DIMS(T, S) ATTENTION_ENTRY(T, S, 64) ATTENTION_ENTRY(T, S, 128)
FOR_EACH_DTYPE(ATTENTION_DIMS)

// KV-cache write: rows of `src` ([tokens, row], consecutive rows src_stride apart: a slice of the
// merged qkv projection) into the cache rows named by `slots`.
template <typename T>
__device__ void write_kv(T* cache, const T* src, const uint32_t* slots, int tokens, int row, int src_stride) {
  const size_t n = (size_t)tokens * row;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const size_t t = i / row, c = i % row;
    cache[(size_t)slots[t] * row + c] = src[t * src_stride + c];
  }
}
#define WRITE_ENTRY(T, S)                                                                              \
  extern "C" __global__ void write_kv_##S(T* cache, const T* src, const uint32_t* slots, int tokens,    \
                                          int row, int src_stride) {                                   \
    write_kv<T>(cache, src, slots, tokens, row, src_stride);                                           \
  }
FOR_EACH_DTYPE(WRITE_ENTRY)
