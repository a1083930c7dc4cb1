// The gated delta rule token by token (decode), fused: one pass per head and token instead
// of a handful of whole-state tensor operations. Same maths as delta_rule.py's
// recurrent_gated_delta_rule (the plain reference), per head with state S [d_k, d_v]:
//     S = exp(g) S;  delta = beta (v - S^T k);  S = S + k delta^T;  o = S^T q
// Columns of S never mix: column j's delta, update and output read column j alone. So a
// group of up to 128 columns stays in AVX-512 registers (the S^T k sums, then the deltas and
// the S^T q sums) while the rows stream past twice: once to read S^T k, once to update the
// rows and read S^T q. A head's 64 KiB state stays in L2 between the two passes.
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

namespace qwen35_ggml {
namespace {

constexpr int64_t kLanes = 16;
constexpr int kMaxBlocks = 8;  // 128 columns: 8 sums + 8 deltas + 8 outputs fit the 32 registers

// Block b of a row; the group's last block may be partial (`tail` masks its columns).
template <int kBlocks>
inline __m512 load_block(const float* row, int b, __mmask16 tail) {
  return b == kBlocks - 1 ? _mm512_maskz_loadu_ps(tail, row + b * kLanes) : _mm512_loadu_ps(row + b * kLanes);
}

template <int kBlocks>
inline void store_block(float* row, int b, __mmask16 tail, __m512 value) {
  if (b == kBlocks - 1) {
    _mm512_mask_storeu_ps(row + b * kLanes, tail, value);
  } else {
    _mm512_storeu_ps(row + b * kLanes, value);
  }
}

// One token on one group of columns of one head. (The loops over blocks are unrolled by pragma
// so that GCC keeps the arrays of sums in registers.) `source` is the state before the token and
// `target` receives the state after it; they may be the same memory (a row is read before it
// is written). Rows are `row_stride` floats apart.
// With kStream the new rows go straight to memory (whole, 64-byte aligned rows only): the next
// read of this state is the next token's, long after every layer's weights have flushed the
// caches, so caching the rows now would only cost reading them in first.
template <int kBlocks, bool kStream>
void step_column_group(const float* source, float* target, int64_t row_stride, int64_t d_k, const float* q,
                       const float* k, const float* v, float decay, float beta, float* out, __mmask16 tail) {
  __m512 sums[kBlocks];
#pragma GCC unroll 8
  for (int b = 0; b < kBlocks; ++b) sums[b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d_k; ++i) {
    const __m512 ki = _mm512_set1_ps(k[i]);
    const float* row = source + i * row_stride;
#pragma GCC unroll 8
    for (int b = 0; b < kBlocks; ++b) sums[b] = _mm512_fmadd_ps(load_block<kBlocks>(row, b, tail), ki, sums[b]);
  }
  // exp(g) S^T k is the decayed state's prediction of v.
  const __m512 decay_v = _mm512_set1_ps(decay), beta_v = _mm512_set1_ps(beta);
  __m512 delta[kBlocks];
#pragma GCC unroll 8
  for (int b = 0; b < kBlocks; ++b) {
    const __m512 predicted = _mm512_mul_ps(decay_v, sums[b]);
    delta[b] = _mm512_mul_ps(beta_v, _mm512_sub_ps(load_block<kBlocks>(v, b, tail), predicted));
    sums[b] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < d_k; ++i) {
    const __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
    const float* old_row = source + i * row_stride;
    float* row = target + i * row_stride;
#pragma GCC unroll 8
    for (int b = 0; b < kBlocks; ++b) {
      const __m512 updated =
          _mm512_fmadd_ps(ki, delta[b], _mm512_mul_ps(decay_v, load_block<kBlocks>(old_row, b, tail)));
      if constexpr (kStream) {
        _mm512_stream_ps(row + b * kLanes, updated);
      } else {
        store_block<kBlocks>(row, b, tail, updated);
      }
      sums[b] = _mm512_fmadd_ps(qi, updated, sums[b]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < kBlocks; ++b) store_block<kBlocks>(out, b, tail, sums[b]);
}

using GroupStep = void (*)(const float*, float*, int64_t, int64_t, const float*, const float*, const float*, float,
                           float, float*, __mmask16);

// kGroupSteps[stream][blocks - 1]
constexpr GroupStep kGroupSteps[2][kMaxBlocks] = {
    {step_column_group<1, false>, step_column_group<2, false>, step_column_group<3, false>, step_column_group<4, false>,
     step_column_group<5, false>, step_column_group<6, false>, step_column_group<7, false>, step_column_group<8, false>},
    {step_column_group<1, true>, step_column_group<2, true>, step_column_group<3, true>, step_column_group<4, true>,
     step_column_group<5, true>, step_column_group<6, true>, step_column_group<7, true>, step_column_group<8, true>},
};

void step_head(const float* source, float* target, const float* q, const float* k, const float* v, float g, float beta,
               float* out, int64_t d_k, int64_t d_v, bool stream) {
  const float decay = std::exp(g);
  for (int64_t first = 0; first < d_v; first += kMaxBlocks * kLanes) {
    const int64_t columns = std::min(d_v - first, kMaxBlocks * kLanes);
    const int64_t blocks = (columns + kLanes - 1) / kLanes;
    const int64_t in_last = columns - (blocks - 1) * kLanes;
    const __mmask16 tail = static_cast<__mmask16>((1u << in_last) - 1);
    kGroupSteps[stream][blocks - 1](source + first, target + first, d_v, d_k, q, k, v + first, decay, beta, out + first,
                                    tail);
  }
}

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
        step_head(source, sp + h * d_k * d_v, qp + ht * d_k, kp + ht * d_k, vp + ht * d_v, gp[ht], bp[ht],
                  op + ht * d_v, d_k, d_v, aligned_rows && t == length - 1);
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
