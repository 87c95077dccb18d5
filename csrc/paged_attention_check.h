// Argument checks and the op body of `twotower::paged_block_attention`, shared by the CPU and
// CUDA bindings.
// The Python wrapper (vllm_twotower/ops/paged_attention.py) passes contiguous q/k/v and int64
// index tensors; anything else is refused here rather than read wrongly.
#pragma once
#include <ATen/ATen.h>

#include "paged_attention.h"

namespace twotower::paged {

inline void check_and_fill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cache, const at::Tensor& block_table,
                           const at::Tensor& kv_lens, const at::Tensor& block_lens,
                           const at::Tensor& k_offsets, const at::Tensor& v_offsets,
                           double scale, bool causal, PagedAttentionArgs& args) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "paged_block_attention: q, k, v must be [R, S, heads, head_dim]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "paged_block_attention: q, k, v must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              "paged_block_attention: k and v must be [R, S, kv_heads, head_dim] like q");
  TORCH_CHECK(q.size(2) % k.size(2) == 0,
              "paged_block_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "paged_block_attention: head_dim above ", kMaxHeadDim);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  cache.scalar_type() == q.scalar_type(),
              "paged_block_attention: q, k, v and the cache must share a dtype");
  TORCH_CHECK(cache.dim() == 4, "paged_block_attention: cache must be a [B, H, N, C] view");
  TORCH_CHECK(cache.size(1) == k.size(2),
              "paged_block_attention: the cache's head axis must be the kv heads");
  const int64_t rows = q.size(0);
  for (const at::Tensor* t : {&block_table, &kv_lens, &block_lens, &k_offsets, &v_offsets}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() &&
                    t->device() == q.device(),
                "paged_block_attention: index tensors must be contiguous int64 on q's device");
  }
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == rows && kv_lens.numel() == rows &&
                  block_lens.numel() == rows,
              "paged_block_attention: block_table [R, M], kv_lens [R], block_lens [R]");
  TORCH_CHECK(k_offsets.dim() == 2 && k_offsets.sizes() == v_offsets.sizes() &&
                  k_offsets.size(1) == q.size(3),
              "paged_block_attention: offsets must be [kernel_block_size, head_dim]");
  TORCH_CHECK(cache.device() == q.device(), "paged_block_attention: cache on another device");
  args.q = q.const_data_ptr();
  args.k = k.const_data_ptr();
  args.v = v.const_data_ptr();
  args.cache = cache.const_data_ptr();
  args.block_table = block_table.const_data_ptr<int64_t>();
  args.kv_lens = kv_lens.const_data_ptr<int64_t>();
  args.block_lens = block_lens.const_data_ptr<int64_t>();
  args.k_offsets = k_offsets.const_data_ptr<int64_t>();
  args.v_offsets = v_offsets.const_data_ptr<int64_t>();
  args.out = nullptr;
  args.rows = rows;
  args.size = q.size(1);
  args.q_heads = q.size(2);
  args.kv_heads = k.size(2);
  args.head_dim = q.size(3);
  args.kernel_block_size = k_offsets.size(0);
  args.table_width = block_table.size(1);
  args.block_stride = cache.stride(0);
  args.head_stride = cache.stride(1);
  args.scale = static_cast<float>(scale);
  args.causal = causal;
  args.device_index = q.device().index();
}

// The op for both backends: checks the arguments, allocates the output and hands the filled
// arguments to `Launch(args, dtype)` (the CPU loop or the CUDA launcher).
template <void (*Launch)(const PagedAttentionArgs&, at::ScalarType)>
at::Tensor paged_block_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cache, const at::Tensor& block_table,
                                 const at::Tensor& kv_lens, const at::Tensor& block_lens,
                                 const at::Tensor& k_offsets, const at::Tensor& v_offsets,
                                 double scale, bool causal) {
  PagedAttentionArgs args;
  check_and_fill(q, k, v, cache, block_table, kv_lens, block_lens, k_offsets, v_offsets, scale,
                 causal, args);
  at::Tensor out = at::empty(q.sizes(), q.options());
  args.out = out.mutable_data_ptr();
  Launch(args, q.scalar_type());
  return out;
}

}  // namespace twotower::paged
