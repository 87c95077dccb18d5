// Registers the `twotower` torch op library.  Every op of the extension is declared here (its
// schema); the implementations live in their own translation units, one per backend, and the
// fake (meta) implementations used for tracing in vllm_twotower/ops/{commit,moe,paged_attention}.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "version.h"

TORCH_LIBRARY(twotower, m) {
  m.def("version() -> int", &twotower::version);
  // vllm_twotower.commit.commit_step: one denoising step of the commit rule over [B, S] canvases.
  // Returns (canvas, num_committed, confidence).
  m.def(
      "commit_step(Tensor logits, Tensor canvas, int mask_id, Tensor threshold, Tensor step, "
      "Tensor steps_per_block, Tensor temperature, Tensor seed, Tensor block_start, Tensor cutoff) "
      "-> (Tensor, Tensor, Tensor)");
  // vllm_twotower.reference.moe.moe_forward: the whole MoE layer on [N, H] tokens.
  m.def(
      "moe_forward(Tensor hidden, Tensor gate_weight, Tensor correction_bias, Tensor up_weights, "
      "Tensor down_weights, Tensor? shared_up, Tensor? shared_down, int top_k, "
      "float routed_scaling_factor, bool norm_topk_prob, ScalarType router_dtype) -> Tensor");
  // vllm_twotower.ops.paged_attention.paged_block_attention: the denoiser's joint attention of
  // [R, S] block queries over each row's context in vLLM's paged cache plus its own block.
  m.def(
      "paged_block_attention(Tensor q, Tensor k, Tensor v, Tensor cache, Tensor block_table, "
      "Tensor kv_lens, Tensor block_lens, Tensor k_offsets, Tensor v_offsets, float scale, "
      "bool causal) -> Tensor");
}

// Importing `vllm_twotower._C` is what loads the library; the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
