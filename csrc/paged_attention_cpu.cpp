// CPU kernel of `twotower::paged_block_attention` (see paged_attention.h for the semantics).
//
// Replaces, for the denoiser's joint attention, a dense padded copy of every row's context
// (gathered per layer and pass) and one masked float32 SDPA over it.  One task per (row, kv
// head).  A block's Q = S positions × GQA group queries share every key of the task, so each
// loaded key serves all Q of them: the task walks the row's context one tile (whole kernel
// blocks) at a time, widens the tile's keys and values to float32 through the backend's offset
// maps, and computes, with the queries along the vector lanes (transposed, padded to kLanes),
//   scores   Sᵀ[j, i] = Σ_c K[j, c] · Qᵀ[c, i]          (a [tile, d] × [d, Q] product)
//   softmax  per query lane: running max, Σexp (online softmax, vectorised over queries)
//   output   Oᵀ[c, i] = Oᵀ[c, i] · decay[i] + Σ_j V[j, c] · Pᵀ[j, i]   ([d, tile] × [tile, Q])
// then the block's own keys likewise (masked).  Both products run one register-blocked
// micro-kernel: kRows output rows × kLanes queries of accumulators stay in registers while the
// reduction streams, so one broadcast element of K (or V) feeds kLanes queries and one loaded
// query (or weight) vector feeds kRows keys (or channels).  AVX2 + FMA with SLEEF's exp where
// the CPU has them; everything accumulates in float32.  Reads each context K/V element once per
// pass; allocates only the tiles.
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

constexpr int64_t kLanes = 16;  // queries per micro-kernel: two AVX2 vectors
constexpr int64_t kRows = 6;    // output rows per micro-kernel: 12 accumulators + 2 + 1 in use
// Float32 working set of one tile (K, V and the scores), sized for a core's L2 so that the
// products re-read it from there rather than memory.
constexpr int64_t kTileBytes = 256 * 1024;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The arithmetic of a tile, portable (ScalarOps) or AVX2 + FMA (Avx2Ops, cpu_simd.h).
//   block:   C[r·ldc + i] (+)= Σ_k A[r·sa + k·sk] · B[k·ldb + i],  r < rows ≤ kRows, i < kLanes
//   softmax: the online-softmax step of `lanes` query lanes (a multiple of 8) over the scores
//            s[j·ld + i], j < n: updates max and sum, overwrites s with exp(s − max), and
//            writes each lane's decay exp(old max − new max) (0 where nothing was seen yet).
struct ScalarOps {
  static void block(int64_t rows, const float* a, int64_t sa, int64_t sk, const float* b,
                    int64_t ldb, int64_t depth, float* c, int64_t ldc, bool accumulate) {
    float acc[kRows][kLanes];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < kLanes; ++i) acc[r][i] = accumulate ? c[r * ldc + i] : 0.f;
    }
    for (int64_t k = 0; k < depth; ++k) {
      const float* bk = b + k * ldb;
      for (int64_t r = 0; r < rows; ++r) {
        const float ar = a[r * sa + k * sk];
        for (int64_t i = 0; i < kLanes; ++i) acc[r][i] += ar * bk[i];
      }
    }
    for (int64_t r = 0; r < rows; ++r) std::copy(acc[r], acc[r] + kLanes, c + r * ldc);
  }

  static void softmax(float* s, int64_t n, int64_t lanes, int64_t ld, float* max, float* sum,
                      float* decay) {
    for (int64_t i = 0; i < lanes; ++i) {
      float m = max[i];
      for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j * ld + i]);
      const float shift = m == kNegInf ? 0.f : m;
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += (s[j * ld + i] = std::exp(s[j * ld + i] - shift));
      decay[i] = std::exp(max[i] - shift);
      sum[i] = sum[i] * decay[i] + total;
      max[i] = m;
    }
  }
};

#if defined(TWOTOWER_X86_AVX2)
struct Avx2Ops {
  template <int R>
  TWOTOWER_AVX2 static void tile(const float* a, int64_t sa, int64_t sk, const float* b,
                                 int64_t ldb, int64_t depth, float* c, int64_t ldc,
                                 bool accumulate) {
    __m256 lo[R], hi[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      lo[r] = accumulate ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
      hi[r] = accumulate ? _mm256_loadu_ps(c + r * ldc + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < depth; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
      const float* ak = a + k * sk;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 ar = _mm256_broadcast_ss(ak + r * sa);
        lo[r] = _mm256_fmadd_ps(ar, b0, lo[r]);
        hi[r] = _mm256_fmadd_ps(ar, b1, hi[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(c + r * ldc, lo[r]);
      _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
    }
  }

  static void block(int64_t rows, const float* a, int64_t sa, int64_t sk, const float* b,
                    int64_t ldb, int64_t depth, float* c, int64_t ldc, bool accumulate) {
    static_assert(kRows == 6 && kLanes == 16, "Avx2Ops::block's cases and vectors");
    switch (rows) {
      case 6: return tile<6>(a, sa, sk, b, ldb, depth, c, ldc, accumulate);
      case 5: return tile<5>(a, sa, sk, b, ldb, depth, c, ldc, accumulate);
      case 4: return tile<4>(a, sa, sk, b, ldb, depth, c, ldc, accumulate);
      case 3: return tile<3>(a, sa, sk, b, ldb, depth, c, ldc, accumulate);
      case 2: return tile<2>(a, sa, sk, b, ldb, depth, c, ldc, accumulate);
      default: return tile<1>(a, sa, sk, b, ldb, depth, c, ldc, accumulate);
    }
  }

  TWOTOWER_AVX2 static void softmax(float* s, int64_t n, int64_t lanes, int64_t ld, float* max,
                                    float* sum, float* decay) {
    const __m256 neg_inf = _mm256_set1_ps(kNegInf), zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < lanes; i += 8) {
      const __m256 old = _mm256_loadu_ps(max + i);
      __m256 m = old;
      for (int64_t j = 0; j < n; ++j) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j * ld + i));
      const __m256 shift = _mm256_blendv_ps(m, zero, _mm256_cmp_ps(m, neg_inf, _CMP_EQ_OQ));
      __m256 total = zero;
      for (int64_t j = 0; j < n; ++j) {
        const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j * ld + i), shift));
        _mm256_storeu_ps(s + j * ld + i, e);
        total = _mm256_add_ps(total, e);
      }
      const __m256 d = Sleef_expf8_u10avx2(_mm256_sub_ps(old, shift));
      _mm256_storeu_ps(decay + i, d);
      _mm256_storeu_ps(sum + i, _mm256_fmadd_ps(_mm256_loadu_ps(sum + i), d, total));
      _mm256_storeu_ps(max + i, m);
    }
  }
};
#endif

// C[r·ldc + i] (+)= Σ_k A[r·sa + k·sk] · B[k·ldb + i] for r < rows, i < lanes (a multiple of
// kLanes), in micro-kernel blocks: lane strips outside, so a strip of B stays in L1 while A
// streams past it.
template <class Ops>
void product(const float* a, int64_t sa, int64_t sk, int64_t rows, const float* b, int64_t ldb,
             int64_t depth, int64_t lanes, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < lanes; i += kLanes) {
    for (int64_t r = 0; r < rows; r += kRows) {
      Ops::block(std::min(kRows, rows - r), a + r * sa, sa, sk, b + i, ldb, depth, c + r * ldc + i,
                 ldc, accumulate);
    }
  }
}

// How an offset map [N, d] lays a kernel block's K or V out, so that a tile is staged with
// contiguous copies where it can be: token rows of d contiguous channels (dense [N, K|V] views,
// the CPU backend's values), channel columns of N contiguous tokens (the CPU backend's keys), or
// neither (an element gather).
enum class Interior { kRows, kColumns, kScattered };

Interior classify(const int64_t* off, int64_t n, int64_t d) {
  bool rows = true, columns = true;
  for (int64_t p = 0; p < n; ++p) {
    for (int64_t c = 0; c < d; ++c) {
      rows = rows && off[p * d + c] == off[p * d] + c;
      columns = columns && off[p * d + c] == off[c] + p;
    }
  }
  return rows ? Interior::kRows : columns ? Interior::kColumns : Interior::kScattered;
}

// A tile staged in float32, row-major [tile, d] (element (j, c) at j·d + c) or, for kColumns,
// channel-major [d, tile] (at c·tile + j): the products read it through `row` and `col` strides.
struct Staged {
  std::vector<float> data;
  int64_t row, col;  // strides of the key index j and the channel c
};

template <typename scalar_t>
void stage_block(const scalar_t* base, const int64_t* off, Interior interior, int64_t tokens,
                 int64_t d, int64_t first, Staged& dst) {
  float* out = dst.data.data() + first * dst.row;
  switch (interior) {
    case Interior::kRows:
      for (int64_t p = 0; p < tokens; ++p) {
        const scalar_t* src = base + off[p * d];
        for (int64_t c = 0; c < d; ++c) out[p * dst.row + c] = float(src[c]);
      }
      break;
    case Interior::kColumns:
      for (int64_t c = 0; c < d; ++c) {
        const scalar_t* src = base + off[c];
        for (int64_t p = 0; p < tokens; ++p) out[c * dst.col + p] = float(src[p]);
      }
      break;
    case Interior::kScattered:
      for (int64_t p = 0; p < tokens; ++p) {
        for (int64_t c = 0; c < d; ++c) out[p * dst.row + c * dst.col] = float(base[off[p * d + c]]);
      }
      break;
  }
}

template <typename scalar_t, class Ops>
void run(const PagedAttentionArgs& a) {
  const auto* q = static_cast<const scalar_t*>(a.q);
  const auto* k = static_cast<const scalar_t*>(a.k);
  const auto* v = static_cast<const scalar_t*>(a.v);
  const auto* cache = static_cast<const scalar_t*>(a.cache);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t d = a.head_dim, S = a.size, N = a.kernel_block_size;
  const int64_t group = a.q_heads / a.kv_heads, Q = S * group;
  const int64_t lanes = (Q + kLanes - 1) / kLanes * kLanes;  // padded with zero queries
  // Context keys per tile: whole kernel blocks, as many as fit kTileBytes of float32 K, V and
  // scores (at least one block), so that per-tile work is amortised over many keys.
  const int64_t per_key = (2 * d + lanes) * int64_t(sizeof(float));
  const int64_t tile = N * std::max<int64_t>(1, kTileBytes / per_key / N), T = std::max(tile, S);
  const Interior k_interior = classify(a.k_offsets, N, d);
  const Interior v_interior = classify(a.v_offsets, N, d);
  at::parallel_for(0, a.rows * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    // Queries and output transposed ([d, lanes]); scores [T, lanes]; K, V tiles.
    std::vector<float> queries(d * lanes), acc(d * lanes), scores(T * lanes);
    std::vector<float> max(lanes), sum(lanes), decay(lanes);
    auto layout = [&](Interior interior) {
      return interior == Interior::kColumns ? Staged{std::vector<float>(T * d), 1, T}
                                            : Staged{std::vector<float>(T * d), d, 1};
    };
    Staged keys = layout(k_interior), values = layout(v_interior);
    Staged block_keys{std::vector<float>(S * d), d, 1}, block_values = block_keys;
    // One tile's step: scores, online softmax, output.  Masking (block keys) happens in between.
    auto scores_of = [&](const Staged& kt, int64_t n) {
      product<Ops>(kt.data.data(), kt.row, kt.col, n, queries.data(), lanes, d, lanes,
                   scores.data(), lanes, false);
    };
    auto fold = [&](const Staged& vt, int64_t n) {
      Ops::softmax(scores.data(), n, lanes, lanes, max.data(), sum.data(), decay.data());
      for (int64_t c = 0; c < d; ++c) {
        for (int64_t i = 0; i < lanes; ++i) acc[c * lanes + i] *= decay[i];
      }
      product<Ops>(vt.data.data(), vt.col, vt.row, d, scores.data(), lanes, n, lanes, acc.data(),
                   lanes, true);
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / a.kv_heads, h = task % a.kv_heads;
      // Query i = s · group + g is block position s, query head h · group + g; scaled here so
      // that the scores need no second pass.
      std::fill(queries.begin(), queries.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t g = 0; g < group; ++g) {
          const scalar_t* src = q + ((r * S + s) * a.q_heads + h * group + g) * d;
          for (int64_t c = 0; c < d; ++c) {
            queries[c * lanes + s * group + g] = float(src[c]) * a.scale;
          }
        }
      }
      std::fill(max.begin(), max.end(), kNegInf);
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t kv_len = a.kv_lens[r];
      for (int64_t start = 0; start < kv_len; start += tile) {
        const int64_t n = std::min(tile, kv_len - start);
        for (int64_t first = 0; first < n; first += N) {
          const int64_t p = start + first, tokens = std::min(N, n - first);
          const scalar_t* base = cache +
                                 a.block_table[r * a.table_width + p / N] * a.block_stride +
                                 h * a.head_stride;
          stage_block(base, a.k_offsets, k_interior, tokens, d, first, keys);
          stage_block(base, a.v_offsets, v_interior, tokens, d, first, values);
        }
        scores_of(keys, n);
        fold(values, n);
      }
      for (int64_t j = 0; j < S; ++j) {
        const int64_t at = ((r * S + j) * a.kv_heads + h) * d;
        for (int64_t c = 0; c < d; ++c) {
          block_keys.data[j * d + c] = float(k[at + c]);
          block_values.data[j * d + c] = float(v[at + c]);
        }
      }
      scores_of(block_keys, S);
      const int64_t block_len = a.block_lens[r];
      for (int64_t j = 0; j < S; ++j) {
        for (int64_t i = 0; i < Q; ++i) {
          if (j >= block_len || (a.causal && j > i / group)) scores[j * lanes + i] = kNegInf;
        }
      }
      fold(block_values, S);
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t s = i / group, g = i % group;
        scalar_t* dst = out + ((r * S + s) * a.q_heads + h * group + g) * d;
        const float inv = 1.f / sum[i];
        for (int64_t c = 0; c < d; ++c) dst[c] = scalar_t(acc[c * lanes + i] * inv);
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
