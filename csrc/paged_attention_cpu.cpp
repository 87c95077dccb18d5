// CPU kernel of `twotower::paged_block_attention` (see paged_attention.h for the semantics).
//
// Replaces, for the denoiser's joint attention, a dense padded copy of every row's context
// (gathered per layer and pass) and one masked float32 SDPA over it.  One task per (row, kv
// head): the task's queries (S block positions × the query heads sharing the kv head, GQA) walk
// the row's context one kernel block at a time, the block's keys and values widened to float32
// into a small tile through the backend's offset maps (keys transposed, so that scores
// vectorise over keys), then the block's own keys; scores, running max, Σexp and the output
// accumulate in float32 (online softmax).  AVX2 + FMA with SLEEF's exp where the CPU has them.
// Reads each context K/V element once per pass; allocates only the tiles.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_simd.h"
#include "paged_attention_check.h"

namespace twotower::paged {
namespace {

constexpr int64_t kTileKeys = 256;

// The arithmetic of one tile, portable (ScalarOps) or AVX2 + FMA (Avx2Ops, cpu_simd.h): keys are
// staged transposed ([d, n], row stride `ld`) so that scores vectorise over keys.
struct ScalarOps {
  // s[j] = scale · Σ_c q[c] · kt[c·ld + j], j < n
  static inline void scores(const float* __restrict q, const float* __restrict kt, int64_t d,
                     int64_t n, int64_t ld, float scale, float* __restrict s) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
    for (int64_t c = 0; c < d; ++c) {
      const float qc = q[c];
      const float* row = kt + c * ld;
      for (int64_t j = 0; j < n; ++j) s[j] += qc * row[j];
    }
    for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  }
  // s[j] = exp(s[j] - shift); returns Σ s[j]
  static float exp_sum(float* s, int64_t n, float shift) {
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - shift));
    return total;
  }
  // a[c] = a[c] · decay + Σ_j p[j] · v[j·d + c]
  static inline void accumulate(float* __restrict a, float decay, const float* __restrict p,
                         const float* __restrict v, int64_t n, int64_t d) {
    for (int64_t c = 0; c < d; ++c) a[c] *= decay;
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0.f) continue;
      const float pj = p[j];
      const float* vj = v + j * d;
      for (int64_t c = 0; c < d; ++c) a[c] += pj * vj[c];
    }
  }
};

#if defined(TWOTOWER_X86_AVX2)
// ScalarOps' loops inlined into AVX2 + FMA functions (the compiler vectorises them for AVX2),
// and SLEEF's 8-wide exp.
struct Avx2Ops {
  TWOTOWER_AVX2 static void scores(const float* __restrict q, const float* __restrict kt,
                                   int64_t d, int64_t n, int64_t ld, float scale,
                                   float* __restrict s) {
    ScalarOps::scores(q, kt, d, n, ld, scale, s);  // inlined, vectorised for AVX2
  }
  TWOTOWER_AVX2 static float exp_sum(float* s, int64_t n, float shift) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), sh));
      _mm256_storeu_ps(s + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float total = 0.f;
    for (float x : lanes) total += x;
    for (; j < n; ++j) total += (s[j] = std::exp(s[j] - shift));
    return total;
  }
  TWOTOWER_AVX2 static void accumulate(float* __restrict a, float decay,
                                       const float* __restrict p, const float* __restrict v,
                                       int64_t n, int64_t d) {
    ScalarOps::accumulate(a, decay, p, v, n, d);  // inlined, vectorised for AVX2
  }
};
#endif

// Online-softmax state of a task's Q queries: running max, Σexp and float32 output rows.
struct SoftmaxState {
  std::vector<float> max, sum, acc;  // [Q], [Q], [Q, d]

  SoftmaxState(int64_t q, int64_t d)
      : max(q, -std::numeric_limits<float>::infinity()), sum(q, 0.f), acc(q * d, 0.f) {}

  // Folds query i's scores `s [n]` (-inf where masked; overwritten) over `values [n, d]` in.
  template <class Ops>
  void update(int64_t i, float* s, const float* values, int64_t n, int64_t d) {
    float tile_max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, s[j]);
    if (tile_max == -std::numeric_limits<float>::infinity()) return;
    const float new_max = std::max(max[i], tile_max);
    const float decay = std::exp(max[i] - new_max);
    sum[i] = sum[i] * decay + Ops::exp_sum(s, n, new_max);
    max[i] = new_max;
    Ops::accumulate(acc.data() + i * d, decay, s, values, n, d);
  }
};

template <typename scalar_t, class Ops>
void run(const PagedAttentionArgs& a) {
  const auto* q = static_cast<const scalar_t*>(a.q);
  const auto* k = static_cast<const scalar_t*>(a.k);
  const auto* v = static_cast<const scalar_t*>(a.v);
  const auto* cache = static_cast<const scalar_t*>(a.cache);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t d = a.head_dim, S = a.size, N = a.kernel_block_size;
  // Context keys per tile: whole kernel blocks, at least kTileKeys, so that per-tile work
  // (a call per query) is amortised over many keys whatever the backend's block size.
  const int64_t tile = N * std::max<int64_t>(1, kTileKeys / N), T = std::max(tile, S);
  const int64_t group = a.q_heads / a.kv_heads, Q = S * group;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, a.rows * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    // keys_t: [d, T] (transposed), values: [T, d], scores: [T]: 64 KiB at d = 32.
    std::vector<float> queries(Q * d), keys_t(d * T), values(T * d), scores(T);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / a.kv_heads, h = task % a.kv_heads;
      // Query i = s * group + g is block position s, query head h * group + g.
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t g = 0; g < group; ++g) {
          const scalar_t* src = q + ((r * S + s) * a.q_heads + h * group + g) * d;
          for (int64_t c = 0; c < d; ++c) queries[(s * group + g) * d + c] = float(src[c]);
        }
      }
      SoftmaxState state(Q, d);
      const int64_t kv_len = a.kv_lens[r];
      for (int64_t start = 0; start < kv_len; start += tile) {
        const int64_t n = std::min(tile, kv_len - start);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t p = start + j;
          const scalar_t* base = cache +
                                 a.block_table[r * a.table_width + p / N] * a.block_stride +
                                 h * a.head_stride;
          const int64_t* k_off = a.k_offsets + (p % N) * d;
          const int64_t* v_off = a.v_offsets + (p % N) * d;
          for (int64_t c = 0; c < d; ++c) {
            keys_t[c * T + j] = float(base[k_off[c]]);
            values[j * d + c] = float(base[v_off[c]]);
          }
        }
        for (int64_t i = 0; i < Q; ++i) {
          Ops::scores(queries.data() + i * d, keys_t.data(), d, n, T, a.scale, scores.data());
          state.template update<Ops>(i, scores.data(), values.data(), n, d);
        }
      }
      const int64_t block_len = a.block_lens[r];
      for (int64_t j = 0; j < S; ++j) {
        const int64_t at = ((r * S + j) * a.kv_heads + h) * d;
        for (int64_t c = 0; c < d; ++c) {
          keys_t[c * T + j] = float(k[at + c]);
          values[j * d + c] = float(v[at + c]);
        }
      }
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t s = i / group;
        Ops::scores(queries.data() + i * d, keys_t.data(), d, S, T, a.scale, scores.data());
        for (int64_t j = 0; j < S; ++j) {
          if (j >= block_len || (a.causal && j > s)) scores[j] = kNegInf;
        }
        state.template update<Ops>(i, scores.data(), values.data(), S, d);
      }
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t s = i / group, g = i % group;
        scalar_t* dst = out + ((r * S + s) * a.q_heads + h * group + g) * d;
        const float inv = 1.f / state.sum[i];
        for (int64_t c = 0; c < d; ++c) dst[c] = scalar_t(state.acc[i * d + c] * inv);
      }
    }
  });
}

template <typename scalar_t>
void dispatch(const PagedAttentionArgs& args) {
#if defined(TWOTOWER_X86_AVX2)
  if (cpu_has_avx2()) {
    run<scalar_t, Avx2Ops>(args);
    return;
  }
#endif
  run<scalar_t, ScalarOps>(args);
}

void launch_cpu(const PagedAttentionArgs& args, at::ScalarType type) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "paged_block_attention",
                                  [&] { dispatch<scalar_t>(args); });
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("paged_block_attention", &paged_block_attention<launch_cpu>);
}

}  // namespace twotower::paged
