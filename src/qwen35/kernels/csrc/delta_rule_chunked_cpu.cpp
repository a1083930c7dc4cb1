// The gated delta rule a chunk of tokens at a time (prefill), in C++. Same maths as
// delta_rule.py's chunked_gated_delta_rule (its plain reference); per head, for a chunk of
// c tokens with G the running sum of g inside the chunk and S the state at its start:
//     A[t, s] = beta_t exp(G_t - G_s) k_t.k_s   (s < t)
//     (I + A) [U | W] = [beta v | beta exp(G) k]        forward substitution, no general solver
//     delta = U - W S
//     out = (exp(G) q) S + (exp(G_t - G_s) q_t.k_s)_{s<=t} delta
//     S = exp(G_c) S + (exp(G_c - G) k)^T delta
// A thread takes whole heads and walks their chunks in order, with every chunk-sized
// temporary in its own small workspace (a few tens of KiB: L1/L2). (Threads through
// at::parallel_for: only where the extension is compiled with -fopenmp.) The products run on one
// register-tiled AVX-512 kernel (`multiply`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "delta_rule_inputs.h"
#include "vector_math.h"

namespace qwen35_ggml {
namespace {

// A tile of C (kRows rows x kVectors * 16 columns, the last vector masked by `tail`) += A B
// over `depth`, the tile's sums in registers. The loops over the tile are unrolled by pragma:
// unrolled late, GCC keeps the sums array in memory and stores all of it every step.
template <int kRows, int kVectors>
void multiply_tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
                   __mmask16 tail, bool accumulate) {
  __m512 sums[kRows][kVectors];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      const __mmask16 mask = v == kVectors - 1 ? tail : 0xFFFF;
      sums[r][v] = accumulate ? _mm512_maskz_loadu_ps(mask, c + r * ldc + v * kLanes) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < depth; ++p) {
    __m512 row[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      row[v] = _mm512_maskz_loadu_ps(v == kVectors - 1 ? tail : 0xFFFF, b + p * ldb + v * kLanes);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 scale = _mm512_set1_ps(a[r * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) sums[r][v] = _mm512_fmadd_ps(scale, row[v], sums[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      _mm512_mask_storeu_ps(c + r * ldc + v * kLanes, v == kVectors - 1 ? tail : 0xFFFF, sums[r][v]);
    }
  }
}

using TileKernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, __mmask16, bool);

// kTiles[rows - 1][vectors - 1]
constexpr TileKernel kTiles[4][4] = {
    {multiply_tile<1, 1>, multiply_tile<1, 2>, multiply_tile<1, 3>, multiply_tile<1, 4>},
    {multiply_tile<2, 1>, multiply_tile<2, 2>, multiply_tile<2, 3>, multiply_tile<2, 4>},
    {multiply_tile<3, 1>, multiply_tile<3, 2>, multiply_tile<3, 3>, multiply_tile<3, 4>},
    {multiply_tile<4, 1>, multiply_tile<4, 2>, multiply_tile<4, 3>, multiply_tile<4, 4>},
};

// C [rows, columns] = (or +=) A [rows, depth] B [depth, columns], all row-major with the given
// leading dimensions. With `lower_only`, only the columns up to each row tile's last row are
// computed (the rest of C is left as it was): enough for lower-triangular results.
// Column panels are the outer loop: a panel of B (depth x 64 floats, 32 KiB at depth 128)
// stays in L1 while every row tile passes over it.
void multiply(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
              int64_t depth, int64_t columns, bool accumulate, bool lower_only = false) {
  constexpr int64_t kTileRows = 4, kTileColumns = 4 * kLanes;
  for (int64_t column = 0; column < columns; column += kTileColumns) {
    for (int64_t row = 0; row < rows; row += kTileRows) {
      const int64_t height = std::min(rows - row, kTileRows);
      const int64_t end = lower_only ? std::min(columns, row + height) : columns;
      const int64_t width = std::min(end - column, kTileColumns);
      if (width <= 0) continue;
      const int64_t vectors = (width + kLanes - 1) / kLanes;
      const __mmask16 tail = lanes_below(width - (vectors - 1) * kLanes);
      kTiles[height - 1][vectors - 1](a + row * lda, lda, b + column, ldb, c + row * ldc + column, ldc, depth, tail,
                                      accumulate);
    }
  }
}

// x[columns] += scale * y[columns]
inline void add_scaled(float* x, const float* y, float scale, int64_t columns) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < columns; j += kLanes) {
    const __mmask16 mask = lanes_below(columns - j);
    const __m512 updated = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(mask, y + j), _mm512_maskz_loadu_ps(mask, x + j));
    _mm512_mask_storeu_ps(x + j, mask, updated);
  }
}

// Scratch of one thread for chunks of up to `chunk` tokens.
struct ChunkWorkspace {
  int64_t chunk, d_k, d_v;
  std::vector<float> log_decay;   // G [chunk]
  std::vector<float> keys_t;      // K^T [d_k, chunk]
  std::vector<float> minus_a;     // -A [chunk, chunk], strictly lower
  std::vector<float> attention;   // exp(G_t - G_s) q_t.k_s [chunk, chunk], lower
  std::vector<float> solved;      // [U | -W] [chunk, d_v + d_k]
  std::vector<float> decayed_q;   // exp(G) q [chunk, d_k]
  std::vector<float> keys_to_end; // (exp(G_c - G) k)^T [d_k, chunk]

  ChunkWorkspace(int64_t chunk, int64_t d_k, int64_t d_v)
      : chunk(chunk), d_k(d_k), d_v(d_v), log_decay(chunk), keys_t(d_k * chunk), minus_a(chunk * chunk),
        attention(chunk * chunk), solved(chunk * (d_v + d_k)), decayed_q(chunk * d_k), keys_to_end(d_k * chunk) {}
};

// One chunk of `c` tokens of one head: writes out [c, d_v] and advances `state` [d_k, d_v] in place.
void run_chunk(ChunkWorkspace& w, int64_t c, const float* q, const float* k, const float* v, const float* g,
               const float* beta, float* state, float* out) {
  const int64_t d_k = w.d_k, d_v = w.d_v, width = d_v + d_k;
  float* G = w.log_decay.data();
  float running = 0.0f;
  for (int64_t t = 0; t < c; ++t) G[t] = running += g[t];

  float* keys_t = w.keys_t.data();
  for (int64_t t = 0; t < c; ++t) {
    for (int64_t i = 0; i < d_k; ++i) keys_t[i * c + t] = k[t * d_k + i];
  }
  // k_t.k_s and q_t.k_s for s <= t, then each scaled by exp(G_t - G_s) (and -beta_t for -A).
  float* minus_a = w.minus_a.data();
  float* attention = w.attention.data();
  multiply(k, d_k, keys_t, c, minus_a, c, c, d_k, c, false, true);
  multiply(q, d_k, keys_t, c, attention, c, c, d_k, c, false, true);
  for (int64_t t = 0; t < c; ++t) {
    const __m512 G_t = _mm512_set1_ps(G[t]), minus_beta_t = _mm512_set1_ps(-beta[t]);
    for (int64_t s = 0; s < c; s += kLanes) {
      const __mmask16 inside = lanes_below(c - s);
      const __mmask16 causal = lanes_below(t + 1 - s);  // s' <= t; zero when s > t
      const __m512 decay = exp16(_mm512_sub_ps(G_t, _mm512_maskz_loadu_ps(inside, G + s)));
      const __m512 scores = _mm512_maskz_loadu_ps(causal, attention + t * c + s);
      _mm512_mask_storeu_ps(attention + t * c + s, inside, _mm512_maskz_mul_ps(causal, scores, decay));
      const __mmask16 strict = lanes_below(t - s);  // s' < t
      const __m512 products = _mm512_maskz_loadu_ps(strict, minus_a + t * c + s);
      _mm512_mask_storeu_ps(minus_a + t * c + s, inside,
                            _mm512_maskz_mul_ps(strict, _mm512_mul_ps(products, decay), minus_beta_t));
    }
  }

  // Right-hand sides [beta v | -beta exp(G) k]: solving with -W in place of W makes the
  // solved rows' first part turn into delta = U + (-W) S with one accumulating product.
  float* solved = w.solved.data();
  for (int64_t t = 0; t < c; ++t) {
    const float exp_G = std::exp(G[t]);
    for (int64_t j = 0; j < d_v; ++j) solved[t * width + j] = beta[t] * v[t * d_v + j];
    for (int64_t i = 0; i < d_k; ++i) solved[t * width + d_v + i] = -(beta[t] * exp_G) * k[t * d_k + i];
  }
  // Forward substitution on the unit-lower-triangular I + A, a block of rows at a time: rows
  // inside a block depend on each other one by one, the rows below take the whole block's
  // contribution as one product.
  constexpr int64_t kSolveBlock = 16;
  for (int64_t first = 0; first < c; first += kSolveBlock) {
    const int64_t last = std::min(c, first + kSolveBlock);
    for (int64_t t = first + 1; t < last; ++t) {
      for (int64_t s = first; s < t; ++s) add_scaled(solved + t * width, solved + s * width, minus_a[t * c + s], width);
    }
    if (last < c) {
      multiply(minus_a + last * c + first, c, solved + first * width, width, solved + last * width, width, c - last,
               last - first, width, true);
    }
  }
  multiply(solved + d_v, width, state, d_v, solved, width, c, d_k, d_v, true);  // delta, in the U columns

  float* decayed_q = w.decayed_q.data();
  for (int64_t t = 0; t < c; ++t) {
    const float exp_G = std::exp(G[t]);
    for (int64_t i = 0; i < d_k; ++i) decayed_q[t * d_k + i] = exp_G * q[t * d_k + i];
  }
  multiply(decayed_q, d_k, state, d_v, out, d_v, c, d_k, d_v, false);
  multiply(attention, c, solved, width, out, d_v, c, c, d_v, true);

  const float G_end = G[c - 1];
  float* keys_to_end = w.keys_to_end.data();
  for (int64_t t = 0; t < c; ++t) G[t] = std::exp(G_end - G[t]);  // G is not needed any more
  for (int64_t i = 0; i < d_k; ++i) {
    for (int64_t t = 0; t < c; ++t) keys_to_end[i * c + t] = keys_t[i * c + t] * G[t];
  }
  const __m512 chunk_decay = _mm512_set1_ps(std::exp(G_end));
  for (int64_t j = 0; j < d_k * d_v; j += kLanes) {
    const __mmask16 mask = lanes_below(d_k * d_v - j);
    _mm512_mask_storeu_ps(state + j, mask, _mm512_mul_ps(chunk_decay, _mm512_maskz_loadu_ps(mask, state + j)));
  }
  multiply(keys_to_end, c, solved, width, state, d_v, d_k, c, d_v, true);
}

// q, k [B, H, T, d_k]; v [B, H, T, d_v]; g, beta [B, H, T]; state [B, H, d_k, d_v] (fp32).
// Returns (output [B, H, T, d_v], final state); the input state is left unchanged.
std::tuple<at::Tensor, at::Tensor> chunked_delta_rule(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, const at::Tensor& g_in,
                                                      const at::Tensor& beta_in, const at::Tensor& state_in,
                                                      int64_t chunk) {
  const DeltaRuleInputs in(q_in, k_in, v_in, g_in, beta_in, state_in);
  TORCH_CHECK(chunk >= 1, "delta rule: the chunk size must be positive");
  const at::Tensor &q = in.q, &k = in.k, &v = in.v, &g = in.g, &beta = in.beta;
  at::Tensor state = in.state.clone();  // updated in place: never the caller's tensor
  const int64_t heads = in.heads, length = in.length, d_k = in.d_k, d_v = in.d_v;
  at::Tensor out = at::empty({q.size(0), q.size(1), length, d_v}, at::kFloat);
  if (length == 0 || d_v == 0) return {out, state};
  chunk = std::min(chunk, length);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    ChunkWorkspace workspace(chunk, d_k, d_v);
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t first = 0; first < length; first += chunk) {
        const int64_t c = std::min(chunk, length - first), row = h * length + first;
        run_chunk(workspace, c, qp + row * d_k, kp + row * d_k, vp + row * d_v, gp + row, bp + row,
                  sp + h * d_k * d_v, op + row * d_v);
      }
    }
  });
  return {out, state};
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def(
      "chunked_delta_rule(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state, int chunk) -> (Tensor, "
      "Tensor)",
      &qwen35_ggml::chunked_delta_rule);
}
