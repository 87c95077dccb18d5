// CPU kernel of `twotower::paged_block_attention` (see paged_attention.h for the semantics).
//
// Replaces, for the denoiser's joint attention, a dense padded copy of every row's context
// (gathered per layer and pass) and one masked float32 SDPA over it.  One task per (row, kv
// head): the task's queries (S block positions × the query heads sharing the kv head, GQA) walk
// the row's context one kernel block at a time, the block's keys and values widened to float32
// into a small tile through the backend's offset maps, then the block's own keys; scores,
// running max, Σexp and the output accumulate in float32 (online softmax).  Reads each context
// K/V element once per pass; allocates only the tiles.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "paged_attention_check.h"

namespace twotower::paged {
namespace {

// Online-softmax state of a task's Q queries.
struct SoftmaxState {
  int64_t queries, dim;
  std::vector<float> max, sum, acc;  // [Q], [Q], [Q, d]

  SoftmaxState(int64_t q, int64_t d)
      : queries(q),
        dim(d),
        max(q, -std::numeric_limits<float>::infinity()),
        sum(q, 0.f),
        acc(q * d, 0.f) {}

  // Folds in one tile of `n` keys: `scores [Q, n]` (-inf where masked), `values [n, d]`.
  void update(std::vector<float>& scores, const std::vector<float>& values, int64_t n) {
    for (int64_t i = 0; i < queries; ++i) {
      float* s = scores.data() + i * n;
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, s[j]);
      if (tile_max == -std::numeric_limits<float>::infinity()) continue;
      const float new_max = std::max(max[i], tile_max);
      const float correction = std::exp(max[i] - new_max);
      float* a = acc.data() + i * dim;
      if (correction != 1.f) {
        for (int64_t c = 0; c < dim; ++c) a[c] *= correction;
      }
      float total = sum[i] * correction;
      for (int64_t j = 0; j < n; ++j) {
        const float p = std::exp(s[j] - new_max);
        total += p;
        if (p == 0.f) continue;
        const float* v = values.data() + j * dim;
        for (int64_t c = 0; c < dim; ++c) a[c] += p * v[c];
      }
      sum[i] = total;
      max[i] = new_max;
    }
  }
};

template <typename scalar_t>
void run(const PagedAttentionArgs& a) {
  const auto* q = static_cast<const scalar_t*>(a.q);
  const auto* k = static_cast<const scalar_t*>(a.k);
  const auto* v = static_cast<const scalar_t*>(a.v);
  const auto* cache = static_cast<const scalar_t*>(a.cache);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t d = a.head_dim, S = a.size, N = a.kernel_block_size;
  const int64_t group = a.q_heads / a.kv_heads, Q = S * group;
  at::parallel_for(0, a.rows * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(Q * d), keys(std::max(N, S) * d), values(std::max(N, S) * d);
    std::vector<float> scores(Q * std::max(N, S));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / a.kv_heads, h = task % a.kv_heads;
      // Query i = s * group + g is block position s, query head h * group + g.
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t g = 0; g < group; ++g) {
          const scalar_t* src = q + ((r * S + s) * a.q_heads + h * group + g) * d;
          for (int64_t c = 0; c < d; ++c) queries[(s * group + g) * d + c] = float(src[c]);
        }
      }
      auto score = [&](int64_t n, auto allowed) {
        for (int64_t i = 0; i < Q; ++i) {
          const float* qi = queries.data() + i * d;
          for (int64_t j = 0; j < n; ++j) {
            if (!allowed(i / group, j)) {
              scores[i * n + j] = -std::numeric_limits<float>::infinity();
              continue;
            }
            const float* kj = keys.data() + j * d;
            float dot = 0.f;
            for (int64_t c = 0; c < d; ++c) dot += qi[c] * kj[c];
            scores[i * n + j] = dot * a.scale;
          }
        }
      };
      SoftmaxState state(Q, d);
      const int64_t kv_len = a.kv_lens[r];
      for (int64_t start = 0; start < kv_len; start += N) {
        const int64_t n = std::min(N, kv_len - start);
        const scalar_t* base =
            cache + a.block_table[r * a.table_width + start / N] * a.block_stride +
            h * a.head_stride;
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t c = 0; c < d; ++c) {
            keys[j * d + c] = float(base[a.k_offsets[j * d + c]]);
            values[j * d + c] = float(base[a.v_offsets[j * d + c]]);
          }
        }
        score(n, [](int64_t, int64_t) { return true; });
        state.update(scores, values, n);
      }
      const int64_t block_len = a.block_lens[r];
      for (int64_t j = 0; j < S; ++j) {
        const int64_t at = ((r * S + j) * a.kv_heads + h) * d;
        for (int64_t c = 0; c < d; ++c) {
          keys[j * d + c] = float(k[at + c]);
          values[j * d + c] = float(v[at + c]);
        }
      }
      const bool causal = a.causal;
      score(S, [&](int64_t s, int64_t j) { return j < block_len && (!causal || j <= s); });
      state.update(scores, values, S);
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t s = i / group, g = i % group;
        scalar_t* dst = out + ((r * S + s) * a.q_heads + h * group + g) * d;
        const float inv = 1.f / state.sum[i];
        for (int64_t c = 0; c < d; ++c) dst[c] = scalar_t(state.acc[i * d + c] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor paged_block_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& cache,
                                     const at::Tensor& block_table, const at::Tensor& kv_lens,
                                     const at::Tensor& block_lens, const at::Tensor& k_offsets,
                                     const at::Tensor& v_offsets, double scale, bool causal) {
  PagedAttentionArgs args;
  check_and_fill(q, k, v, cache, block_table, kv_lens, block_lens, k_offsets, v_offsets, scale,
                 causal, args);
  at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  args.out = out.mutable_data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "paged_block_attention", [&] { run<scalar_t>(args); });
  return out;
}

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("paged_block_attention", &paged_block_attention_cpu);
}

}  // namespace twotower::paged
