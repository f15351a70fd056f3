// Batched token log-likelihood on the CPU, in tokens x vocabulary tiles.
//
// For token i with hidden state h_i, target y_i and logits z_iv = h_i . w_v + b_v:
//
//     log p(y_i) = z_{i,y_i} - (m_i + log s_i),
//
// where m_i and s_i are the running maximum and running sum of exp(z_iv - m_i)
// over the vocabulary tiles seen so far (online log-sum-exp, Milakov & Gimelshein
// 2018; the tiling of Cut Cross-Entropy, Wijmans et al. 2024):
//
//     m' = max(m, max_v z_v),   s' = s * exp(m - m') + sum_v exp(z_v - m').
//
// A tile of logits is one fp32 matrix product (at::mm, i.e. the BLAS the naive
// path also uses) written into a per-thread buffer that stays in cache, so the
// memory beyond the inputs is that buffer per thread, the hidden states and one
// weight tile per thread in fp32 (for bf16/fp16 inputs only) and m, s per thread
// and the target logit per token.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Eight floats as one value (GCC/Clang vector extension): the compiler maps it to
// one AVX register, or two SSE ones, without intrinsics tied to an instruction set.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int kLanes = 8;

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// Lane-wise a > b ? a : b, by masks (a comparison yields all-ones lanes).
inline v8f max8(v8f a, v8f b) {
  const v8i take_a = a > b;
  return (v8f)(((v8i)a & take_a) | ((v8i)b & ~take_a));
}

// exp(x) for x <= 0, eight lanes at once: x = n ln2 + r with |r| <= ln2/2, exp(r)
// by the Cephes expf polynomial (relative error ~1 ulp), 2^n built in the exponent
// bits. Arguments below -87.3 are clamped so 2^n stays a normal float; exp(-87.3)
// ~ 1e-38 is negligible next to s >= 1 (the maximum itself contributes exp(0) = 1).
inline v8f exp_nonpositive(v8f x) {
  x = max8(x, splat(-87.3f));
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting rounds
  const v8f n = (x * 1.44269504088896341f + magic) - magic;
  v8f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v8f y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return y * (v8f)bits;
}

inline float exp_nonpositive(float x) { return exp_nonpositive(splat(x))[0]; }

inline float horizontal_max(v8f v) {
  float result = v[0];
  for (int k = 1; k < kLanes; ++k) result = std::max(result, v[k]);
  return result;
}

inline float horizontal_sum(v8f v) {
  float result = 0.f;
  for (int k = 0; k < kLanes; ++k) result += v[k];
  return result;
}

inline float row_max(const float* z, int64_t cols) {
  v8f lanes = splat(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) lanes = max8(load8(z + j), lanes);
  float result = horizontal_max(lanes);
  for (; j < cols; ++j) result = std::max(result, z[j]);
  return result;
}

inline float row_sum_exp(const float* z, int64_t cols, float shift) {
  const v8f shift8 = splat(shift);
  v8f lanes = splat(0.f);
  int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) lanes += exp_nonpositive(load8(z + j) - shift8);
  float result = horizontal_sum(lanes);
  for (; j < cols; ++j) result += exp_nonpositive(z[j] - shift);
  return result;
}

// Fold one tile row of logits into the running (m, s) of its token.
inline void online_lse_update(const float* z, int64_t cols, float& m, float& s) {
  const float m_new = std::max(m, row_max(z, cols));
  // m = -inf on the first tile: exp_nonpositive clamps, and s is 0 there anyway.
  s = s * exp_nonpositive(m - m_new) + row_sum_exp(z, cols, m_new);
  m = m_new;
}

// A float view of `cols` logits: the data itself for fp32, else upcast into `chunk`.
inline const float* as_float(const float* z, int64_t, float*) { return z; }

template <typename T>
inline const float* as_float(const T* z, int64_t cols, float* chunk) {
  for (int64_t j = 0; j < cols; ++j) chunk[j] = static_cast<float>(z[j]);
  return chunk;
}

void check_targets(const at::Tensor& targets, int64_t n) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets must have shape [", n, "]");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64");
  TORCH_CHECK(targets.is_contiguous(), "targets must be contiguous");
}

at::Tensor token_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                          const at::Tensor& targets, const c10::optional<at::Tensor>& bias,
                          int64_t ignore_index, int64_t token_tile, int64_t vocab_tile) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N, d] and weight [V, d]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(token_tile >= 1 && vocab_tile >= 1, "token_tile and vocab_tile must be >= 1");
  const int64_t n = hidden.size(0);
  const int64_t vocab = weight.size(0);
  check_targets(targets, n);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({n}, f32);
  if (n == 0) return out;

  // fp32 copies of the (small) hidden states and bias; the weight is upcast per tile.
  const at::Tensor h32 = hidden.to(at::kFloat).contiguous();
  at::Tensor b32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == vocab, "bias must have shape [V]");
    b32 = bias->to(at::kFloat).contiguous();
  }
  // Threads split the vocabulary, not the tokens: each takes vocabulary tiles from a
  // shared counter, computes them for all tokens with a single-threaded GEMM into
  // its own buffer, and keeps its own running (m, s) per token; the partial sums
  // are merged at the end. One parallel region per call: on a loaded machine each
  // region costs a thread wake-up (measured up to 16 ms on 2 shared cores), so a
  // multithreaded GEMM per tile made small problems several times slower, and the
  // counter lets a thread that starts late simply take fewer tiles. Each weight tile
  // is read by one thread only.
  const bool upcast = weight.scalar_type() != at::kFloat;
  const int64_t dim = weight.size(1);
  const int64_t tt = std::min(token_tile, n);
  // 16-bit inputs also hold an fp32 copy of the weight tile (vt x d floats): their
  // vocabulary tile is halved to keep the same footprint. Small vocabularies get at
  // least 16 tiles per thread (of at least 256 columns) so the buffers of all
  // threads together stay a few percent of what N x V logits would take.
  const int64_t threads = std::max(1, at::get_num_threads());
  if (upcast) vocab_tile = std::max<int64_t>(1, vocab_tile / 2);
  vocab_tile = std::min(vocab_tile, std::max<int64_t>(256, (vocab + 16 * threads - 1) / (16 * threads)));
  const int64_t vt_max = std::min(vocab_tile, vocab);
  const int64_t tiles = (vocab + vocab_tile - 1) / vocab_tile;
  const int64_t workers = std::min(threads, tiles);
  std::vector<float> run_max(workers * n, -std::numeric_limits<float>::infinity());
  std::vector<float> run_sum(workers * n, 0.f);
  // Exactly one tile holds a token's target, so each entry has one writer.
  std::vector<float> target_logit(n, 0.f);
  const int64_t* y = targets.data_ptr<int64_t>();
  std::atomic<int64_t> next_tile{0};

  at::parallel_for(0, workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    for (int64_t worker = worker_begin; worker < worker_end; ++worker) {
      float* m = run_max.data() + worker * n;
      float* s = run_sum.data() + worker * n;
      at::Tensor buffer = at::empty({tt * vt_max}, f32);
      at::Tensor w_buffer = upcast ? at::empty({vt_max * dim}, f32) : at::Tensor();
      for (int64_t tile = next_tile++; tile < tiles; tile = next_tile++) {
        const int64_t v0 = tile * vocab_tile;
        const int64_t vt = std::min(vocab_tile, vocab - v0);
        at::Tensor w_tile = weight.narrow(0, v0, vt);
        if (upcast) w_tile = w_buffer.narrow(0, 0, vt * dim).view({vt, dim}).copy_(w_tile);
        for (int64_t t0 = 0; t0 < n; t0 += tt) {
          const int64_t nt = std::min(tt, n - t0);
          at::Tensor z = buffer.narrow(0, 0, nt * vt).view({nt, vt});
          if (b32.defined()) {
            at::addmm_out(z, b32.narrow(0, v0, vt), h32.narrow(0, t0, nt), w_tile.t());
          } else {
            at::mm_out(z, h32.narrow(0, t0, nt), w_tile.t());
          }
          const float* zp = z.data_ptr<float>();
          for (int64_t r = 0; r < nt; ++r) {
            const int64_t i = t0 + r;
            const float* row = zp + r * vt;
            online_lse_update(row, vt, m[i], s[i]);
            const int64_t local = y[i] - v0;
            if (y[i] != ignore_index && local >= 0 && local < vt) target_logit[i] = row[local];
          }
        }
      }
    }
  });
  // Merge the workers' (m, s): log sum exp = M + log sum_w s_w exp(m_w - M).
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] == ignore_index) continue;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t w = 0; w < workers; ++w) top = std::max(top, run_max[w * n + i]);
    float total = 0.f;
    for (int64_t w = 0; w < workers; ++w) {
      if (run_sum[w * n + i] > 0.f) total += run_sum[w * n + i] * std::exp(run_max[w * n + i] - top);
    }
    o[i] = target_logit[i] - (top + std::log(total));
  }
  return out;
}

at::Tensor token_logprobs_from_logits(const at::Tensor& logits, const at::Tensor& targets,
                                      int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cpu(), "CPU tensor expected");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be a contiguous [N, V]");
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_targets(targets, n);
  at::Tensor out = at::zeros({n}, logits.options().dtype(at::kFloat));
  const int64_t* y = targets.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_from_logits", [&] {
        const scalar_t* base = logits.data_ptr<scalar_t>();
        at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
          // Reduced-precision rows are upcast a chunk at a time into this buffer.
          constexpr int64_t kChunk = 2048;
          float chunk[kChunk];
          for (int64_t i = begin; i < end; ++i) {
            if (y[i] == ignore_index) continue;
            const scalar_t* row = base + i * vocab;
            float m = -std::numeric_limits<float>::infinity();
            float s = 0.f;
            for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
              const int64_t cols = std::min(kChunk, vocab - c0);
              online_lse_update(as_float(row + c0, cols, chunk), cols, m, s);
            }
            o[i] = static_cast<float>(row[y[i]]) - (m + std::log(s));
          }
        });
      });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("token_logprobs", &token_logprobs, "log p(target) per token from hidden states",
             py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("bias"),
             py::arg("ignore_index"), py::arg("token_tile") = 1024, py::arg("vocab_tile") = 1024);
  module.def("token_logprobs_from_logits", &token_logprobs_from_logits,
             "log p(target) per token from logits", py::arg("logits"), py::arg("targets"),
             py::arg("ignore_index"));
}
