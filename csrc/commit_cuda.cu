// CUDA kernels of `twotower::commit_step` (semantics: vllm_twotower/commit.py, see commit_rule.h).
//
// predict_kernel: one thread block per canvas position (logit row), or on sm_90 a cluster of
// `split` blocks per row when there are fewer rows than SMs.  Positions already decided exit at
// once (confidence +inf).  Each thread streams a strided slice of the row once, keeping an online
// (max, argmax, Σexp) triple and, for sampling rows, the best Gumbel-perturbed logit in float64
// (computed per element exactly as the torch code does).
//   Loads: the row is read with 16-byte loads (float4, or 8 bfloat16 as a uint4), kUnroll of them
// in flight per thread on greedy rows; one scalar load per element left the loop bound by
// instructions and latency, not by memory.  Per loaded vector a thread takes the vector's max
// first and touches its triple only when that max beats the running one (rare: a rescale of Σ and
// the first lane holding the max), then adds the vector's Σexp(x - max).
//   Rows start at `row * vocab` elements.  When the vector width divides the vocabulary, every
// row has the same `head` (the < 4 or 8 elements before its first 16-byte boundary, set by the
// base pointer alone) and the same `tail` (the elements after its last whole vector); the first
// threads read those as scalars, a head element before their vectors and a tail element after.
// Otherwise (vocab 17, 2049, ...) the rows are read one element per load (still kUnroll in
// flight): vectors would start at a different offset in each row, and identical rows (equal
// confidences, which the selection breaks by position) must reduce in the same order.  Either
// way a thread sees its vocabulary ids in increasing order, so strict `>` keeps the first
// occurrence.  The mask id is set to -inf in registers: only the one load holding it (known up
// front) takes a branch that compares each lane.
//   Warp shuffles, shared memory and, for a cluster, thread 0 of its first block reading the
// other blocks' results through distributed shared memory merge the states in a fixed order
// (ties to the lower vocabulary id).  The split, like the load width, changes only the rounding
// of Σ and is the same for every row of a launch.
// select_kernel: one block per canvas, one thread per position, applies the count and the
// top-k selection.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <cmath>

#include "commit_cuda.h"
#include "commit_rule.h"

namespace twotower::commit {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;    // 16-byte loads in flight per thread (greedy rows)
constexpr int kMaxSplit = 4;  // blocks per row (a cluster, sm_90 only)

__device__ __forceinline__ float load_logit(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// How a row is loaded: `Raw` is what one load reads, `widen` gives its kWidth floats.  The
// vector forms need kWidth to divide the vocabulary (see the header); the scalar one does not.
template <class scalar_t, bool kVector>
struct Loads {
  static constexpr int kWidth = 1;
  using Raw = scalar_t;
  static __device__ __forceinline__ void widen(Raw r, float (&x)[kWidth]) { x[0] = to_float(r); }
};

template <>
struct Loads<float, true> {
  static constexpr int kWidth = 4;
  using Raw = float4;
  static __device__ __forceinline__ void widen(Raw r, float (&x)[kWidth]) {
    x[0] = r.x, x[1] = r.y, x[2] = r.z, x[3] = r.w;
  }
};

template <>
struct Loads<__nv_bfloat16, true> {
  static constexpr int kWidth = 8;
  using Raw = uint4;
  // bfloat16 -> float puts the 16 bits on top of a zero mantissa tail (= __bfloat162float);
  // element 2k is the low half of word k (little endian).
  static __device__ __forceinline__ void widen(Raw r, float (&x)[kWidth]) {
    const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __uint_as_float(words[k] << 16);
      x[2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);
    }
  }
};

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

constexpr Softmax kNoSoftmax{-INFINITY, 0.f, 0};
constexpr Draw kNoDraw{-INFINITY, 0};

// One thread's pass over its part of a row.  `scan` takes kWidth logits (already widened, the
// mask id already -inf) with vocabulary ids first, first + 1, ...; calls come in increasing id
// order.
template <bool kSampling>
struct RowScan {
  Softmax soft = kNoSoftmax;
  float shift = 0.f;  // soft.max, or 0 while that is -inf (then every x so far is -inf)
  Draw draw = kNoDraw;
  uint32_t key;
  double temperature;
  double cutoff;  // smallest tempered logit that may be drawn (commit.py: sampling_cutoff)

  template <int kWidth>
  __device__ __forceinline__ void scan(const float (&x)[kWidth], int64_t first) {
    float m = x[0];
#pragma unroll
    for (int j = 1; j < kWidth; ++j) m = fmaxf(m, x[j]);
    if (m > soft.max) {  // m is one of the x (fmaxf returns an operand); not NaN here
      soft.sum = soft.max == -INFINITY ? 0.f : soft.sum * expf(soft.max - m);
      int at = kWidth - 1;
#pragma unroll
      for (int j = kWidth - 2; j >= 0; --j) at = x[j] == m ? j : at;  // first lane holding m
      soft = {m, soft.sum, first + at};
      shift = m;
    }
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum += expf(x[j] - shift);
    soft.sum += sum;
    if constexpr (kSampling) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const double tempered = static_cast<double>(x[j]) / temperature;
        if (!(tempered >= cutoff)) continue;  // filtered out by min_p / top_k / top_p
        const double u = noise_uniform(key, static_cast<uint32_t>(first + j));
        const double value = tempered - log(-log(u));
        if (value > draw.value) draw = {value, first + j};
      }
    }
  }
};

// Thread `t` of the `threads` that share a row (the blocks of its cluster) scans its part: the
// scalar head element t, loads t, t + threads, ..., the scalar tail element t (ids in increasing
// order).
template <bool kSampling, bool kVector, class scalar_t>
__device__ __forceinline__ RowScan<kSampling> scan_row(const scalar_t* logits, int64_t vocab,
                                                       int64_t mask_id, int64_t t,
                                                       int64_t threads, uint32_t key,
                                                       double temperature, double cutoff) {
  using L = Loads<scalar_t, kVector>;
  using Raw = typename L::Raw;
  constexpr int kWidth = L::kWidth;
  RowScan<kSampling> state;
  state.key = key;
  state.temperature = temperature;
  state.cutoff = cutoff;

  // The head: elements before the first `Raw`-aligned one (none for scalars, logits being
  // element aligned), then whole loads, then the tail (< kWidth elements).  As kWidth divides
  // vocab, every row of the launch has the same head and tail.
  const auto misalignment = reinterpret_cast<uintptr_t>(logits) % sizeof(Raw);
  const int64_t head = min(
      misalignment == 0 ? int64_t{0} : int64_t((sizeof(Raw) - misalignment) / sizeof(scalar_t)),
      vocab);
  const int64_t loads = (vocab - head) / kWidth;
  const int64_t tail = head + loads * kWidth;
  const auto* body = reinterpret_cast<const Raw*>(logits + head);
  const auto scan_scalar = [&](int64_t v) {
    const float x[1] = {v == mask_id ? -INFINITY : load_logit(logits, v)};
    state.scan(x, v);
  };
  // The load holding the mask id, if any (-1 otherwise), and the mask id's lane in it.
  const bool mask_loaded = mask_id >= head && mask_id < tail;
  const int64_t mask_load = mask_loaded ? (mask_id - head) / kWidth : -1;
  const int mask_lane = mask_loaded ? static_cast<int>((mask_id - head) % kWidth) : 0;
  const auto scan_load = [&](Raw raw, int64_t i) {
    float x[kWidth];
    L::widen(raw, x);
    if (i == mask_load) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) x[j] = j == mask_lane ? -INFINITY : x[j];
    }
    state.scan(x, head + i * kWidth);
  };

  if (t < head) scan_scalar(t);
  // Sampling rows are bound by their float64 arithmetic, not by memory: no unrolling there
  // keeps the kernel within the registers of two blocks per SM.
  constexpr int kInFlight = kSampling ? 1 : kUnroll;
  int64_t i = t;
  for (; i + (kInFlight - 1) * threads < loads; i += kInFlight * threads) {
    Raw raw[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) raw[u] = __ldcs(body + i + u * threads);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) scan_load(raw[u], i + u * threads);
  }
  for (; i < loads; i += threads) scan_load(__ldcs(body + i), i);
  if (t < vocab - tail) scan_scalar(tail + t);
  return state;
}

template <class scalar_t>
__global__ void __launch_bounds__(kThreads, 2) predict_kernel(CommitLaunch args, int split) {
  const int64_t row = blockIdx.x / split;
  const int part = blockIdx.x % split;  // = the block's rank in its cluster
  const int64_t b = row / args.positions, i = row % args.positions;
  if (args.canvas[row] != args.mask_id) {  // the same for every block of the cluster
    if (part == 0 && threadIdx.x == 0) args.confidence[row] = INFINITY;
    return;
  }
  const scalar_t* logits = static_cast<const scalar_t*>(args.logits) + row * args.vocab;
  const double temperature = args.temperature[b];
  const double cutoff = args.cutoff[row];
  const bool sampling = temperature > 0;
  const uint32_t key = noise_row_key(args.seed[b], args.block_start[b] + i, args.step[b]);
  const int64_t t = static_cast<int64_t>(part) * kThreads + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(split) * kThreads;

  // 16-byte loads when their width divides the vocabulary (see the header), else scalars.
  const bool vector = args.vocab % Loads<scalar_t, true>::kWidth == 0;
  RowScan<true> state;
  if (sampling) {
    state = vector ? scan_row<true, true>(logits, args.vocab, args.mask_id, t, threads, key,
                                          temperature, cutoff)
                   : scan_row<true, false>(logits, args.vocab, args.mask_id, t, threads, key,
                                           temperature, cutoff);
  } else {
    state.soft = vector ? scan_row<false, true>(logits, args.vocab, args.mask_id, t, threads,
                                                key, temperature, cutoff).soft
                        : scan_row<false, false>(logits, args.vocab, args.mask_id, t, threads,
                                                 key, temperature, cutoff).soft;
  }
  Softmax soft = state.soft;
  Draw draw = state.draw;
  __shared__ Softmax soft_scratch[kWarps];
  __shared__ Draw draw_scratch[kWarps];
  soft = block_merge(soft, kNoSoftmax, soft_scratch);
  if (sampling) draw = block_merge(draw, kNoDraw, draw_scratch);

  if (split > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Block 0 of the cluster merges the other blocks' states, in rank order.
    __shared__ Softmax soft_result;
    __shared__ Draw draw_result;
    if (threadIdx.x == 0) soft_result = soft, draw_result = draw;
    const auto cluster = cooperative_groups::this_cluster();
    cluster.sync();
    if (part == 0 && threadIdx.x == 0) {
      for (int r = 1; r < split; ++r) {
        soft = merge(soft, *cluster.map_shared_rank(&soft_result, r));
        draw = merge(draw, *cluster.map_shared_rank(&draw_result, r));
      }
    }
    cluster.sync();  // keeps every block's shared memory alive until block 0 has read it
#else
    __trap();  // the launcher splits rows on sm_90 and later only
#endif
  }
  if (part == 0 && threadIdx.x == 0) {
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

// Blocks per row: on sm_90 (thread block clusters) enough that the rows fill the SMs, up to
// kMaxSplit; one block per row elsewhere.
int row_split(int64_t rows) {
  int device = 0, major = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1;  // the launch reports the error
  }
  if (major < 9) return 1;
  int split = 1;
  while (split < kMaxSplit && rows * split < sms) split *= 2;
  return split;
}

cudaError_t launch_predict(const CommitLaunch& args, int64_t rows, int split,
                           cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * split));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = split;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = split > 1 ? 1 : 0;
  if (args.logits_bf16) {
    return cudaLaunchKernelEx(&config, predict_kernel<__nv_bfloat16>, args, split);
  }
  return cudaLaunchKernelEx(&config, predict_kernel<float>, args, split);
}

}  // namespace

cudaError_t launch_commit_step(const CommitLaunch& args, cudaStream_t stream) {
  if (args.positions > kMaxPositions) return cudaErrorInvalidValue;
  const int64_t rows = args.batch * args.positions;
  if (rows == 0) return cudaSuccess;
  const cudaError_t predicted = launch_predict(args, rows, row_split(rows), stream);
  if (predicted != cudaSuccess) return predicted;
  select_kernel<<<args.batch, args.positions, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace twotower::commit
