// Fast CPU kernels over ggml blocks (AVX-512 VNNI + BF16), registered as torch.ops.qwen35_ggml.*.
// Types: Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, and F16/BF16 weights.
//
// gemv:            y[M, N] = x[M, K] @ W^T straight from the blocks (decode, small M).
//                  x is quantized to int8 per row first, like llama.cpp: per 256 values for
//                  super-block types (with sums per 16 for the min/offset terms), per 32 for
//                  Q4_0/Q8_0; the dot products then run in int8 x uint8 -> int32 (vpdpbusd).
//                  F16/BF16 weights are widened to fp32 and multiplied with x in fp32.
// tiled_matmul_bf16: prefill (many rows): W dequantized to bf16 a tile at a time, each tile
//                  multiplied with x in bf16 (fp32 accumulation), result in fp32.
// dequantize_bf16: W rows -> bf16.
// dequantize_f32:  W rows -> fp32, bit-equal to the reference (same operations, no FMA
//                  contraction: compiled with -ffp-contract=off).
//
// Block layouts follow ggml-common.h; see dequant.py for the plain reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t QK_K = 256;
// ggml type ids
constexpr int64_t TYPE_F16 = 1;
constexpr int64_t TYPE_Q4_0 = 2;
constexpr int64_t TYPE_Q8_0 = 8;
constexpr int64_t TYPE_Q2_K = 10;
constexpr int64_t TYPE_Q3_K = 11;
constexpr int64_t TYPE_Q4_K = 12;
constexpr int64_t TYPE_Q5_K = 13;
constexpr int64_t TYPE_Q6_K = 14;
constexpr int64_t TYPE_IQ4_XS = 23;
constexpr int64_t TYPE_BF16 = 30;

// ggml's kvalues_iq4nl: the non-uniform 4-bit grid of IQ4_NL / IQ4_XS
alignas(16) constexpr int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                               1,    13,   25,  38,  53,  69,  89,  113};

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- activations

// One row of x quantized to int8: blocks of `block` values share a float scale;
// `sums` holds the sum of each 16 quantized values (for the weights' min/offset terms).
// Float weights (F16/BF16) skip the quantization and use `x` directly.
struct QuantizedRow {
  const int8_t* q;
  const float* scale;
  const int16_t* sums;
  const float* x;
};

// int8 x int8 -> int32 lanes with the unsigned x signed instruction: |a| times b with a's sign.
inline __m256i dot_s8(__m256i a, __m256i b) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

// 16 bytes -> 32 nibbles in element order: all low nibbles, then all high nibbles.
inline __m256i nibbles_16(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
}

void quantize_row(const float* x, int64_t k, int64_t block, int8_t* q, float* scale, int16_t* sums) {
  for (int64_t b = 0; b < k / block; ++b) {
    const float* xb = x + b * block;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < block; i += 16) {
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    scale[b] = d;
    const __m512 vid = _mm512_set1_ps(id);
    for (int64_t i = 0; i < block; i += 16) {
      // Round to nearest even; |x * id| <= 127 so no clamping is needed.
      __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), vid));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * block + i), _mm512_cvtsepi32_epi8(qi));
      sums[(b * block + i) / 16] = static_cast<int16_t>(_mm512_reduce_add_epi32(qi));
    }
  }
}

// ---------------------------------------------------------------- dot products

inline void q4_k_scale_min(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

float dot_q4_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 144;
    const float dx = x.scale[b];
    uint8_t sc[8], mn[8];
    q4_k_scale_min(blk + 4, sc, mn);
    const int16_t* sums = x.sums + b * 16;
    int32_t min_dot = 0;
    for (int j = 0; j < 8; ++j) min_dot += mn[j] * (sums[2 * j] + sums[2 * j + 1]);
    min_total += f16_at(blk + 2) * dx * static_cast<float>(min_dot);

    const uint8_t* qs = blk + 16;
    const int8_t* xq = x.q + b * QK_K;
    __m256i iacc = _mm256_setzero_si256();
    for (int g = 0; g < 4; ++g) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * g));
      const __m256i lo = _mm256_and_si256(w, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * g));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * g + 32));
      const __m256i p0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x0);
      const __m256i p1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, x1);
      iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p0, _mm256_set1_epi32(sc[2 * g])));
      iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p1, _mm256_set1_epi32(sc[2 * g + 1])));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk) * dx), acc);
  }
  return hsum(acc) - min_total;
}

// ---------------------------------------------------------------- super-blocks of 16 groups of 16
// (Q2_K, Q3_K, Q6_K): one scale per 16 values; a 32-value chunk spans groups k and k + 1.

// dpbusd lanes 0-3 cover group k, lanes 4-7 group k + 1.
inline __m256i group_pair_scales(const int8_t* scales, int k) {
  return _mm256_setr_epi32(scales[k], scales[k], scales[k], scales[k], scales[k + 1], scales[k + 1], scales[k + 1],
                           scales[k + 1]);
}

// sum_k scales[k] * sums[k] over the 16 groups, spread over 8 int32 lanes.
inline __m256i scaled_group_sums(__m128i scales, const int16_t* sums) {
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums)));
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 2-bit fields: chunk (h, s) of a Q2_K/Q3_K block is bits 2s..2s+1 of the 32 bytes at 32h.
inline __m256i two_bits(__m256i v, int s) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * s)), _mm256_set1_epi8(0x03));
}

// Q3_K's 16 signed 6-bit scales: low 4 bits in bytes 0-7, high 2 bits in bytes 8-11.
inline void q3_k_scales(const uint8_t* s, int8_t* out) {
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
    const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    out[i] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
}

// Q3_K quant of chunk (h, s) plus 4, in 0..7: a set hmask bit means no -4 offset.
inline __m256i q3_k_quants(const uint8_t* blk, int h, int s) {
  const __m256i low = two_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 32 * h)), s);
  const __m256i hmask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
  const __m256i high = _mm256_and_si256(_mm256_srl_epi16(hmask, _mm_cvtsi32_si128(4 * h + s)), _mm256_set1_epi8(1));
  return _mm256_or_si256(low, _mm256_slli_epi16(high, 2));
}

float dot_q2_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 84;
    const float dx = x.scale[b];
    alignas(16) int8_t scales[16], mins[16];
    for (int i = 0; i < 16; ++i) {
      scales[i] = static_cast<int8_t>(blk[i] & 0x0F);
      mins[i] = static_cast<int8_t>(blk[i] >> 4);
    }
    const __m128i mins_v = _mm_load_si128(reinterpret_cast<const __m128i*>(mins));
    min_total += f16_at(blk + 82) * dx * static_cast<float>(hsum_i32(scaled_group_sums(mins_v, x.sums + b * 16)));
    const int8_t* xq = x.q + b * QK_K;
    __m256i iacc = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * h));
      for (int s = 0; s < 4; ++s) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 128 * h + 32 * s));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), two_bits(v, s), xv);
        iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p, group_pair_scales(scales, 8 * h + 2 * s)));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk + 80) * dx), acc);
  }
  return hsum(acc) - min_total;
}

float dot_q3_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 110;
    alignas(16) int8_t scales[16];
    q3_k_scales(blk + 96, scales);
    // Quants are stored plus 4: subtract 4 * sum_k scale_k * (sum of group k's x).
    const __m128i scales_v = _mm_load_si128(reinterpret_cast<const __m128i*>(scales));
    __m256i iacc = _mm256_sub_epi32(_mm256_setzero_si256(),
                                    _mm256_slli_epi32(scaled_group_sums(scales_v, x.sums + b * 16), 2));
    const int8_t* xq = x.q + b * QK_K;
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 128 * h + 32 * s));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q3_k_quants(blk, h, s), xv);
        iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p, group_pair_scales(scales, 8 * h + 2 * s)));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk + 108) * x.scale[b]), acc);
  }
  return hsum(acc);
}

// Q6_K: values 0..63 stored as 4 low bits (ql) + 2 high bits (qh), offset -32, int8 scale per 16.
inline __m256i q6_k_quants(const uint8_t* ql, __m256i qh, int c) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i low2 = _mm256_set1_epi8(0x03);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32 * (c & 1)));
  const __m256i lo = c < 2 ? _mm256_and_si256(bytes, low4) : _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
  const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), low2);
  return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
}

float dot_q6_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 210;
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));  // int8 [16]
    // The -32 offset: subtract 32 * sum_k scale_k * (sum of the 16 x values of group k).
    __m256i iacc = _mm256_sub_epi32(_mm256_setzero_si256(),
                                    _mm256_slli_epi32(scaled_group_sums(scales, x.sums + b * 16), 5));
    const int8_t* xq = x.q + b * QK_K;
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = blk + 64 * h;
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
      for (int c = 0; c < 4; ++c) {
        const __m256i q = q6_k_quants(ql, qh, c);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 128 * h + 32 * c));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv);
        const __m256i sc = group_pair_scales(reinterpret_cast<const int8_t*>(blk + 192), 8 * h + 2 * c);
        iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p, sc));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk + 208) * x.scale[b]), acc);
  }
  return hsum(acc);
}

float dot_q8_0(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 34;
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * b));
    const __m256i p = dot_s8(w, xv);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
  }
  return hsum(acc);
}


float dot_q4_0(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  const __m256i offset = _mm256_set1_epi8(8);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 18;
    const __m256i w = _mm256_sub_epi8(nibbles_16(blk + 2), offset);
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(w, xv)), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
  }
  return hsum(acc);
}

float dot_q5_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bit0 = _mm256_set1_epi8(0x01);
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 176;
    const float dx = x.scale[b];
    uint8_t sc[8], mn[8];
    q4_k_scale_min(blk + 4, sc, mn);
    const int16_t* sums = x.sums + b * 16;
    int32_t min_dot = 0;
    for (int j = 0; j < 8; ++j) min_dot += mn[j] * (sums[2 * j] + sums[2 * j + 1]);
    min_total += f16_at(blk + 2) * dx * static_cast<float>(min_dot);

    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
    const int8_t* xq = x.q + b * QK_K;
    __m256i iacc = _mm256_setzero_si256();
    for (int g = 0; g < 4; ++g) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 48 + 32 * g));
      // Sub-block j takes bit j of each qh byte as its fifth bit.
      const __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g)), bit0);
      const __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g + 1)), bit0);
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(w, low4), _mm256_slli_epi16(h0, 4));
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w, 4), low4), _mm256_slli_epi16(h1, 4));
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * g));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * g + 32));
      const __m256i p0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x0);
      const __m256i p1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, x1);
      iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p0, _mm256_set1_epi32(sc[2 * g])));
      iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p1, _mm256_set1_epi32(sc[2 * g + 1])));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk) * dx), acc);
  }
  return hsum(acc) - min_total;
}

// IQ4_XS: eight sub-blocks of 32, each with a 6-bit scale (offset 32) and 4-bit grid indices.
inline int iq4_xs_scale(const uint8_t* blk, int j) {
  uint16_t high;
  std::memcpy(&high, blk + 2, 2);
  return (((blk[4 + j / 2] >> (4 * (j % 2))) & 0x0F) | (((high >> (2 * j)) & 3) << 4)) - 32;
}

float dot_iq4_xs(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(IQ4_VALUES)));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 136;
    const int8_t* xq = x.q + b * QK_K;
    __m256i iacc = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      const __m256i w = _mm256_shuffle_epi8(table, nibbles_16(blk + 8 + 16 * j));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * j));
      iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(dot_s8(w, xv), _mm256_set1_epi32(iq4_xs_scale(blk, j))));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
  }
  return hsum(acc);
}

// Float weights: widen 16 values to fp32 and multiply with x in fp32 (no activation rounding).
inline __m512 load_bf16x16(const uint8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load_f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline float bf16_at(const uint8_t* p) {
  uint32_t bits = 0;
  std::memcpy(reinterpret_cast<uint8_t*>(&bits) + 2, p, 2);
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

template <__m512 (*Load)(const uint8_t*), float (*Scalar)(const uint8_t*)>
float dot_float(const uint8_t* row, const QuantizedRow& x, int64_t k) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    acc0 = _mm512_fmadd_ps(Load(row + 2 * i), _mm512_loadu_ps(x.x + i), acc0);
    acc1 = _mm512_fmadd_ps(Load(row + 2 * i + 32), _mm512_loadu_ps(x.x + i + 16), acc1);
  }
  float total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < k; ++i) total += Scalar(row + 2 * i) * x.x[i];
  return total;
}

struct TypeInfo {
  int64_t block_size;
  int64_t type_size;
  int64_t act_block;  // activation quantization block for gemv; 0: float weights, x stays fp32
  float (*dot)(const uint8_t*, const QuantizedRow&, int64_t);  // last argument: blocks per row
};

TypeInfo type_info(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_0: return {32, 18, 32, dot_q4_0};
    case TYPE_Q8_0: return {32, 34, 32, dot_q8_0};
    case TYPE_Q2_K: return {QK_K, 84, QK_K, dot_q2_k};
    case TYPE_Q3_K: return {QK_K, 110, QK_K, dot_q3_k};
    case TYPE_Q4_K: return {QK_K, 144, QK_K, dot_q4_k};
    case TYPE_Q5_K: return {QK_K, 176, QK_K, dot_q5_k};
    case TYPE_Q6_K: return {QK_K, 210, QK_K, dot_q6_k};
    case TYPE_IQ4_XS: return {QK_K, 136, QK_K, dot_iq4_xs};
    case TYPE_F16: return {1, 2, 0, dot_float<load_f16x16, f16_at>};
    case TYPE_BF16: return {1, 2, 0, dot_float<load_bf16x16, bf16_at>};
    default: TORCH_CHECK(false, "qwen35_ggml: no fast kernel for ggml type ", type_id);
  }
}

void check_blocks(const at::Tensor& blocks, const TypeInfo& info, int64_t k) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "blocks must be a contiguous uint8 [rows, row_bytes] tensor");
  TORCH_CHECK(k > 0 && k % info.block_size == 0 && blocks.size(1) == k / info.block_size * info.type_size,
              "blocks do not hold rows of ", k, " values");
}

at::Tensor gemv(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x_in) {
  const TypeInfo info = type_info(type_id);
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
  check_blocks(blocks, info, k);
  const bool quantize = info.act_block > 0;
  const int64_t act_block = quantize ? info.act_block : k;
  at::Tensor xq = at::empty({quantize ? m : 0, k}, at::kChar);
  at::Tensor xd = at::empty({m, k / act_block}, at::kFloat);
  at::Tensor xs = at::empty({m, k / 16}, at::kShort);
  for (int64_t r = 0; quantize && r < m; ++r) {
    quantize_row(x.data_ptr<float>() + r * k, k, act_block, xq.data_ptr<int8_t>() + r * k,
                 xd.data_ptr<float>() + r * (k / act_block), xs.data_ptr<int16_t>() + r * (k / 16));
  }
  at::Tensor y = at::empty({m, n}, at::kFloat);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), n_blocks = k / info.block_size;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t r = 0; r < m; ++r) {
        const QuantizedRow row{xq.data_ptr<int8_t>() + (quantize ? r * k : 0),
                               xd.data_ptr<float>() + r * (k / act_block), xs.data_ptr<int16_t>() + r * (k / 16),
                               x.data_ptr<float>() + r * k};
        out[r * n + i] = info.dot(w + i * row_bytes, row, n_blocks);
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------- dequantization

inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(at::BFloat16* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// 16 unsigned bytes -> 16 floats
inline __m512 u8_to_f32(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
inline __m512 i8_to_f32(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

template <typename Out>
void dequant_q2_k(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk + 80), dmin = f16_at(blk + 82);
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * h));
    for (int s = 0; s < 4; ++s) {
      const __m256i q = two_bits(v, s);
      for (int half = 0; half < 2; ++half) {
        const int k = 8 * h + 2 * s + half;
        const __m512 dl = _mm512_set1_ps(d * static_cast<float>(blk[k] & 0x0F));
        const __m512 ml = _mm512_set1_ps(dmin * static_cast<float>(blk[k] >> 4));
        const __m128i qv = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        store16(out + 16 * k, _mm512_sub_ps(_mm512_mul_ps(dl, u8_to_f32(qv)), ml));
      }
    }
  }
}

template <typename Out>
void dequant_q3_k(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk + 108);
  int8_t scales[16];
  q3_k_scales(blk + 96, scales);
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      const __m256i q = _mm256_sub_epi8(q3_k_quants(blk, h, s), _mm256_set1_epi8(4));
      for (int half = 0; half < 2; ++half) {
        const int k = 8 * h + 2 * s + half;
        const __m512 dl = _mm512_set1_ps(d * static_cast<float>(scales[k]));
        const __m128i qv = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        store16(out + 16 * k, _mm512_mul_ps(dl, i8_to_f32(qv)));
      }
    }
  }
}

template <typename Out>
void dequant_q4_k(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk), dmin = f16_at(blk + 2);
  uint8_t sc[8], mn[8];
  q4_k_scale_min(blk + 4, sc, mn);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int g = 0; g < 4; ++g) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * g));
    const __m256i nib[2] = {_mm256_and_si256(w, low4), _mm256_and_si256(_mm256_srli_epi16(w, 4), low4)};
    for (int s = 0; s < 2; ++s) {
      const int j = 2 * g + s;
      const __m512 dl = _mm512_set1_ps(d * static_cast<float>(sc[j]));
      const __m512 ml = _mm512_set1_ps(dmin * static_cast<float>(mn[j]));
      for (int half = 0; half < 2; ++half) {
        const __m128i q = half ? _mm256_extracti128_si256(nib[s], 1) : _mm256_castsi256_si128(nib[s]);
        store16(out + 32 * j + 16 * half, _mm512_sub_ps(_mm512_mul_ps(dl, u8_to_f32(q)), ml));
      }
    }
  }
}

template <typename Out>
void dequant_q6_k(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk + 208);
  const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
  const __m256i offset = _mm256_set1_epi8(32);
  for (int h = 0; h < 2; ++h) {
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    for (int c = 0; c < 4; ++c) {
      const __m256i q = _mm256_sub_epi8(q6_k_quants(blk + 64 * h, qh, c), offset);
      for (int half = 0; half < 2; ++half) {
        const int k = 8 * h + 2 * c + half;
        const __m512 dl = _mm512_set1_ps(d * static_cast<float>(scales[k]));
        const __m128i qv = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
        store16(out + 16 * k, _mm512_mul_ps(dl, i8_to_f32(qv)));
      }
    }
  }
}

template <typename Out>
void dequant_q8_0(const uint8_t* blk, Out* out) {
  const __m512 d = _mm512_set1_ps(f16_at(blk));
  for (int half = 0; half < 2; ++half) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2 + 16 * half));
    store16(out + 16 * half, _mm512_mul_ps(d, i8_to_f32(q)));
  }
}

template <typename Out>
void dequant_q4_0(const uint8_t* blk, Out* out) {
  const __m512 d = _mm512_set1_ps(f16_at(blk));
  const __m256i q = _mm256_sub_epi8(nibbles_16(blk + 2), _mm256_set1_epi8(8));
  store16(out, _mm512_mul_ps(d, i8_to_f32(_mm256_castsi256_si128(q))));
  store16(out + 16, _mm512_mul_ps(d, i8_to_f32(_mm256_extracti128_si256(q, 1))));
}

template <typename Out>
void dequant_q5_k(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk), dmin = f16_at(blk + 2);
  uint8_t sc[8], mn[8];
  q4_k_scale_min(blk + 4, sc, mn);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bit0 = _mm256_set1_epi8(0x01);
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
  for (int g = 0; g < 4; ++g) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 48 + 32 * g));
    const __m256i nib[2] = {_mm256_and_si256(w, low4), _mm256_and_si256(_mm256_srli_epi16(w, 4), low4)};
    for (int s = 0; s < 2; ++s) {
      const int j = 2 * g + s;
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j)), bit0);
      const __m256i q = _mm256_or_si256(nib[s], _mm256_slli_epi16(high, 4));
      const __m512 dl = _mm512_set1_ps(d * static_cast<float>(sc[j]));
      const __m512 ml = _mm512_set1_ps(dmin * static_cast<float>(mn[j]));
      store16(out + 32 * j, _mm512_sub_ps(_mm512_mul_ps(dl, u8_to_f32(_mm256_castsi256_si128(q))), ml));
      store16(out + 32 * j + 16, _mm512_sub_ps(_mm512_mul_ps(dl, u8_to_f32(_mm256_extracti128_si256(q, 1))), ml));
    }
  }
}

template <typename Out>
void dequant_iq4_xs(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(IQ4_VALUES)));
  for (int j = 0; j < 8; ++j) {
    const __m512 dl = _mm512_set1_ps(d * static_cast<float>(iq4_xs_scale(blk, j)));
    const __m256i v = _mm256_shuffle_epi8(table, nibbles_16(blk + 8 + 16 * j));
    store16(out + 32 * j, _mm512_mul_ps(dl, i8_to_f32(_mm256_castsi256_si128(v))));
    store16(out + 32 * j + 16, _mm512_mul_ps(dl, i8_to_f32(_mm256_extracti128_si256(v, 1))));
  }
}

inline void store1(float* out, float v) { *out = v; }
inline void store1(at::BFloat16* out, float v) { *out = at::BFloat16(v); }

// Float types convert a whole row (their "block" is one value).
template <typename Out, __m512 (*Load)(const uint8_t*), float (*Scalar)(const uint8_t*)>
void convert_row(const uint8_t* row, Out* out, int64_t k) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) store16(out + i, Load(row + 2 * i));
  for (; i < k; ++i) store1(out + i, Scalar(row + 2 * i));
}

template <typename Out>
void (*block_dequantizer(int64_t type_id))(const uint8_t*, Out*) {
  switch (type_id) {
    case TYPE_Q4_0: return dequant_q4_0<Out>;
    case TYPE_Q8_0: return dequant_q8_0<Out>;
    case TYPE_Q2_K: return dequant_q2_k<Out>;
    case TYPE_Q3_K: return dequant_q3_k<Out>;
    case TYPE_Q4_K: return dequant_q4_k<Out>;
    case TYPE_Q5_K: return dequant_q5_k<Out>;
    case TYPE_Q6_K: return dequant_q6_k<Out>;
    case TYPE_IQ4_XS: return dequant_iq4_xs<Out>;
    default: return nullptr;
  }
}

template <typename Out>
void (*row_converter(int64_t type_id))(const uint8_t*, Out*, int64_t) {
  switch (type_id) {
    case TYPE_F16: return convert_row<Out, load_f16x16, f16_at>;
    case TYPE_BF16: return convert_row<Out, load_bf16x16, bf16_at>;
    default: return nullptr;
  }
}

template <typename Out>
at::Tensor dequantize_rows(const at::Tensor& blocks, int64_t type_id, int64_t k, at::ScalarType dtype) {
  const TypeInfo info = type_info(type_id);
  check_blocks(blocks, info, k);
  const int64_t n = blocks.size(0), row_bytes = blocks.size(1), n_blocks = k / info.block_size;
  at::Tensor out = at::empty({n, k}, dtype);
  Out* dst = reinterpret_cast<Out*>(out.data_ptr());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  const auto block_fn = block_dequantizer<Out>(type_id);
  const auto row_fn = row_converter<Out>(type_id);
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (row_fn != nullptr) {
        row_fn(src + i * row_bytes, dst + i * k, k);
        continue;
      }
      for (int64_t b = 0; b < n_blocks; ++b) {
        block_fn(src + i * row_bytes + b * info.type_size, dst + i * k + b * info.block_size);
      }
    }
  });
  return out;
}

// x [M, K] @ W^T for many rows: each thread takes whole tiles of `tile_rows` weight rows,
// dequantizes one into its own bf16 buffer and multiplies it single-threaded (nested
// parallelism is off inside parallel_for), so a call synchronizes its threads once.
at::Tensor tiled_matmul_bf16(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x, int64_t tile_rows) {
  const TypeInfo info = type_info(type_id);
  TORCH_CHECK(x.dim() == 2 && tile_rows > 0, "x must be [M, K] and tile_rows positive");
  const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
  check_blocks(blocks, info, k);
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  at::Tensor out = at::empty({m, n}, at::kFloat);
  const auto block_fn = block_dequantizer<at::BFloat16>(type_id);
  const auto row_fn = row_converter<at::BFloat16>(type_id);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), n_blocks = k / info.block_size;
  const int64_t n_tiles = (n + tile_rows - 1) / tile_rows;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({tile_rows, k}, at::kBFloat16);
    at::BFloat16* dst = tile.data_ptr<at::BFloat16>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * tile_rows, rows = std::min(tile_rows, n - first);
      for (int64_t i = 0; i < rows; ++i) {
        const uint8_t* row = src + (first + i) * row_bytes;
        if (row_fn != nullptr) {
          row_fn(row, dst + i * k, k);
          continue;
        }
        for (int64_t b = 0; b < n_blocks; ++b) block_fn(row + b * info.type_size, dst + i * k + b * info.block_size);
      }
      out.narrow(1, first, rows).copy_(at::mm(xb, tile.narrow(0, 0, rows).t()));
    }
  });
  return out;
}

at::Tensor dequantize_bf16(const at::Tensor& blocks, int64_t type_id, int64_t k) {
  return dequantize_rows<at::BFloat16>(blocks, type_id, k, at::kBFloat16);
}

at::Tensor dequantize_f32(const at::Tensor& blocks, int64_t type_id, int64_t k) {
  return dequantize_rows<float>(blocks, type_id, k, at::kFloat);
}

}  // namespace

TORCH_LIBRARY(qwen35_ggml, m) {
  m.def("gemv(Tensor blocks, int type_id, Tensor x) -> Tensor", &gemv);
  m.def("tiled_matmul_bf16(Tensor blocks, int type_id, Tensor x, int tile_rows) -> Tensor", &tiled_matmul_bf16);
  m.def("dequantize_bf16(Tensor blocks, int type_id, int k) -> Tensor", &dequantize_bf16);
  m.def("dequantize_f32(Tensor blocks, int type_id, int k) -> Tensor", &dequantize_f32);
}
