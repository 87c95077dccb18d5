// CUDA binding of `twotower::moe_forward`: routing and permutation kernels (moe_cuda.cu) around
// per-expert ATen GEMMs (moe.h).  Compiled only in builds against a CUDA torch
// (TWOTOWER_WITH_CUDA).  The expert offsets are copied to the host to size the GEMMs; the
// grouped layout is the one vLLM's fused-experts kernels take, which replace that loop later.
#if defined(TWOTOWER_WITH_CUDA)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "moe.h"
#include "moe_cuda.h"

namespace twotower::moe {
namespace {

at::Tensor moe_forward_cuda(const at::Tensor& hidden_in, const at::Tensor& gate_weight,
                            const at::Tensor& correction_bias, const at::Tensor& up_weights,
                            const at::Tensor& down_weights,
                            const std::optional<at::Tensor>& shared_up,
                            const std::optional<at::Tensor>& shared_down, int64_t top_k,
                            double routed_scaling_factor, bool norm_topk_prob,
                            at::ScalarType router_dtype) {
  check_moe_args(hidden_in, up_weights, down_weights, shared_up, shared_down, top_k);
  TORCH_CHECK(router_dtype == at::kFloat || router_dtype == at::kDouble,
              "moe_forward: the CUDA router computes in float32 or float64");
  TORCH_CHECK(top_k <= kMaxTopK, "moe_forward: top_k above ", kMaxTopK, " on CUDA");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor hidden = hidden_in.contiguous();
  const int64_t tokens = hidden.size(0), experts = up_weights.size(0), pairs = tokens * top_k;
  const bool bf16 = hidden.scalar_type() == at::kBFloat16;

  const at::Tensor logits =
      at::mm(hidden.to(router_dtype), gate_weight.to(router_dtype).t()).contiguous();
  const at::Tensor bias = correction_bias.to(router_dtype).contiguous();
  const auto int_options = hidden.options().dtype(at::kInt);
  at::Tensor weights = at::empty({tokens, top_k}, hidden.options().dtype(at::kFloat));
  at::Tensor expert_ids = at::empty({tokens, top_k}, int_options);
  const RouteLaunch route{logits.const_data_ptr(),
                          bias.const_data_ptr(),
                          router_dtype == at::kDouble,
                          tokens,
                          experts,
                          top_k,
                          norm_topk_prob,
                          routed_scaling_factor,
                          weights.mutable_data_ptr<float>(),
                          expert_ids.mutable_data_ptr<int32_t>()};
  C10_CUDA_CHECK(launch_moe_route(route, stream));

  at::Tensor rank = at::empty({pairs}, int_options);
  at::Tensor offsets = at::empty({experts + 1}, int_options);
  at::Tensor row_of = at::empty({pairs}, int_options);
  at::Tensor token_of_row = at::empty({pairs}, int_options);
  C10_CUDA_CHECK(launch_moe_align(expert_ids.const_data_ptr<int32_t>(), pairs, experts, top_k,
                                  rank.mutable_data_ptr<int32_t>(),
                                  offsets.mutable_data_ptr<int32_t>(),
                                  row_of.mutable_data_ptr<int32_t>(),
                                  token_of_row.mutable_data_ptr<int32_t>(), stream));
  at::Tensor rows = at::empty({pairs, hidden.size(1)}, hidden.options());
  C10_CUDA_CHECK(launch_moe_permute(hidden.const_data_ptr(), bf16, hidden.size(1),
                                    token_of_row.const_data_ptr<int32_t>(), pairs,
                                    rows.mutable_data_ptr(), stream));

  const at::Tensor host_offsets = offsets.to(at::kCPU, at::kLong);
  const int64_t* o = host_offsets.const_data_ptr<int64_t>();
  const at::Tensor y =
      grouped_experts(rows, std::vector<int64_t>(o, o + experts + 1), up_weights, down_weights);
  at::Tensor shared;
  if (shared_up.has_value()) shared = relu2_mlp(hidden, *shared_up, *shared_down).contiguous();

  at::Tensor out = at::empty_like(hidden);
  C10_CUDA_CHECK(launch_moe_unpermute(
      y.const_data_ptr(), shared.defined() ? shared.const_data_ptr() : nullptr, bf16,
      weights.const_data_ptr<float>(), expert_ids.const_data_ptr<int32_t>(),
      row_of.const_data_ptr<int32_t>(), tokens, top_k, hidden.size(1), out.mutable_data_ptr(),
      stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CUDA, m) { m.impl("moe_forward", &moe_forward_cuda); }

}  // namespace twotower::moe
#endif  // TWOTOWER_WITH_CUDA
