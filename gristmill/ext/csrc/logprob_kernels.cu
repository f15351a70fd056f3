// CUDA kernels of token_logprobs: online log-sum-exp over tiles of logits.
//
// For token i, over the vocabulary tiles seen so far (Milakov & Gimelshein 2018;
// Cut Cross-Entropy, Wijmans et al. 2024):
//
//     m' = max(m, max_v z_v),   s' = s * exp(m - m') + sum_v exp(z_v - m'),
//     log p(y_i) = z_{i,y_i} - (m + log s)   after the last tile.
//
// The tile of fp32 logits is written by a cuBLAS GEMM just before and is small
// enough to sit in L2, so these kernels read it from cache, once.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "logprob_kernels.h"

namespace gristmill {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kRowThreads = 256;  // threads per row in the from-logits kernel

// (m, s) of a set of values, merged: both sums rescaled to the larger maximum.
__device__ __forceinline__ void merge_lse(float& m, float& s, float m_other, float s_other) {
  const float m_new = fmaxf(m, m_other);
  // exp(-inf - finite) = 0 covers an empty side; both empty keeps (-inf, 0).
  s = (m == -INFINITY ? 0.f : s * __expf(m - m_new)) +
      (m_other == -INFINITY ? 0.f : s_other * __expf(m_other - m_new));
  m = m_new;
}

// One value into a running (m, s).
__device__ __forceinline__ void push_lse(float& m, float& s, float z) {
  if (z > m) {
    s = (m == -INFINITY ? 0.f : s * __expf(m - z)) + 1.f;
    m = z;
  } else if (m != -INFINITY) {  // else z = m = -inf (a masked logit): adds nothing
    s += __expf(z - m);
  }
}

__device__ __forceinline__ void warp_merge_lse(float& m, float& s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s_other = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_lse(m, s, m_other, s_other);
  }
}

// Four values into a running (m, s): one rescale at most per four exponentials.
__device__ __forceinline__ void push4_lse(float& m, float& s, float4 v) {
  const float top = fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w));
  if (top > m) {
    s = m == -INFINITY ? 0.f : s * __expf(m - top);
    m = top;
  }
  if (m != -INFINITY) s += __expf(v.x - m) + __expf(v.y - m) + __expf(v.z - m) + __expf(v.w - m);
}

// One warp per token row of the tile. Rows are read as float4 when the tile width
// and the bias allow it, with several loads in flight per lane: the tile comes from
// L2, so this kernel is bound by load latency unless many loads are outstanding.
__global__ void online_lse_tile_kernel(const float* __restrict__ logits, int64_t rows,
                                       int64_t cols, int64_t row0, int64_t v0,
                                       const float* __restrict__ bias,
                                       const int64_t* __restrict__ targets, int64_t ignore_index,
                                       float* __restrict__ run_max, float* __restrict__ run_sum,
                                       float* __restrict__ target_logit) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;
  const float* z = logits + r * cols;
  const float* b = bias == nullptr ? nullptr : bias + v0;
  float m = -INFINITY;
  float s = 0.f;
  const bool aligned = cols % 4 == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0 &&
                       (b == nullptr || reinterpret_cast<uintptr_t>(b) % 16 == 0);
  if (aligned) {
    const float4* z4 = reinterpret_cast<const float4*>(z);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    const int64_t cols4 = cols / 4;
#pragma unroll 4
    for (int64_t j = lane; j < cols4; j += kWarp) {
      float4 v = z4[j];
      if (b4 != nullptr) {
        const float4 bj = b4[j];
        v.x += bj.x;
        v.y += bj.y;
        v.z += bj.z;
        v.w += bj.w;
      }
      push4_lse(m, s, v);
    }
  } else {
    for (int64_t j = lane; j < cols; j += kWarp) push_lse(m, s, b ? z[j] + b[j] : z[j]);
  }
  warp_merge_lse(m, s);
  if (lane == 0) {
    const int64_t i = row0 + r;
    float m_run = run_max[i];
    float s_run = run_sum[i];
    merge_lse(m_run, s_run, m, s);
    run_max[i] = m_run;
    run_sum[i] = s_run;
    const int64_t local = targets[i] - v0;
    if (targets[i] != ignore_index && local >= 0 && local < cols) {
      target_logit[i] = b ? z[local] + b[local] : z[local];
    }
  }
}

__global__ void finalize_kernel(const float* __restrict__ run_max, const float* __restrict__ run_sum,
                                const float* __restrict__ target_logit,
                                const int64_t* __restrict__ targets, int64_t ignore_index,
                                int64_t n, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = targets[i] == ignore_index ? 0.f : target_logit[i] - (run_max[i] + logf(run_sum[i]));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// One block per row: each thread keeps (m, s) over a strided slice, then warps and
// the block merge them.
template <typename T>
__global__ void logprobs_from_logits_kernel(const T* __restrict__ logits, int64_t vocab,
                                            const int64_t* __restrict__ targets,
                                            int64_t ignore_index, float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t y = targets[i];
  if (y == ignore_index) {
    if (threadIdx.x == 0) out[i] = 0.f;
    return;
  }
  const T* z = logits + i * vocab;
  float m = -INFINITY;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) push_lse(m, s, to_float(z[j]));
  warp_merge_lse(m, s);
  __shared__ float shared_m[kRowThreads / kWarp];
  __shared__ float shared_s[kRowThreads / kWarp];
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float m_all = shared_m[0];
    float s_all = shared_s[0];
    for (int w = 1; w < kRowThreads / kWarp; ++w) merge_lse(m_all, s_all, shared_m[w], shared_s[w]);
    out[i] = to_float(z[y]) - (m_all + logf(s_all));
  }
}

int64_t blocks_for(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

}  // namespace

void launch_online_lse_tile(const float* logits, int64_t rows, int64_t cols, int64_t row0,
                            int64_t v0, const float* bias, const int64_t* targets,
                            int64_t ignore_index, float* run_max, float* run_sum,
                            float* target_logit, cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>(blocks_for(rows, kWarpsPerBlock)));
  online_lse_tile_kernel<<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
      logits, rows, cols, row0, v0, bias, targets, ignore_index, run_max, run_sum, target_logit);
}

void launch_finalize(const float* run_max, const float* run_sum, const float* target_logit,
                     const int64_t* targets, int64_t ignore_index, int64_t n, float* out,
                     cudaStream_t stream) {
  if (n == 0) return;
  const dim3 grid(static_cast<unsigned>(blocks_for(n, 256)));
  finalize_kernel<<<grid, 256, 0, stream>>>(run_max, run_sum, target_logit, targets, ignore_index,
                                            n, out);
}

void launch_logprobs_from_logits(const void* logits, LogitDtype dtype, int64_t n, int64_t vocab,
                                 const int64_t* targets, int64_t ignore_index, float* out,
                                 cudaStream_t stream) {
  if (n == 0) return;
  const dim3 grid(static_cast<unsigned>(n));
  switch (dtype) {
    case LogitDtype::kFloat32:
      logprobs_from_logits_kernel<float><<<grid, kRowThreads, 0, stream>>>(
          static_cast<const float*>(logits), vocab, targets, ignore_index, out);
      break;
    case LogitDtype::kBFloat16:
      logprobs_from_logits_kernel<__nv_bfloat16><<<grid, kRowThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(logits), vocab, targets, ignore_index, out);
      break;
    case LogitDtype::kFloat16:
      logprobs_from_logits_kernel<__half><<<grid, kRowThreads, 0, stream>>>(
          static_cast<const __half*>(logits), vocab, targets, ignore_index, out);
      break;
  }
}

}  // namespace gristmill
