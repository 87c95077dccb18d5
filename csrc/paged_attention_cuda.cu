// CUDA kernel of `twotower::paged_block_attention` (semantics in paged_attention.h).
//
// One thread block per (row, query head), four warps; each warp takes the block's queries in
// turn.  For one query a warp walks the row's context 32 keys at a time: lane j computes key j's
// score (its K row read through the block table and the K offset map, float32 products), the
// warp reduces the chunk's max and Σexp (online softmax), then every lane, owning head_dim / 32
// output channels, adds the 32 weighted V rows (the weights broadcast by shuffles).  The block's
// own keys follow the context, masked by block length (and causally when asked).  Context K/V are
// read in place, once per query head that shares them (GQA heads hit L2), and never copied or
// widened in memory; everything accumulates in float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "paged_attention_cuda.h"

namespace twotower::paged {
namespace {

constexpr int kWarps = 4;
constexpr int kLanes = 32;
constexpr int kPerLane = kMaxHeadDim / kLanes;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = kLanes / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = kLanes / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Running state of one query, spread over a warp: max and Σexp (same in every lane) and the
// output channels lane, lane + 32, ...
struct Online {
  float max = -INFINITY, sum = 0.f, acc[kPerLane] = {};
};

// Folds one chunk of up to 32 keys into `st`.  Lane j holds key j's `score` (-inf when masked)
// and `v_row`, a pointer to its V row; `v_stride` steps a channel within it (through `v_off`
// when not null, which then maps channel c of V row j to v_row[v_off[c]]).
template <typename T>
__device__ void fold(Online& st, float score, const T* v_row, const int64_t* v_off, int dim) {
  const float chunk_max = warp_max(score);
  if (chunk_max == -INFINITY) return;
  const float new_max = fmaxf(st.max, chunk_max);
  const float correction = __expf(st.max - new_max);
  const float p = score == -INFINITY ? 0.f : __expf(score - new_max);
  st.sum = st.sum * correction + warp_sum(p);
  st.max = new_max;
  for (int i = 0; i < kPerLane; ++i) st.acc[i] *= correction;
  const int lane = threadIdx.x % kLanes;
  for (int j = 0; j < kLanes; ++j) {
    const float pj = __shfl_sync(0xffffffffu, p, j);
    const T* row = reinterpret_cast<const T*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(v_row), j));
    const int64_t* off =
        v_off == nullptr ? nullptr
                         : reinterpret_cast<const int64_t*>(__shfl_sync(
                               0xffffffffu, reinterpret_cast<unsigned long long>(v_off), j));
    if (pj == 0.f) continue;  // uniform across the warp: pj is broadcast
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + i * kLanes;
      if (c < dim) st.acc[i] += pj * load(row + (off == nullptr ? c : off[c]));
    }
  }
}

template <typename T>
__global__ void paged_block_attention_kernel(PagedAttentionArgs a) {
  __shared__ float query[kWarps][kMaxHeadDim];
  const int r = blockIdx.x, qh = blockIdx.y;
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int d = static_cast<int>(a.head_dim);
  const int64_t S = a.size, N = a.kernel_block_size;
  const int64_t kvh = qh / (a.q_heads / a.kv_heads);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* cache = static_cast<const T*>(a.cache);
  T* out = static_cast<T*>(a.out);
  const int64_t kv_len = a.kv_lens[r], block_len = a.block_lens[r];
  for (int64_t s = warp; s < S; s += kWarps) {
    const T* qs = q + ((r * S + s) * a.q_heads + qh) * d;
    for (int c = lane; c < d; c += kLanes) query[warp][c] = load(qs + c);
    __syncwarp();
    Online st;
    for (int64_t start = 0; start < kv_len; start += kLanes) {
      const int64_t p = start + lane;
      float score = -INFINITY;
      const T* base = cache;
      const int64_t* v_off = a.v_offsets;
      if (p < kv_len) {
        base = cache + a.block_table[r * a.table_width + p / N] * a.block_stride +
               kvh * a.head_stride;
        const int64_t* k_off = a.k_offsets + (p % N) * d;
        v_off = a.v_offsets + (p % N) * d;
        float dot = 0.f;
        for (int c = 0; c < d; ++c) dot += query[warp][c] * load(base + k_off[c]);
        score = dot * a.scale;
      }
      fold(st, score, base, v_off, d);
    }
    for (int64_t start = 0; start < S; start += kLanes) {
      const int64_t j = start + lane;
      float score = -INFINITY;
      const T* v_row = v;
      if (j < S && j < block_len && (!a.causal || j <= s)) {
        const int64_t at = ((r * S + j) * a.kv_heads + kvh) * d;
        float dot = 0.f;
        for (int c = 0; c < d; ++c) dot += query[warp][c] * load(k + at + c);
        score = dot * a.scale;
        v_row = v + at;
      }
      fold(st, score, v_row, static_cast<const int64_t*>(nullptr), d);
    }
    T* dst = out + ((r * S + s) * a.q_heads + qh) * d;
    const float inv = st.sum > 0.f ? 1.f / st.sum : 0.f;
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + i * kLanes;
      if (c < d) store(dst + c, st.acc[i] * inv);
    }
    __syncwarp();
  }
}

template <typename T>
cudaError_t launch(const PagedAttentionArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.size == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.rows), static_cast<unsigned>(args.q_heads));
  paged_block_attention_kernel<T><<<grid, kWarps * kLanes, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_paged_block_attention(const PagedAttentionArgs& args, ElementType type,
                                         cudaStream_t stream) {
  switch (type) {
    case ElementType::kFloat:
      return launch<float>(args, stream);
    case ElementType::kBFloat16:
      return launch<__nv_bfloat16>(args, stream);
    case ElementType::kHalf:
      return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace twotower::paged
