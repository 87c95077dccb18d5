// CPU kernel of `twotower::commit_step`: one fused pass over each logit row, then the rule.
//
// Semantics are those of `vllm_twotower/commit.py::commit_step_torch` (see commit_rule.h).  The
// torch path makes ~10 passes over the [B, S, V] logits (float copy, clone, argmax, Gumbel noise
// for every row, logsumexp's max/sub/exp/sum, gather) and computes rows whose position is
// already decided; this kernel skips decided positions and streams every other row once:
// chunks of `kChunk` logits are staged in L1 (widened from bf16, mask id set to -inf), and the
// running max / argmax / sum of exp (online softmax) and, for sampling rows, the Gumbel-max draw
// are updated from the staged chunk, over the tokens whose tempered logit reaches the row's
// min_p / top_k / top_p cutoff (an input: commit.py's sampling_cutoff).
//
// The vector code is AVX2 + FMA, selected at run time, written with intrinsics (see cpu_simd.h
// for why not at::vec); the Gumbel noise uses SLEEF's float64 log, as torch's vectorised CPU
// kernels do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "commit.h"
#include "commit_rule.h"
#include "cpu_simd.h"


namespace twotower::commit {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Logits staged per chunk: 8 KiB of float32 stays in L1 while it is read 2-3 times.
constexpr int64_t kChunk = 2048;
constexpr int64_t kLanes = 8;

// The best Gumbel-perturbed logit seen so far in a row and its vocabulary id.
struct Draw {
  double value = -std::numeric_limits<double>::infinity();
  int64_t index = 0;
};

// Portable chunk primitives; `n` is a multiple of kLanes (staged chunks are padded with -inf).
struct ScalarOps {
  static void widen(const c10::BFloat16* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }

  static float max(const float* x, int64_t n) {
    float m = kNegInf;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    return m;
  }

  static double sum_exp(const float* x, int64_t n, float shift) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
    return s;
  }

  static Draw sample(const float* x, int64_t n, int64_t base, double temperature, double cutoff,
                     uint32_t key) {
    Draw best;
    for (int64_t i = 0; i < n; ++i) {
      const double tempered = static_cast<double>(x[i]) / temperature;
      if (!(tempered >= cutoff)) continue;  // filtered out by min_p / top_k / top_p
      const double u = noise_uniform(key, static_cast<uint32_t>(base + i));
      const double value = tempered - std::log(-std::log(u));
      if (value > best.value) best = {value, base + i};
    }
    return best;
  }
};

#if defined(TWOTOWER_X86_AVX2)

struct Avx2Ops {
  TWOTOWER_AVX2 static void widen(const c10::BFloat16* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(wide));
    }
    ScalarOps::widen(src + i, dst + i, n - i);
  }

  TWOTOWER_AVX2 static float max(const float* x, int64_t n) {
    __m256 m0 = _mm256_set1_ps(kNegInf);
    __m256 m1 = m0;
    int64_t i = 0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
      m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + kLanes));
    }
    if (i < n) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
    return *std::max_element(lanes, lanes + kLanes);
  }

  TWOTOWER_AVX2 static double sum_exp(const float* x, int64_t n, float shift) {
    const __m256 s = _mm256_set1_ps(shift);
    __m256 a0 = _mm256_setzero_ps();
    __m256 a1 = a0;
    int64_t i = 0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      a0 = _mm256_add_ps(a0, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), s)));
      a1 = _mm256_add_ps(a1, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), s)));
    }
    if (i < n) {
      a0 = _mm256_add_ps(a0, Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), s)));
    }
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
    double total = 0.0;
    for (float lane : lanes) total += lane;
    return total;
  }

  TWOTOWER_AVX2 static __m256i mix32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }

  // -log(-log(u)) for u = (bits + 0.5) * 2^-32 of four hashes (held as int32 biased by 2^31).
  TWOTOWER_AVX2 static __m256d gumbel(__m128i biased_bits) {
    const __m256d bits =
        _mm256_add_pd(_mm256_cvtepi32_pd(biased_bits), _mm256_set1_pd(2147483648.0));
    const __m256d u =
        _mm256_mul_pd(_mm256_add_pd(bits, _mm256_set1_pd(0.5)), _mm256_set1_pd(kInv2Pow32));
    const __m256d inner = _mm256_sub_pd(_mm256_setzero_pd(), Sleef_logd4_u10avx2(u));
    return _mm256_sub_pd(_mm256_setzero_pd(), Sleef_logd4_u10avx2(inner));
  }

  TWOTOWER_AVX2 static Draw sample(const float* x, int64_t n, int64_t base, double temperature,
                                   double cutoff, uint32_t key) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i golden = _mm256_set1_epi32(static_cast<int>(kGolden32));
    const __m256i keys = _mm256_set1_epi32(static_cast<int>(key));
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256d temp = _mm256_set1_pd(temperature);
    const __m256d floor = _mm256_set1_pd(cutoff);
    const __m256d minus_inf = _mm256_set1_pd(-std::numeric_limits<double>::infinity());
    const __m256d four = _mm256_set1_pd(4.0);
    __m256d best[2] = {_mm256_set1_pd(-std::numeric_limits<double>::infinity()),
                       _mm256_set1_pd(-std::numeric_limits<double>::infinity())};
    __m256d best_id[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
    __m256d id_lo = _mm256_setr_pd(base, base + 1, base + 2, base + 3);
    for (int64_t i = 0; i < n; i += kLanes) {
      const __m256i ids = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base + i)), lane);
      const __m256i hashed = mix32(_mm256_add_epi32(keys, _mm256_mullo_epi32(ids, golden)));
      const __m256i biased = _mm256_xor_si256(hashed, sign);
      const __m256d noise[2] = {gumbel(_mm256_castsi256_si128(biased)),
                                gumbel(_mm256_extracti128_si256(biased, 1))};
      const __m256d logit[2] = {_mm256_cvtps_pd(_mm_loadu_ps(x + i)),
                                _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4))};
      const __m256d id[2] = {id_lo, _mm256_add_pd(id_lo, four)};
      for (int h = 0; h < 2; ++h) {
        const __m256d tempered = _mm256_div_pd(logit[h], temp);
        const __m256d kept = _mm256_cmp_pd(tempered, floor, _CMP_GE_OQ);
        const __m256d value =
            _mm256_blendv_pd(minus_inf, _mm256_add_pd(tempered, noise[h]), kept);
        const __m256d better = _mm256_cmp_pd(value, best[h], _CMP_GT_OQ);
        best[h] = _mm256_blendv_pd(best[h], value, better);
        best_id[h] = _mm256_blendv_pd(best_id[h], id[h], better);
      }
      id_lo = _mm256_add_pd(id_lo, _mm256_set1_pd(kLanes));
    }
    // Each lane kept its first maximum; across lanes the lowest id wins a tie.
    alignas(32) double values[kLanes];
    alignas(32) double ids[kLanes];
    for (int h = 0; h < 2; ++h) {
      _mm256_store_pd(values + 4 * h, best[h]);
      _mm256_store_pd(ids + 4 * h, best_id[h]);
    }
    Draw out;
    for (int64_t l = 0; l < kLanes; ++l) {
      const auto id = static_cast<int64_t>(ids[l]);
      if (values[l] > out.value || (values[l] == out.value && id < out.index)) {
        out = {values[l], id};
      }
    }
    return out;
  }
};
#endif  // TWOTOWER_X86_AVX2

// Copies chunk `[begin, begin + n)` of a logit row into `buf` as float32, padded with -inf to a
// multiple of kLanes and with the mask id at -inf.  Full float32 chunks without the mask id are
// used in place.
template <class Ops, class scalar_t>
const float* stage(const scalar_t* row, int64_t begin, int64_t n, int64_t mask_id, float* buf,
                   int64_t* padded) {
  *padded = (n + kLanes - 1) / kLanes * kLanes;
  const bool has_mask = begin <= mask_id && mask_id < begin + n;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!has_mask && n == *padded) return row + begin;
    std::memcpy(buf, row + begin, n * sizeof(float));
  } else {
    Ops::widen(row + begin, buf, n);
  }
  std::fill(buf + n, buf + *padded, kNegInf);
  if (has_mask) buf[mask_id - begin] = kNegInf;
  return buf;
}

struct Prediction {
  int64_t token;
  float confidence;
};

// Prediction and untempered confidence of one logit row (commit.py: predict), reading it once.
template <class Ops, class scalar_t>
Prediction predict_row(const scalar_t* row, int64_t vocab, int64_t mask_id, double temperature,
                       double cutoff, uint32_t key) {
  alignas(64) float buf[kChunk];
  float run_max = kNegInf;
  int64_t argmax = 0;
  double sum = 0.0;  // Σ exp(x - run_max), rescaled whenever run_max grows
  Draw draw;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t n = std::min(kChunk, vocab - begin);
    int64_t padded = 0;
    const float* x = stage<Ops>(row, begin, n, mask_id, buf, &padded);
    const float chunk_max = Ops::max(x, padded);
    if (chunk_max > run_max) {  // strict: ties keep the earlier (lower) id, as argmax does
      if (run_max != kNegInf) sum *= std::exp(static_cast<double>(run_max) - chunk_max);
      run_max = chunk_max;
      argmax = begin + (std::find(x, x + n, chunk_max) - x);
    }
    if (run_max != kNegInf) sum += Ops::sum_exp(x, padded, run_max);
    if (temperature > 0) {
      const Draw chunk = Ops::sample(x, padded, begin, temperature, cutoff, key);
      if (chunk.value > draw.value) draw = chunk;
    }
  }
  const int64_t token = temperature > 0 ? draw.index : argmax;
  // Evaluated in float64 rather than as torch's float32 `exp(logit - logsumexp)`: rounding
  // log_z to float32 costs up to half an ulp of |log_z| (5e-7 relative at |log_z| ~ 10), which
  // the float64 form avoids, so the kernel is within that bound of the torch path.
  const double shifted = static_cast<double>(static_cast<float>(row[token])) - run_max;
  return {token, static_cast<float>(std::exp(shifted) / sum)};
}

template <class Ops, class scalar_t>
void predict_rows(const at::Tensor& logits, const std::vector<int64_t>& rows, int64_t mask_id,
                  const double* temperature, const double* cutoff, const uint32_t* keys,
                  int64_t positions, int64_t* tokens, float* confidence) {
  const auto* base = logits.const_data_ptr<scalar_t>();
  const int64_t vocab = logits.size(-1);
  const auto count = static_cast<int64_t>(rows.size());
  // Dynamic schedule: sampling rows cost several times a greedy row.  Small steps stay on one
  // thread: waking the team costs more than it saves below ~at::internal::GRAIN_SIZE logits.
  const bool parallel = count > 1 && count * vocab >= at::internal::GRAIN_SIZE;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (parallel)
  for (int64_t w = 0; w < count; ++w) {
    const int64_t r = rows[w];
    const Prediction p = predict_row<Ops>(base + r * vocab, vocab, mask_id,
                                          temperature[r / positions], cutoff[r], keys[r]);
    tokens[r] = p.token;
    confidence[r] = p.confidence;
  }
}

template <class scalar_t>
void predict_dispatch(const at::Tensor& logits, const std::vector<int64_t>& rows, int64_t mask_id,
                      const double* temperature, const double* cutoff, const uint32_t* keys,
                      int64_t positions, int64_t* tokens, float* confidence) {
#if defined(TWOTOWER_X86_AVX2)
  if (cpu_has_avx2()) {
    predict_rows<Avx2Ops, scalar_t>(logits, rows, mask_id, temperature, cutoff, keys, positions,
                                    tokens, confidence);
    return;
  }
#endif
  predict_rows<ScalarOps, scalar_t>(logits, rows, mask_id, temperature, cutoff, keys, positions,
                                    tokens, confidence);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> commit_step_cpu(
    const at::Tensor& logits_in, const at::Tensor& canvas_in, int64_t mask_id,
    const at::Tensor& threshold_in, const at::Tensor& step_in,
    const at::Tensor& steps_per_block_in, const at::Tensor& temperature_in,
    const at::Tensor& seed_in, const at::Tensor& block_start_in, const at::Tensor& cutoff_in) {
  const CommitArgs a =
      prepare_commit_args(logits_in, canvas_in, mask_id, threshold_in, step_in,
                          steps_per_block_in, temperature_in, seed_in, block_start_in, cutoff_in);
  const int64_t batch = a.batch, positions = a.positions;
  const int64_t* cv = a.canvas.const_data_ptr<int64_t>();
  const int64_t* seed = a.seed.const_data_ptr<int64_t>();
  const int64_t* block_start = a.block_start.const_data_ptr<int64_t>();
  const int64_t* step = a.step.const_data_ptr<int64_t>();
  const int64_t* steps_per_block = a.steps_per_block.const_data_ptr<int64_t>();
  const double* temp = a.temperature.const_data_ptr<double>();
  const double* cutoff = a.cutoff.const_data_ptr<double>();
  std::vector<int64_t> rows;
  std::vector<uint32_t> keys(batch * positions);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < positions; ++i) {
      const int64_t r = b * positions + i;
      if (cv[r] != mask_id) continue;
      rows.push_back(r);
      keys[r] = noise_row_key(seed[b], block_start[b] + i, step[b]);
    }
  }
  std::vector<int64_t> tokens(batch * positions);
  at::Tensor confidence =
      at::full({batch, positions}, std::numeric_limits<float>::infinity(), at::kFloat);
  float* conf = confidence.mutable_data_ptr<float>();
  if (a.logits.scalar_type() == at::kFloat) {
    predict_dispatch<float>(a.logits, rows, mask_id, temp, cutoff, keys.data(), positions,
                            tokens.data(), conf);
  } else {
    predict_dispatch<c10::BFloat16>(a.logits, rows, mask_id, temp, cutoff, keys.data(), positions,
                                    tokens.data(), conf);
  }

  at::Tensor out = a.canvas.clone();
  at::Tensor committed = at::zeros({batch}, at::kLong);
  int64_t* out_p = out.mutable_data_ptr<int64_t>();
  int64_t* committed_p = committed.mutable_data_ptr<int64_t>();
  const float* gamma = a.threshold.const_data_ptr<float>();
  auto masked = std::make_unique<bool[]>(positions);
  for (int64_t b = 0; b < batch; ++b) {
    const float* c = conf + b * positions;
    int64_t n = 0, confident = 0;
    for (int64_t i = 0; i < positions; ++i) {
      masked[i] = cv[b * positions + i] == mask_id;
      n += masked[i];
      confident += masked[i] && c[i] > gamma[b];
    }
    const int64_t k = num_to_commit(n, confident, step[b], steps_per_block[b]);
    for (int64_t i = 0; i < positions; ++i) {
      if (masked[i] && is_selected(c, masked.get(), positions, i, k)) {
        out_p[b * positions + i] = tokens[b * positions + i];
        ++committed_p[b];
      }
    }
  }
  return {out, committed, confidence};
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("commit_step", &commit_step_cpu); }

}  // namespace twotower::commit
