// One token of the gated delta rule on one head, shared by the decode kernels (delta_rule_cpu.cpp,
// deltanet_decode.cpp). Per head, with state S [d_k, d_v]:
//     S = exp(g) S;  delta = beta (v - S^T k);  S = S + k delta^T;  o = S^T q
// Columns of S never mix: column j's delta, update and output read column j alone. So a
// group of up to 128 columns stays in AVX-512 registers (the S^T k sums, then the deltas and
// the S^T q sums) while the rows stream past twice: once to read S^T k, once to update the
// rows and read S^T q. A head's 64 KiB state stays in L2 between the two passes.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vector_math.h"

namespace qwen35_ggml {

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
// `prefetch` (when not null) is read ahead into the cache during the second pass, `prefetch_lines`
// 64-byte lines per row: the next head's state, fetched from memory while this one is updated
// from L2 (the second pass reads no memory; without this the reads of each head would wait).
template <int kBlocks, bool kStream>
void step_column_group(const float* source, float* target, int64_t row_stride, int64_t d_k, const float* q,
                       const float* k, const float* v, float decay, float beta, float* out, __mmask16 tail,
                       const char* prefetch, int64_t prefetch_lines) {
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
    for (int64_t line = 0; line < prefetch_lines; ++line) {
      _mm_prefetch(prefetch + (i * prefetch_lines + line) * 64, _MM_HINT_T0);
    }
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
                           float, float*, __mmask16, const char*, int64_t);

// kGroupSteps[stream][blocks - 1]
inline constexpr GroupStep kGroupSteps[2][kMaxBlocks] = {
    {step_column_group<1, false>, step_column_group<2, false>, step_column_group<3, false>, step_column_group<4, false>,
     step_column_group<5, false>, step_column_group<6, false>, step_column_group<7, false>, step_column_group<8, false>},
    {step_column_group<1, true>, step_column_group<2, true>, step_column_group<3, true>, step_column_group<4, true>,
     step_column_group<5, true>, step_column_group<6, true>, step_column_group<7, true>, step_column_group<8, true>},
};

// One token on one head: S [d_k, d_v] (rows d_v apart) from `source` to `target` (they may be
// the same memory), o = S^T q into `out` [d_v]. `stream` needs d_v % 16 == 0 and a 64-byte
// aligned target. `next_source` (when not null): the state the caller steps next, prefetched.
inline void step_head(const float* source, float* target, const float* q, const float* k, const float* v, float g,
                      float beta, float* out, int64_t d_k, int64_t d_v, bool stream,
                      const float* next_source = nullptr) {
  const float decay = std::exp(g);
  // All of the next state during the first column group's second pass: ceil(d_k d_v / 16 / d_k) lines a row.
  const int64_t prefetch_lines = next_source == nullptr ? 0 : (d_v + kLanes - 1) / kLanes;
  for (int64_t first = 0; first < d_v; first += kMaxBlocks * kLanes) {
    const int64_t columns = std::min(d_v - first, kMaxBlocks * kLanes);
    const int64_t blocks = (columns + kLanes - 1) / kLanes;
    const int64_t in_last = columns - (blocks - 1) * kLanes;
    const __mmask16 tail = static_cast<__mmask16>((1u << in_last) - 1);
    kGroupSteps[stream][blocks - 1](source + first, target + first, d_v, d_k, q, k, v + first, decay, beta, out + first,
                                    tail, reinterpret_cast<const char*>(next_source), first == 0 ? prefetch_lines : 0);
  }
}

}  // namespace qwen35_ggml
