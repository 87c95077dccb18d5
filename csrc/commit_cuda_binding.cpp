// CUDA binding of `twotower::commit_step` (kernels in commit_cuda.cu).  Compiled only in builds
// against a CUDA torch, where setup.py defines TWOTOWER_WITH_CUDA.
#if defined(TWOTOWER_WITH_CUDA)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "commit.h"
#include "commit_cuda.h"

namespace twotower::commit {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> commit_step_cuda(
    const at::Tensor& logits, const at::Tensor& canvas, int64_t mask_id,
    const at::Tensor& threshold, const at::Tensor& step, const at::Tensor& steps_per_block,
    const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& block_start,
    const at::Tensor& cutoff) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const CommitArgs a = prepare_commit_args(logits, canvas, mask_id, threshold, step,
                                           steps_per_block, temperature, seed, block_start,
                                           cutoff);
  TORCH_CHECK(a.positions <= kMaxPositions, "commit_step: at most ", kMaxPositions,
              " positions per canvas on CUDA");
  const at::Tensor tokens = at::empty_like(a.canvas);
  at::Tensor out = at::empty_like(a.canvas);
  at::Tensor committed = at::empty({a.batch}, a.canvas.options());
  at::Tensor confidence = at::empty({a.batch, a.positions}, a.logits.options().dtype(at::kFloat));
  const CommitLaunch launch{a.logits.const_data_ptr(),
                            a.logits.scalar_type() == at::kBFloat16,
                            a.batch,
                            a.positions,
                            a.vocab,
                            mask_id,
                            a.canvas.const_data_ptr<int64_t>(),
                            a.threshold.const_data_ptr<float>(),
                            a.step.const_data_ptr<int64_t>(),
                            a.steps_per_block.const_data_ptr<int64_t>(),
                            a.temperature.const_data_ptr<double>(),
                            a.seed.const_data_ptr<int64_t>(),
                            a.block_start.const_data_ptr<int64_t>(),
                            a.cutoff.const_data_ptr<double>(),
                            tokens.mutable_data_ptr<int64_t>(),
                            out.mutable_data_ptr<int64_t>(),
                            committed.mutable_data_ptr<int64_t>(),
                            confidence.mutable_data_ptr<float>()};
  C10_CUDA_CHECK(launch_commit_step(launch, c10::cuda::getCurrentCUDAStream()));
  return {out, committed, confidence};
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CUDA, m) { m.impl("commit_step", &commit_step_cuda); }

}  // namespace twotower::commit
#endif  // TWOTOWER_WITH_CUDA
