// The gated delta rule token by token (decode), fused: one pass per head and token instead
// of a handful of whole-state tensor operations. Same maths as delta_rule.py's
// recurrent_gated_delta_rule (the plain reference); the per-head step is delta_rule_step.h's.
// Threads split the (batch, head) pairs (at::parallel_for: only where the extension is compiled
// with -fopenmp; without it the pragma inside at::parallel_for is ignored and one thread runs all).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "delta_rule_inputs.h"
#include "delta_rule_step.h"

namespace qwen35_ggml {
namespace {

// q, k [B, H, T, d_k]; v [B, H, T, d_v]; g, beta [B, H, T]; state [B, H, d_k, d_v] (fp32).
// Returns (output [B, H, T, d_v], final state); the input state is left unchanged.
std::tuple<at::Tensor, at::Tensor> recurrent_delta_rule(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& g_in,
                                                        const at::Tensor& beta_in, const at::Tensor& state_in) {
  const DeltaRuleInputs in(q_in, k_in, v_in, g_in, beta_in, state_in);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &g = in.g, &beta = in.beta, &old_state = in.state;
  at::Tensor state = at::empty(old_state.sizes(), at::kFloat);
  const int64_t heads = in.heads, length = in.length, d_k = in.d_k, d_v = in.d_v;
  at::Tensor out = at::empty({q.size(0), q.size(1), length, d_v}, at::kFloat);
  if (d_v == 0) return {out, state};
  const float* old = old_state.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>();
  // A thread's share must outweigh waking it (tens of microseconds with passive OpenMP waits).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, length * d_k * d_v));
  const bool aligned_rows = d_v % kLanes == 0 && reinterpret_cast<uintptr_t>(sp) % 64 == 0;
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t t = 0; t < length; ++t) {
        const int64_t ht = h * length + t;
        const float* source = t == 0 ? old + h * d_k * d_v : sp + h * d_k * d_v;
        // The last token's step fetches the next head's state ahead.
        const float* next_source = t == length - 1 && h + 1 < end ? old + (h + 1) * d_k * d_v : nullptr;
        step_head(source, sp + h * d_k * d_v, qp + ht * d_k, kp + ht * d_k, vp + ht * d_v, gp[ht], bp[ht],
                  op + ht * d_v, d_k, d_v, aligned_rows && t == length - 1, next_source);
      }
    }
    _mm_sfence();  // the streamed rows are visible before the state is handed back
  });
  return {out, state};
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("recurrent_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)",
        &qwen35_ggml::recurrent_delta_rule);
}
