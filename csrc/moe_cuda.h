// Host launchers of the CUDA MoE routing and permutation kernels (moe_cuda.cu).  Plain C++ and
// CUDA runtime types only, so the .cu file compiles without torch headers.
//
// Layout produced for the expert GEMMs (the shape vLLM's fused-experts kernels consume): the
// N·k (token, slot) pairs are grouped by expert, token order inside an expert; `offsets[e]` is
// the first row of expert e (offsets[E] = N·k), `token_of_row[row]` the token a row reads
// (vLLM's sorted_token_ids) and `row_of[pair]` the row holding pair `token * k + slot`.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace twotower::moe {

// Largest top_k the routing and un-permutation kernels support (per-token state in registers).
constexpr int64_t kMaxTopK = 32;

struct RouteLaunch {
  const void* router_logits;  // [tokens, experts] float32, or float64 when router_double
  const void* correction_bias;  // [experts], dtype of the logits
  bool router_double;
  int64_t tokens, experts, top_k;
  bool norm_topk_prob;
  double routed_scaling_factor;
  float* weights;      // [tokens, top_k] out
  int32_t* expert_ids;  // [tokens, top_k] out, descending biased score, ties to the lower id
};

cudaError_t launch_moe_route(const RouteLaunch& args, cudaStream_t stream);

// Groups the pairs by expert.  `rank` is [pairs] scratch, `offsets` [experts + 1].
cudaError_t launch_moe_align(const int32_t* expert_ids, int64_t pairs, int64_t experts,
                             int64_t top_k, int32_t* rank, int32_t* offsets, int32_t* row_of,
                             int32_t* token_of_row, cudaStream_t stream);

// rows[r] = hidden[token_of_row[r]] for r < pairs; float32 or bfloat16 rows of `hidden_size`.
cudaError_t launch_moe_permute(const void* hidden, bool bf16, int64_t hidden_size,
                               const int32_t* token_of_row, int64_t pairs, void* rows,
                               cudaStream_t stream);

// out[t] = Σ_slot weights[t, slot] · expert_out[row_of[t·k + slot]] (ascending expert id)
//          + shared_out[t] (when not null), accumulated in float32.
cudaError_t launch_moe_unpermute(const void* expert_out, const void* shared_out, bool bf16,
                                 const float* weights, const int32_t* expert_ids,
                                 const int32_t* row_of, int64_t tokens, int64_t top_k,
                                 int64_t hidden_size, void* out, cudaStream_t stream);

}  // namespace twotower::moe
