// CUDA binding of `twotower::paged_block_attention` (kernel in paged_attention_cuda.cu).
// Compiled only in builds against a CUDA torch (TWOTOWER_WITH_CUDA).
#if defined(TWOTOWER_WITH_CUDA)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "paged_attention_check.h"
#include "paged_attention_cuda.h"

namespace twotower::paged {
namespace {

at::Tensor paged_block_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& cache,
                                      const at::Tensor& block_table, const at::Tensor& kv_lens,
                                      const at::Tensor& block_lens, const at::Tensor& k_offsets,
                                      const at::Tensor& v_offsets, double scale, bool causal) {
  PagedAttentionArgs args;
  check_and_fill(q, k, v, cache, block_table, kv_lens, block_lens, k_offsets, v_offsets, scale,
                 causal, args);
  ElementType type;
  switch (q.scalar_type()) {
    case at::kFloat:
      type = ElementType::kFloat;
      break;
    case at::kBFloat16:
      type = ElementType::kBFloat16;
      break;
    case at::kHalf:
      type = ElementType::kHalf;
      break;
    default:
      TORCH_CHECK(false, "paged_block_attention: float32, bfloat16 or float16 on CUDA");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  args.out = out.mutable_data_ptr();
  C10_CUDA_CHECK(
      launch_paged_block_attention(args, type, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CUDA, m) {
  m.impl("paged_block_attention", &paged_block_attention_cuda);
}

}  // namespace twotower::paged
#endif  // TWOTOWER_WITH_CUDA
