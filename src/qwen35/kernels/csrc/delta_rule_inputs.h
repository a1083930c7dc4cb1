// The delta rule kernels' shared inputs: q, k [B, H, T, d_k]; v [B, H, T, d_v]; g, beta
// [B, H, T]; state [B, H, d_k, d_v]; checked and made fp32 and contiguous once.
#pragma once
#include <ATen/ATen.h>

namespace qwen35_ggml {

struct DeltaRuleInputs {
  at::Tensor q, k, v, g, beta, state;
  int64_t heads, length, d_k, d_v;

  DeltaRuleInputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& g_in,
                  const at::Tensor& beta_in, const at::Tensor& state_in) {
    TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.dim() == 4 && g_in.dim() == 3 &&
                    beta_in.sizes() == g_in.sizes() && state_in.dim() == 4,
                "delta rule: q, k [B, H, T, d_k], v [B, H, T, d_v], g, beta [B, H, T], state [B, H, d_k, d_v]");
    q = q_in.to(at::kFloat).contiguous();
    k = k_in.to(at::kFloat).contiguous();
    v = v_in.to(at::kFloat).contiguous();
    g = g_in.to(at::kFloat).contiguous();
    beta = beta_in.to(at::kFloat).contiguous();
    state = state_in.to(at::kFloat).contiguous();
    heads = q.size(0) * q.size(1), length = q.size(2), d_k = q.size(3), d_v = v.size(3);
    TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == length && g.size(0) == q.size(0) &&
                    g.size(1) == q.size(1) && g.size(2) == length && state.size(2) == d_k && state.size(3) == d_v &&
                    state.size(0) == q.size(0) && state.size(1) == q.size(1),
                "delta rule: shapes do not agree");
  }
};

}  // namespace qwen35_ggml
