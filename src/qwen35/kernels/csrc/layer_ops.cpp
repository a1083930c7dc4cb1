// The decoder layer's small steps as one call each: RMS norm, and the residual add fused
// with the norm that follows it. A decoded token runs 49 of these on vectors of a few
// thousand floats; torch composes its rms_norm of five ops (pow, mean, add, rsqrt, mul) and
// the add is a sixth, each a dispatch and an allocation costing more than the arithmetic.
// Plain reference: qwen35.model.qwen35.rms_norm (tests/test_layer_ops.py pins them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace qwen35_ggml {
namespace {

// One row: out = x * rsqrt(mean(x^2) + eps) * weight, in fp32.
void norm_row(const float* x, const float* weight, float* out, int64_t n, float eps) {
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  float total = _mm512_reduce_add_ps(sum);
  for (; i < n; ++i) total += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(total / static_cast<float>(n) + eps);
  const __m512 s = _mm512_set1_ps(scale);
  for (i = 0; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), s), _mm512_loadu_ps(weight + i)));
  }
  for (; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1, "rms_norm: x must be a CPU fp32 tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be fp32 [x.size(-1)]");
}

void norm_rows(const float* x, const float* weight, float* out, int64_t rows, int64_t n, float eps) {
  // Rows are independent: threads only for prefill-sized inputs.
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(x + r * n, weight, out + r * n, n, eps);
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  check(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(-1);
  norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.numel() / n, n, static_cast<float>(eps));
  return out;
}

// (x + residual, rms_norm(x + residual)): a layer's residual add and the norm after it.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                const at::Tensor& weight_in, double eps) {
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous(), weight = weight_in.contiguous();
  check(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == at::kFloat, "add_rms_norm: shapes differ");
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const int64_t n = x.size(-1), total = x.numel();
  const float *a = x.data_ptr<float>(), *b = residual.data_ptr<float>();
  float* s = sum.data_ptr<float>();
  for (int64_t i = 0; i < total; ++i) s[i] = a[i] + b[i];
  norm_rows(s, weight.data_ptr<float>(), out.data_ptr<float>(), total / n, n, static_cast<float>(eps));
  return {sum, out};
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &qwen35_ggml::rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)", &qwen35_ggml::add_rms_norm);
}
