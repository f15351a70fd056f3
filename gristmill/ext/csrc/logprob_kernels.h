// Launchers of the CUDA kernels of token_logprobs. Free of torch headers so that
// logprob_kernels.cu compiles with plain nvcc (the test suite checks that on
// machines with nvcc but a CPU-only torch).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gristmill {

// Element type of a logits matrix passed to launch_logprobs_from_logits.
enum class LogitDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Fold one fp32 tile of logits, rows x cols (row-major, row stride cols), holding
// tokens [row0, row0 + rows) and vocabulary [v0, v0 + cols), into the running
// maximum and sum of every token, and pick the target's logit if it lies in the
// tile. bias (fp32, indexed by vocabulary id) may be null.
void launch_online_lse_tile(const float* logits, int64_t rows, int64_t cols, int64_t row0,
                            int64_t v0, const float* bias, const int64_t* targets,
                            int64_t ignore_index, float* run_max, float* run_sum,
                            float* target_logit, cudaStream_t stream);

// out[i] = target_logit[i] - (run_max[i] + log run_sum[i]), or 0 where ignored.
void launch_finalize(const float* run_max, const float* run_sum, const float* target_logit,
                     const int64_t* targets, int64_t ignore_index, int64_t n, float* out,
                     cudaStream_t stream);

// log_softmax(logits).gather(targets) for an n x vocab row-major matrix.
void launch_logprobs_from_logits(const void* logits, LogitDtype dtype, int64_t n, int64_t vocab,
                                 const int64_t* targets, int64_t ignore_index, float* out,
                                 cudaStream_t stream);

}  // namespace gristmill
