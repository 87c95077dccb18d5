// Arguments of `twotower::paged_block_attention`, shared by the CPU and CUDA implementations.
// Plain C++ only, so the .cu file compiles without torch headers.
//
// The op: every row's block of S queries attends, without a mask inside the block (or causally
// when `causal`), to the row's first kv_len context keys/values where vLLM's paged cache keeps
// them, then to the first block_len keys/values of its own block.  Context element (p, c) of kv
// head h lives at
//     cache + block_table[r][p / N] * block_stride + h * head_stride + offsets[p % N][c]
// with N = kernel block size; `offsets` (K and V) encode the backend's block interior (the CPU
// backend's ISA-specific order, or a dense [N, K|V] view's strides).  Scores and the softmax are
// accumulated in float32 (online softmax, one kernel block of keys at a time).
#pragma once
#include <cstdint>

namespace twotower::paged {

struct PagedAttentionArgs {
  const void* q;        // [R, S, nq, d]
  const void* k;        // [R, S, nkv, d], the block's own keys
  const void* v;        // [R, S, nkv, d]
  const void* cache;    // base of the layer's cache view, element type of q
  const int64_t* block_table;  // [R, table_width] kernel block ids
  const int64_t* kv_lens;      // [R]
  const int64_t* block_lens;   // [R]
  const int64_t* k_offsets;    // [N, d]
  const int64_t* v_offsets;    // [N, d]
  void* out;            // [R, S, nq, d]
  int64_t rows, size, q_heads, kv_heads, head_dim, kernel_block_size, table_width;
  int64_t block_stride, head_stride;  // elements
  float scale;
  bool causal;
  int device_index;  // of q (CUDA: the launch's device)
};

// Largest head_dim the kernels keep in registers / stack buffers.
constexpr int64_t kMaxHeadDim = 256;

}  // namespace twotower::paged
