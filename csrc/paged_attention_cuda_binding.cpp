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

void launch_cuda(const PagedAttentionArgs& args, at::ScalarType dtype) {
  ElementType type;
  switch (dtype) {
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
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(args.device_index));
  C10_CUDA_CHECK(launch_paged_block_attention(args, type, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CUDA, m) {
  m.impl("paged_block_attention", &paged_block_attention<launch_cuda>);
}

}  // namespace twotower::paged
#endif  // TWOTOWER_WITH_CUDA
