// The gated delta rule token by token (decode), fused: one pass per head and token instead
// of a handful of whole-state tensor operations. Same maths as delta_rule.py's
// recurrent_gated_delta_rule (the plain reference), per head with state S [d_k, d_v]:
//     S = exp(g) S;  delta = beta (v - S^T k);  S = S + k delta^T;  o = S^T q
// Threads split the (batch, head) pairs; each walks its state rows twice per token
// (read for S^T k, then update and read for S^T q) while they sit in L1/L2.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace qwen35_ggml {
namespace {

// `source` is the state before the token, `state` receives the state after it (they may be
// the same memory: each row is read before it is written).
void step_head(const float* source, float* state, const float* q, const float* k, const float* v, float g, float beta, float* out,
               int64_t d_k, int64_t d_v, float* delta) {
  const float decay = std::exp(g);
  for (int64_t j = 0; j < d_v; ++j) delta[j] = 0.0f;
  for (int64_t i = 0; i < d_k; ++i) {
    const float* row = source + i * d_v;
    const float ki = k[i];
    for (int64_t j = 0; j < d_v; ++j) delta[j] += row[j] * ki;
  }
  for (int64_t j = 0; j < d_v; ++j) {
    delta[j] = beta * (v[j] - decay * delta[j]);
    out[j] = 0.0f;
  }
  for (int64_t i = 0; i < d_k; ++i) {
    const float* old_row = source + i * d_v;
    float* row = state + i * d_v;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < d_v; ++j) {
      const float updated = decay * old_row[j] + ki * delta[j];
      row[j] = updated;
      out[j] += updated * qi;
    }
  }
}

// q, k [B, H, T, d_k]; v [B, H, T, d_v]; g, beta [B, H, T]; state [B, H, d_k, d_v] (fp32).
// Returns (output [B, H, T, d_v], final state); the input state is left unchanged.
std::tuple<at::Tensor, at::Tensor> recurrent_delta_rule(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& g_in,
                                                        const at::Tensor& beta_in, const at::Tensor& state_in) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.dim() == 4 && g_in.dim() == 3 &&
                  beta_in.sizes() == g_in.sizes() && state_in.dim() == 4,
              "delta rule: q, k [B, H, T, d_k], v [B, H, T, d_v], g, beta [B, H, T], state [B, H, d_k, d_v]");
  const at::Tensor q = q_in.to(at::kFloat).contiguous(), k = k_in.to(at::kFloat).contiguous();
  const at::Tensor v = v_in.to(at::kFloat).contiguous(), g = g_in.to(at::kFloat).contiguous();
  const at::Tensor beta = beta_in.to(at::kFloat).contiguous();
  const at::Tensor old_state = state_in.to(at::kFloat).contiguous();
  at::Tensor state = at::empty(old_state.sizes(), at::kFloat);
  const int64_t heads = q.size(0) * q.size(1), length = q.size(2), d_k = q.size(3), d_v = v.size(3);
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == length && g.size(2) == length &&
                  state.size(2) == d_k && state.size(3) == d_v && state.size(0) * state.size(1) == heads,
              "delta rule: shapes do not agree");
  const float* old = old_state.data_ptr<float>();
  at::Tensor out = at::empty({q.size(0), q.size(1), length, d_v}, at::kFloat);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>();
  // A decode step is ~0.1 ms of work: threads only pay off (and only get woken) for more.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, length * d_k * d_v));
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> delta(d_v);
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t t = 0; t < length; ++t) {
        const int64_t ht = h * length + t;
        const float* source = t == 0 ? old + h * d_k * d_v : sp + h * d_k * d_v;
        step_head(source, sp + h * d_k * d_v, qp + ht * d_k, kp + ht * d_k, vp + ht * d_v, gp[ht], bp[ht], op + ht * d_v,
                  d_k, d_v, delta.data());
      }
    }
  });
  return {out, state};
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("recurrent_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor)",
        &qwen35_ggml::recurrent_delta_rule);
}
