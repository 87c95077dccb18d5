// Host launcher of the CUDA commit kernel (commit_cuda.cu).  Plain C++ and CUDA runtime types
// only, so the .cu file compiles without torch headers; the torch binding is
// commit_cuda_binding.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace twotower::commit {

// Device pointers of one commit step over `batch` canvases of `positions` tokens.  The per-row
// arguments are already in the dtypes the rule computes in (see commit.h: CommitArgs).
struct CommitLaunch {
  const void* logits;  // [batch, positions, vocab], float32 or bfloat16, contiguous
  bool logits_bf16;
  int64_t batch, positions, vocab, mask_id;
  const int64_t* canvas;           // [batch, positions]
  const float* threshold;          // [batch]
  const int64_t* step;             // [batch]
  const int64_t* steps_per_block;  // [batch]
  const double* temperature;       // [batch]
  const int64_t* seed;             // [batch]
  const int64_t* block_start;      // [batch]
  const double* cutoff;            // [batch, positions] (commit.py: sampling_cutoff)
  int64_t* tokens;                 // [batch, positions] scratch: each masked position's prediction
  int64_t* canvas_out;             // [batch, positions]
  int64_t* num_committed;          // [batch]
  float* confidence;               // [batch, positions]
};

// The largest canvas the selection kernel handles (one thread per position).
constexpr int64_t kMaxPositions = 1024;

cudaError_t launch_commit_step(const CommitLaunch& args, cudaStream_t stream);

}  // namespace twotower::commit
