// CPU kernel of `twotower::moe_forward`: the Nemotron-H MoE layer (vllm_twotower/reference/moe.py).
//
// The reference groups tokens with one boolean mask, gather, two GEMMs, a multiply and an
// index_add per expert present (~10 small ops each); here the grouping is a counting sort done
// once, one gather permutes the tokens, the experts and the shared expert run in one parallel
// region writing into slices of shared buffers (run_tasks), and one parallel pass over the tokens
// un-permutes, weights, adds the shared expert and casts.  Contributions are summed per token in
// ascending expert id and then the shared expert, in float32, which is the reference's order
// (index_add per expert in `torch.unique` order, then `out += shared`), so results differ from
// the reference only by the GEMMs' blocking.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <utility>
#include <vector>

#include "moe.h"

namespace twotower::moe {
namespace {

// Routing exactly as the reference: the same ATen ops in the same dtype, so that expert choice
// (torch.topk's tie order included) and the float32 weights are bit-identical.
std::pair<at::Tensor, at::Tensor> route(const at::Tensor& hidden, const at::Tensor& gate_weight,
                                        const at::Tensor& correction_bias, int64_t top_k,
                                        double routed_scaling_factor, bool norm_topk_prob,
                                        at::ScalarType router_dtype) {
  const at::Tensor scores =
      at::sigmoid(at::mm(hidden.to(router_dtype), gate_weight.to(router_dtype).t()));
  const at::Tensor expert_ids =
      std::get<1>(at::topk(scores + correction_bias.to(router_dtype), top_k, -1, true, true));
  at::Tensor weights = scores.gather(-1, expert_ids);
  if (norm_topk_prob) weights = weights / weights.sum(-1, true);
  return {(weights * routed_scaling_factor).to(at::kFloat).contiguous(), expert_ids.contiguous()};
}

// Rows of one input through one relu² MLP: an expert's tokens, or a slice of all tokens for the
// shared expert.
struct MlpTask {
  at::Tensor rows, up, down, mid, out;
  int64_t cost;  // rows × width, proportional to the multiply-adds
};

// Below this many multiply-adds in a layer one thread does all the work: waking the intra-op
// team costs more than it saves, and much more when the cores are shared.
constexpr int64_t kParallelWork = int64_t{1} << 22;
// Rows of the shared expert per task, so that it spreads over the threads with the experts.
constexpr int64_t kSharedRowsPerTask = 32;

// Runs every task's GEMMs single-threaded, the tasks spread over the intra-op threads largest
// first from a shared queue.  One parallel region per layer instead of two multi-threaded GEMMs
// per expert, whose thread wake-ups dominate when an expert has a handful of tokens.  The
// workers take the caller's thread-local state (inference / grad mode, dispatch keys): the
// buffers are made under it, and in-place ops on inference tensors need it.
void run_tasks(std::vector<MlpTask>& tasks, int64_t hidden) {
  std::sort(tasks.begin(), tasks.end(),
            [](const MlpTask& a, const MlpTask& b) { return a.cost > b.cost; });
  const auto run = [&](size_t i) {
    relu2_mlp_into(tasks[i].rows, tasks[i].up, tasks[i].down, tasks[i].mid, tasks[i].out);
  };
  int64_t work = 0;
  for (const MlpTask& task : tasks) work += task.cost * hidden;
  if (work < kParallelWork || at::get_num_threads() == 1) {
    for (size_t i = 0; i < tasks.size(); ++i) run(i);
    return;
  }
  std::atomic<size_t> next{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(caller_state);
    for (size_t i = next++; i < tasks.size(); i = next++) run(i);
  });
}

// out[t] = Σ_j w[t, j] · y[row(t, j)] (ascending expert id) + shared[t], accumulated in float32.
template <class scalar_t>
void unpermute(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& expert_ids,
               const std::vector<int64_t>& row_of, const std::optional<at::Tensor>& shared,
               at::Tensor& out) {
  const int64_t tokens = out.size(0), hidden = out.size(1), top_k = weights.size(1);
  const scalar_t* y_p = y.const_data_ptr<scalar_t>();
  const scalar_t* shared_p = shared ? shared->const_data_ptr<scalar_t>() : nullptr;
  const float* w_p = weights.const_data_ptr<float>();
  const int64_t* e_p = expert_ids.const_data_ptr<int64_t>();
  scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
  // Grain: at least at::internal::GRAIN_SIZE output elements per task, so small batches stay on
  // one thread.
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(hidden);
    std::vector<int64_t> order(top_k);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < top_k; ++j) order[j] = t * top_k + j;
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return e_p[a] < e_p[b]; });
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const int64_t pair : order) {
        const float w = w_p[pair];
        const scalar_t* row = y_p + row_of[pair] * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<float>(row[h]) * w;
      }
      if (shared_p != nullptr) {
        const scalar_t* row = shared_p + t * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<float>(row[h]);
      }
      for (int64_t h = 0; h < hidden; ++h) out_p[t * hidden + h] = static_cast<scalar_t>(acc[h]);
    }
  });
}

at::Tensor moe_forward_cpu(const at::Tensor& hidden_in, const at::Tensor& gate_weight,
                           const at::Tensor& correction_bias, const at::Tensor& up_weights,
                           const at::Tensor& down_weights,
                           const std::optional<at::Tensor>& shared_up,
                           const std::optional<at::Tensor>& shared_down, int64_t top_k,
                           double routed_scaling_factor, bool norm_topk_prob,
                           at::ScalarType router_dtype) {
  check_moe_args(hidden_in, up_weights, down_weights, shared_up, shared_down, top_k);
  const at::Tensor hidden = hidden_in.contiguous();
  const int64_t tokens = hidden.size(0), experts = up_weights.size(0);
  auto [weights, expert_ids] = route(hidden, gate_weight, correction_bias, top_k,
                                     routed_scaling_factor, norm_topk_prob, router_dtype);

  // Counting sort of the (token, slot) pairs by expert; within an expert, token order.
  const int64_t pairs = tokens * top_k;
  const int64_t* e_p = expert_ids.const_data_ptr<int64_t>();
  std::vector<int64_t> offset(experts + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) ++offset[e_p[p] + 1];
  for (int64_t e = 0; e < experts; ++e) offset[e + 1] += offset[e];
  std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
  std::vector<int64_t> row_of(pairs);
  at::Tensor token_of_row = at::empty({pairs}, at::kLong);
  int64_t* tor_p = token_of_row.mutable_data_ptr<int64_t>();
  for (int64_t p = 0; p < pairs; ++p) {
    row_of[p] = fill[e_p[p]]++;
    tor_p[row_of[p]] = p / top_k;
  }

  const at::Tensor rows = hidden.index_select(0, token_of_row);
  const int64_t width = up_weights.size(1);
  at::Tensor mid = at::empty({pairs, width}, hidden.options());
  at::Tensor y = at::empty_like(rows);
  std::vector<MlpTask> tasks;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t begin = offset[e], count = offset[e + 1] - offset[e];
    if (count == 0) continue;
    tasks.push_back({rows.narrow(0, begin, count), up_weights[e], down_weights[e],
                     mid.narrow(0, begin, count), y.narrow(0, begin, count), count * width});
  }
  std::optional<at::Tensor> shared;
  at::Tensor shared_mid;
  if (shared_up.has_value()) {
    const int64_t shared_width = shared_up->size(0);
    shared = at::empty_like(hidden);
    shared_mid = at::empty({tokens, shared_width}, hidden.options());
    for (int64_t begin = 0; begin < tokens; begin += kSharedRowsPerTask) {
      const int64_t count = std::min(kSharedRowsPerTask, tokens - begin);
      tasks.push_back({hidden.narrow(0, begin, count), *shared_up, *shared_down,
                       shared_mid.narrow(0, begin, count), shared->narrow(0, begin, count),
                       count * shared_width});
    }
  }
  run_tasks(tasks, hidden.size(1));

  at::Tensor out = at::empty_like(hidden);
  if (hidden.scalar_type() == at::kFloat) {
    unpermute<float>(y, weights, expert_ids, row_of, shared, out);
  } else {
    unpermute<c10::BFloat16>(y, weights, expert_ids, row_of, shared, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("moe_forward", &moe_forward_cpu); }

}  // namespace twotower::moe
