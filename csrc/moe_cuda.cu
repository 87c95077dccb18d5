// CUDA routing and token permutation kernels of `twotower::moe_forward` (see moe_cuda.h).
//
// route_kernel: one warp per token; the sigmoid scores and biased scores live in shared memory
// and the top-k is k rounds of a warp argmax (ties to the lower expert id, the order the
// reference's torch.topk gives).  rank_kernel: one block per expert ranks that expert's pairs in
// token order with ballots (deterministic, no atomics), then a scan gives the expert offsets.
// permute / unpermute move token rows into and out of the grouped layout; the un-permutation
// sums a token's expert outputs in ascending expert id and then the shared expert, with
// unfused float32 multiply and add, which is the reference's order and rounding.
#include <cuda_bf16.h>

#include <climits>
#include <cmath>

#include "moe_cuda.h"

namespace twotower::moe {
namespace {

constexpr int kRouteWarps = 4;
constexpr int kAlignThreads = 256;
constexpr int kRowThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <class R>
__global__ void route_kernel(const R* logits, const R* bias, RouteLaunch args) {
  extern __shared__ unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= args.tokens) return;  // whole warps leave; only warp-level syncs follow
  const int experts = static_cast<int>(args.experts);
  R* score = reinterpret_cast<R*>(smem) + static_cast<int64_t>(warp) * 2 * experts;
  R* biased = score + experts;
  for (int e = lane; e < experts; e += 32) {
    const R s = R(1) / (R(1) + exp(-logits[t * experts + e]));
    score[e] = s;
    biased[e] = s + bias[e];
  }
  __syncwarp();
  R chosen[kMaxTopK];
  R total = 0;
  for (int j = 0; j < args.top_k; ++j) {
    R best = -INFINITY;
    int best_e = INT_MAX;
    for (int e = lane; e < experts; e += 32) {
      if (biased[e] > best) {  // strict: each lane keeps its lowest id among equals
        best = biased[e];
        best_e = e;
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const R other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_e = __shfl_xor_sync(0xffffffffu, best_e, offset);
      if (other > best || (other == best && other_e < best_e)) {
        best = other;
        best_e = other_e;
      }
    }
    chosen[j] = score[best_e];
    total += chosen[j];
    if (lane == 0) {
      args.expert_ids[t * args.top_k + j] = best_e;
      biased[best_e] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane == 0) {
    for (int j = 0; j < args.top_k; ++j) {
      const R w = args.norm_topk_prob ? chosen[j] / total : chosen[j];
      args.weights[t * args.top_k + j] = static_cast<float>(w * R(args.routed_scaling_factor));
    }
  }
}

// Block e ranks the pairs routed to expert e in pair order and writes their count to
// offsets[e + 1].
__global__ void rank_kernel(const int32_t* expert_ids, int64_t pairs, int32_t* rank,
                            int32_t* offsets) {
  __shared__ int warp_hits[kAlignThreads / 32];
  const int e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int running = 0;
  for (int64_t base = 0; base < pairs; base += kAlignThreads) {
    const int64_t p = base + threadIdx.x;
    const bool hit = p < pairs && expert_ids[p] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_hits[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u)), tile = 0;
    for (int w = 0; w < kAlignThreads / 32; ++w) {
      if (w < warp) before += warp_hits[w];
      tile += warp_hits[w];
    }
    if (hit) rank[p] = running + before;
    running += tile;
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[e + 1] = running;
}

// Exclusive scan of the counts into offsets; experts number in the hundreds, one thread is enough.
__global__ void scan_kernel(int32_t* offsets, int64_t experts) {
  offsets[0] = 0;
  for (int64_t e = 0; e < experts; ++e) offsets[e + 1] += offsets[e];
}

__global__ void scatter_kernel(const int32_t* expert_ids, const int32_t* rank,
                               const int32_t* offsets, int64_t pairs, int64_t top_k,
                               int32_t* row_of, int32_t* token_of_row) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int32_t row = offsets[expert_ids[p]] + rank[p];
  row_of[p] = row;
  token_of_row[row] = static_cast<int32_t>(p / top_k);
}

template <class T>
__global__ void permute_kernel(const T* hidden, int64_t hidden_size, const int32_t* token_of_row,
                               T* rows) {
  const T* src = hidden + static_cast<int64_t>(token_of_row[blockIdx.x]) * hidden_size;
  T* dst = rows + static_cast<int64_t>(blockIdx.x) * hidden_size;
  for (int64_t h = threadIdx.x; h < hidden_size; h += kRowThreads) dst[h] = src[h];
}

template <class T>
__global__ void unpermute_kernel(const T* expert_out, const T* shared_out, const float* weights,
                                 const int32_t* expert_ids, const int32_t* row_of, int64_t top_k,
                                 int64_t hidden_size, T* out) {
  __shared__ int64_t order[kMaxTopK];  // this token's pairs by ascending expert id
  const int64_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t i = j;
      for (; i > 0 && expert_ids[order[i - 1]] > expert_ids[t * top_k + j]; --i) {
        order[i] = order[i - 1];
      }
      order[i] = t * top_k + j;
    }
  }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < hidden_size; h += kRowThreads) {
    float acc = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t row = row_of[order[j]];
      const float y = to_float(expert_out[row * hidden_size + h]);
      acc = __fadd_rn(acc, __fmul_rn(y, weights[order[j]]));
    }
    if (shared_out != nullptr) acc = __fadd_rn(acc, to_float(shared_out[t * hidden_size + h]));
    out[t * hidden_size + h] = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t launch_moe_route(const RouteLaunch& args, cudaStream_t stream) {
  if (args.top_k > kMaxTopK || args.top_k > args.experts) return cudaErrorInvalidValue;
  if (args.tokens == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((args.tokens + kRouteWarps - 1) / kRouteWarps);
  const size_t elem = args.router_double ? sizeof(double) : sizeof(float);
  const size_t smem = kRouteWarps * 2 * args.experts * elem;
  if (args.router_double) {
    route_kernel<double><<<blocks, kRouteWarps * 32, smem, stream>>>(
        static_cast<const double*>(args.router_logits),
        static_cast<const double*>(args.correction_bias), args);
  } else {
    route_kernel<float><<<blocks, kRouteWarps * 32, smem, stream>>>(
        static_cast<const float*>(args.router_logits),
        static_cast<const float*>(args.correction_bias), args);
  }
  return cudaGetLastError();
}

cudaError_t launch_moe_align(const int32_t* expert_ids, int64_t pairs, int64_t experts,
                             int64_t top_k, int32_t* rank, int32_t* offsets, int32_t* row_of,
                             int32_t* token_of_row, cudaStream_t stream) {
  rank_kernel<<<experts, kAlignThreads, 0, stream>>>(expert_ids, pairs, rank, offsets);
  scan_kernel<<<1, 1, 0, stream>>>(offsets, experts);
  if (pairs > 0) {
    const unsigned blocks = static_cast<unsigned>((pairs + kAlignThreads - 1) / kAlignThreads);
    scatter_kernel<<<blocks, kAlignThreads, 0, stream>>>(expert_ids, rank, offsets, pairs, top_k,
                                                         row_of, token_of_row);
  }
  return cudaGetLastError();
}

cudaError_t launch_moe_permute(const void* hidden, bool bf16, int64_t hidden_size,
                               const int32_t* token_of_row, int64_t pairs, void* rows,
                               cudaStream_t stream) {
  if (pairs == 0) return cudaSuccess;
  if (bf16) {
    permute_kernel<<<pairs, kRowThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(hidden),
                                                      hidden_size, token_of_row,
                                                      static_cast<__nv_bfloat16*>(rows));
  } else {
    permute_kernel<<<pairs, kRowThreads, 0, stream>>>(static_cast<const float*>(hidden),
                                                      hidden_size, token_of_row,
                                                      static_cast<float*>(rows));
  }
  return cudaGetLastError();
}

cudaError_t launch_moe_unpermute(const void* expert_out, const void* shared_out, bool bf16,
                                 const float* weights, const int32_t* expert_ids,
                                 const int32_t* row_of, int64_t tokens, int64_t top_k,
                                 int64_t hidden_size, void* out, cudaStream_t stream) {
  if (top_k > kMaxTopK) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (bf16) {
    using T = __nv_bfloat16;
    unpermute_kernel<<<tokens, kRowThreads, 0, stream>>>(
        static_cast<const T*>(expert_out), static_cast<const T*>(shared_out), weights, expert_ids,
        row_of, top_k, hidden_size, static_cast<T*>(out));
  } else {
    unpermute_kernel<<<tokens, kRowThreads, 0, stream>>>(
        static_cast<const float*>(expert_out), static_cast<const float*>(shared_out), weights,
        expert_ids, row_of, top_k, hidden_size, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

}  // namespace twotower::moe
