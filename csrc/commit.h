// Argument checking and conversion shared by the CPU and CUDA bindings of `twotower::commit_step`.
#pragma once
#include <ATen/ATen.h>

namespace twotower::commit {

// The op's inputs, checked, contiguous, and in the dtypes the torch rule computes in: the
// threshold is compared in float32 (`threshold.to(confidence.dtype)`), the temperature divides
// float64 logits, the integer arguments are int64.  `cutoff` ([B, S] float64, commit.py:
// sampling_cutoff) is the smallest tempered logit a sampling position may draw.
struct CommitArgs {
  at::Tensor logits, canvas, threshold, step, steps_per_block, temperature, seed, block_start,
      cutoff;
  int64_t batch, positions, vocab;
};

inline CommitArgs prepare_commit_args(const at::Tensor& logits, const at::Tensor& canvas,
                                      int64_t mask_id, const at::Tensor& threshold,
                                      const at::Tensor& step, const at::Tensor& steps_per_block,
                                      const at::Tensor& temperature, const at::Tensor& seed,
                                      const at::Tensor& block_start, const at::Tensor& cutoff) {
  TORCH_CHECK(logits.dim() == 3, "commit_step: logits must be [B, S, V]");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "commit_step: logits must be float32 or bfloat16");
  const int64_t batch = logits.size(0), positions = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(canvas.sizes() == at::IntArrayRef({batch, positions}),
              "commit_step: canvas must be [B, S] matching logits");
  TORCH_CHECK(0 <= mask_id && mask_id < vocab, "commit_step: mask_id outside the vocabulary");
  CommitArgs args{logits.contiguous(),
                  canvas.to(at::kLong).contiguous(),
                  threshold.to(at::kFloat).contiguous(),
                  step.to(at::kLong).contiguous(),
                  steps_per_block.to(at::kLong).contiguous(),
                  temperature.to(at::kDouble).contiguous(),
                  seed.to(at::kLong).contiguous(),
                  block_start.to(at::kLong).contiguous(),
                  cutoff.to(at::kDouble).contiguous(),
                  batch,
                  positions,
                  vocab};
  for (const at::Tensor* t : {&args.threshold, &args.step, &args.steps_per_block,
                              &args.temperature, &args.seed, &args.block_start}) {
    TORCH_CHECK(t->numel() == batch, "commit_step: per-row arguments must have B elements");
    TORCH_CHECK(t->device() == logits.device(), "commit_step: all inputs on one device");
  }
  TORCH_CHECK(args.canvas.device() == logits.device(), "commit_step: all inputs on one device");
  TORCH_CHECK(args.cutoff.sizes() == at::IntArrayRef({batch, positions}),
              "commit_step: cutoff must be [B, S]");
  TORCH_CHECK(args.cutoff.device() == logits.device(), "commit_step: all inputs on one device");
  return args;
}

}  // namespace twotower::commit
