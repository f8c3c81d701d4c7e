// Token choice on the device, so a step's [rows, vocab] logits never cross to the host: per row the
// argmax of logits / T + Gumbel noise (an exact draw from softmax(logits / T)), or the plain argmax
// when T is 0. The noise of vocabulary entry i comes from a hash of the row's 64-bit seed and i, the
// same function as cpu::uniform; the seeds come from each sequence's own seeded generator.
#include "common.cuh"
#include <float.h>

#define SAMPLE_THREADS 256

__device__ __forceinline__ float uniform(unsigned long long seed, unsigned int i) {
  unsigned long long z = seed ^ ((unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  // 23 bits, so that k + 0.5 is exact in f32 and u stays below 1 (24 bits would round the top value
  // to 1.0, an infinite Gumbel score).
  return ((float)(z >> 41) + 0.5f) * (1.f / 8388608.f);
}

// Gumbel noise -ln(-ln u); the inner log as log1p(u - 1), exact near u = 1 where fast-math's logf is not.
__device__ __forceinline__ float gumbel(float u) { return -logf(-log1pf(u - 1.f)); }

// logits: [rows, vocab] f32; params: temperatures (f32 bits) [rows], seed low words [rows], seed high
// words [rows]; out: [rows] u32. One block per row. Ties go to the lowest index, as torch's argmax.
extern "C" __global__ void sample_rows(const float* logits, const uint32_t* params, uint32_t* out, int rows,
                                       int vocab) {
  __shared__ float best_score[SAMPLE_THREADS];
  __shared__ int best_index[SAMPLE_THREADS];
  const int row = blockIdx.x;
  if (row >= rows) return;  // the same for the whole block
  const float t = __uint_as_float(params[row]);
  const unsigned long long seed =
      (unsigned long long)params[rows + row] | ((unsigned long long)params[2 * rows + row] << 32);
  const float* l = logits + (size_t)row * vocab;
  float best = -FLT_MAX;
  int index = vocab;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    float score = l[i];
    if (t > 0.f) score = score / t + gumbel(uniform(seed, i));
    if (score > best) {  // i grows, so the first maximum of this thread's share is kept
      best = score;
      index = i;
    }
  }
  best_score[threadIdx.x] = best;
  best_index[threadIdx.x] = index;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float s = best_score[threadIdx.x + stride];
      const int j = best_index[threadIdx.x + stride];
      if (s > best_score[threadIdx.x] || (s == best_score[threadIdx.x] && j < best_index[threadIdx.x])) {
        best_score[threadIdx.x] = s;
        best_index[threadIdx.x] = j;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[row] = best_index[0] < vocab ? best_index[0] : 0;
}
