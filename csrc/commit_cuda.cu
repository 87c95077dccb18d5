// CUDA kernels of `twotower::commit_step` (semantics: vllm_twotower/commit.py, see commit_rule.h).
//
// predict_kernel: one thread block per canvas position (logit row).  Positions already decided
// exit at once (confidence +inf).  Each thread streams a strided slice of the row once, keeping
// an online (max, argmax, Σexp) triple and, for sampling rows, the best Gumbel-perturbed logit in
// float64; warp shuffles and then shared memory merge the per-thread states.
// select_kernel: one block per canvas, one thread per position, applies the count and the
// top-k selection.
#include <cuda_bf16.h>

#include <cmath>

#include "commit_cuda.h"
#include "commit_rule.h"

namespace twotower::commit {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float load_logit(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Online-softmax state of a slice of a row.
struct Softmax {
  float max;
  float sum;  // Σ exp(x - max)
  int64_t argmax;
};

__device__ __forceinline__ Softmax merge(Softmax a, Softmax b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f, min(a.argmax, b.argmax)};
  const float sum = a.sum * expf(a.max - m) + b.sum * expf(b.max - m);
  int64_t arg = a.max > b.max ? a.argmax : b.argmax;
  if (a.max == b.max) arg = min(a.argmax, b.argmax);  // first occurrence, as torch.argmax
  return {m, sum, arg};
}

// Best Gumbel-perturbed logit of a slice; ties to the lower vocabulary id.
struct Draw {
  double value;
  int64_t index;
};

__device__ __forceinline__ Draw merge(Draw a, Draw b) {
  if (a.value > b.value || (a.value == b.value && a.index < b.index)) return a;
  return b;
}

__device__ __forceinline__ Softmax shuffle(Softmax s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
          __shfl_xor_sync(0xffffffffu, s.argmax, offset)};
}

__device__ __forceinline__ Draw shuffle(Draw d, int offset) {
  return {__shfl_xor_sync(0xffffffffu, d.value, offset),
          __shfl_xor_sync(0xffffffffu, d.index, offset)};
}

template <class T>
__device__ __forceinline__ T warp_merge(T state) {
  for (int offset = 16; offset > 0; offset >>= 1) state = merge(state, shuffle(state, offset));
  return state;
}

// Merges one state per thread into thread 0's; `scratch` holds kWarps states and `identity` is
// the state of an empty slice.
template <class T>
__device__ T block_merge(T state, T identity, T* scratch) {
  state = warp_merge(state);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  if (warp == 0) state = warp_merge(lane < kWarps ? scratch[lane] : identity);
  return state;
}

template <class scalar_t>
__global__ void __launch_bounds__(kThreads) predict_kernel(CommitLaunch args) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / args.positions, i = row % args.positions;
  if (args.canvas[row] != args.mask_id) {
    if (threadIdx.x == 0) args.confidence[row] = INFINITY;
    return;
  }
  const scalar_t* logits = static_cast<const scalar_t*>(args.logits) + row * args.vocab;
  const double temperature = args.temperature[b];
  const bool sampling = temperature > 0;
  const uint32_t key = noise_row_key(args.seed[b], args.block_start[b] + i, args.step[b]);

  constexpr Softmax kNoSoftmax{-INFINITY, 0.f, 0};
  constexpr Draw kNoDraw{-INFINITY, 0};
  Softmax soft = kNoSoftmax;
  Draw draw = kNoDraw;
  for (int64_t v = threadIdx.x; v < args.vocab; v += kThreads) {
    const float x = v == args.mask_id ? -INFINITY : load_logit(logits, v);
    if (x > soft.max) {
      soft.sum = soft.max == -INFINITY ? 0.f : soft.sum * expf(soft.max - x);
      soft.max = x;
      soft.argmax = v;
    }
    if (soft.max != -INFINITY) soft.sum += expf(x - soft.max);
    if (sampling) {
      const double u = noise_uniform(key, static_cast<uint32_t>(v));
      const double value = static_cast<double>(x) / temperature - log(-log(u));
      if (value > draw.value) draw = {value, v};
    }
  }
  __shared__ Softmax soft_scratch[kWarps];
  __shared__ Draw draw_scratch[kWarps];
  soft = block_merge(soft, kNoSoftmax, soft_scratch);
  if (sampling) draw = block_merge(draw, kNoDraw, draw_scratch);
  if (threadIdx.x == 0) {
    const int64_t token = sampling ? draw.index : soft.argmax;
    args.tokens[row] = token;
    const double shifted = static_cast<double>(load_logit(logits, token)) - soft.max;
    args.confidence[row] = static_cast<float>(exp(shifted) / soft.sum);
  }
}

__global__ void select_kernel(CommitLaunch args) {
  __shared__ float confidence[kMaxPositions];
  __shared__ bool masked[kMaxPositions];
  const int64_t b = blockIdx.x, i = threadIdx.x, row = b * args.positions + i;
  const bool mine = args.canvas[row] == args.mask_id;
  confidence[i] = args.confidence[row];
  masked[i] = mine;
  const int64_t n = __syncthreads_count(mine);
  const int64_t confident = __syncthreads_count(mine && confidence[i] > args.threshold[b]);
  const int64_t k = num_to_commit(n, confident, args.step[b], args.steps_per_block[b]);
  const bool commit = mine && is_selected(confidence, masked, args.positions, i, k);
  args.canvas_out[row] = commit ? args.tokens[row] : args.canvas[row];
  const int64_t committed = __syncthreads_count(commit);
  if (i == 0) args.num_committed[b] = committed;
}

}  // namespace

cudaError_t launch_commit_step(const CommitLaunch& args, cudaStream_t stream) {
  if (args.positions > kMaxPositions) return cudaErrorInvalidValue;
  const int64_t rows = args.batch * args.positions;
  if (rows == 0) return cudaSuccess;
  if (args.logits_bf16) {
    predict_kernel<__nv_bfloat16><<<rows, kThreads, 0, stream>>>(args);
  } else {
    predict_kernel<float><<<rows, kThreads, 0, stream>>>(args);
  }
  select_kernel<<<args.batch, args.positions, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace twotower::commit
