// Pieces of `twotower::moe_forward` shared by the CPU and CUDA bindings: argument checks and the
// expert products on token rows already grouped by expert (ATen GEMMs, any device).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace twotower::moe {

inline void check_moe_args(const at::Tensor& hidden, const at::Tensor& up_weights,
                           const at::Tensor& down_weights,
                           const std::optional<at::Tensor>& shared_up,
                           const std::optional<at::Tensor>& shared_down, int64_t top_k) {
  TORCH_CHECK(hidden.dim() == 2, "moe_forward: hidden must be [N, H]");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16,
              "moe_forward: hidden must be float32 or bfloat16");
  TORCH_CHECK(up_weights.dim() == 3 && down_weights.dim() == 3 &&
                  up_weights.size(0) == down_weights.size(0) &&
                  up_weights.size(2) == hidden.size(1) && down_weights.size(1) == hidden.size(1) &&
                  down_weights.size(2) == up_weights.size(1),
              "moe_forward: up_weights must be [E, I, H] and down_weights [E, H, I]");
  TORCH_CHECK(up_weights.scalar_type() == hidden.scalar_type() &&
                  down_weights.scalar_type() == hidden.scalar_type(),
              "moe_forward: expert weights must have the dtype of hidden");
  TORCH_CHECK(shared_up.has_value() == shared_down.has_value(),
              "moe_forward: give both shared expert weights or neither");
  TORCH_CHECK(0 < top_k && top_k <= up_weights.size(0), "moe_forward: need 0 < top_k <= E");
}

// down(relu(up(x))²) of `rows` into `out`, with `mid` ([rows, I]) as the intermediate; weights in
// nn.Linear layout, computed in the dtype of the rows (reference.moe.expert_mlp).
inline void relu2_mlp_into(const at::Tensor& rows, const at::Tensor& up, const at::Tensor& down,
                           at::Tensor& mid, at::Tensor& out) {
  at::mm_out(mid, rows, up.t());
  mid.relu_().square_();
  at::mm_out(out, mid, down.t());
}

inline at::Tensor relu2_mlp(const at::Tensor& x, const at::Tensor& up, const at::Tensor& down) {
  at::Tensor mid = at::empty({x.size(0), up.size(0)}, x.options());
  at::Tensor out = at::empty({x.size(0), down.size(0)}, x.options());
  relu2_mlp_into(x, up, down, mid, out);
  return out;
}

// Every expert's MLP on its rows of `rows` ([P, H], grouped by expert: expert e owns rows
// [offset[e], offset[e + 1])), one GEMM pair per expert present, in order (for accelerators,
// where the launches queue on one stream; the CPU binding schedules them itself).
inline at::Tensor grouped_experts(const at::Tensor& rows, const std::vector<int64_t>& offset,
                                  const at::Tensor& up_weights, const at::Tensor& down_weights) {
  at::Tensor mid = at::empty({rows.size(0), up_weights.size(1)}, rows.options());
  at::Tensor out = at::empty({rows.size(0), down_weights.size(1)}, rows.options());
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(offset.size()); ++e) {
    const int64_t count = offset[e + 1] - offset[e];
    if (count == 0) continue;
    at::Tensor mid_e = mid.narrow(0, offset[e], count);
    at::Tensor out_e = out.narrow(0, offset[e], count);
    relu2_mlp_into(rows.narrow(0, offset[e], count), up_weights[e], down_weights[e], mid_e, out_e);
  }
  return out;
}

}  // namespace twotower::moe
