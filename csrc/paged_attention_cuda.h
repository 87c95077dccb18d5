// Host launcher of the CUDA `twotower::paged_block_attention` kernel (paged_attention_cuda.cu).
// Plain C++ and CUDA runtime types only, so the .cu file compiles without torch headers.
#pragma once
#include <cuda_runtime_api.h>

#include "paged_attention.h"

namespace twotower::paged {

enum class ElementType { kFloat, kBFloat16, kHalf };

cudaError_t launch_paged_block_attention(const PagedAttentionArgs& args, ElementType type,
                                         cudaStream_t stream);

}  // namespace twotower::paged
