// The scalar pieces of the TwoTower commit rule shared by the CPU and CUDA kernels.
//
// This header is plain C++ (no torch), so `commit_cuda.cu` compiles standalone with nvcc.  Each
// function mirrors one step of `vllm_twotower/commit.py` bit for bit; the Python module is the
// specification, these are its transcriptions.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TWOTOWER_HD __host__ __device__ __forceinline__
#else
#define TWOTOWER_HD inline
#endif

namespace twotower::commit {

constexpr uint32_t kGolden32 = 0x9E3779B9u;
// 2^-32: maps a 32-bit hash to (0, 1) as `(bits + 0.5) * 2^-32`, exactly as the torch code does.
constexpr double kInv2Pow32 = 1.0 / 4294967296.0;

// `lowbias32` hash (commit.py: mix32); uint32 arithmetic wraps exactly like the masked int64 code.
TWOTOWER_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Base noise key of one canvas position (commit.py: noise_row_keys).
TWOTOWER_HD uint32_t noise_row_key(int64_t seed, int64_t position, int64_t step) {
  uint32_t key = mix32(static_cast<uint32_t>(seed));
  key = mix32(key ^ static_cast<uint32_t>(position));
  return mix32(key ^ static_cast<uint32_t>(step));
}

// The uniform in (0, 1) behind the Gumbel noise of `vocab_id` (commit.py: gumbel_noise).
TWOTOWER_HD double noise_uniform(uint32_t row_key, uint32_t vocab_id) {
  const uint32_t bits = mix32(row_key + vocab_id * kGolden32);
  return (static_cast<double>(bits) + 0.5) * kInv2Pow32;
}

// How many of the `n` masked positions a row decides (commit.py: num_to_commit).
TWOTOWER_HD int64_t num_to_commit(int64_t n, int64_t confident, int64_t step,
                                  int64_t steps_per_block) {
  const int64_t remaining = steps_per_block - step < 1 ? 1 : steps_per_block - step;
  const int64_t floor = (n + remaining - 1) / remaining;  // n >= 0: truncation == floor
  int64_t k = confident > 1 ? confident : 1;
  k = k > floor ? k : floor;
  if (step >= steps_per_block - 1) k = n;
  return k < n ? k : n;
}

// Whether masked position `i` is among the `k` most confident masked positions of its canvas,
// ties going to the lower position (commit.py: select_commits).  O(S) per position: canvases
// are short (S = 16), so ranking by counting beats sorting and needs no scratch memory.
TWOTOWER_HD bool is_selected(const float* confidence, const bool* masked, int64_t size, int64_t i,
                             int64_t k) {
  const float c = confidence[i];
  int64_t better = 0;
  for (int64_t j = 0; j < size; ++j) {
    if (masked[j] && (confidence[j] > c || (confidence[j] == c && j < i))) ++better;
  }
  return better < k;
}

}  // namespace twotower::commit
