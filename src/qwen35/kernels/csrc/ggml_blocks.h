// Shared pieces of the fast CPU kernels: ggml type ids, block geometry, and the small
// SIMD helpers that decode ggml's packed fields. Block layouts follow ggml-common.h;
// dequant.py holds the plain reference.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace qwen35_ggml {

constexpr int64_t QK_K = 256;
// ggml type ids
constexpr int64_t TYPE_F32 = 0;
constexpr int64_t TYPE_F16 = 1;
constexpr int64_t TYPE_Q4_0 = 2;
constexpr int64_t TYPE_Q4_1 = 3;
constexpr int64_t TYPE_Q5_0 = 6;
constexpr int64_t TYPE_Q5_1 = 7;
constexpr int64_t TYPE_Q8_0 = 8;
constexpr int64_t TYPE_Q2_K = 10;
constexpr int64_t TYPE_Q3_K = 11;
constexpr int64_t TYPE_Q4_K = 12;
constexpr int64_t TYPE_Q5_K = 13;
constexpr int64_t TYPE_Q6_K = 14;
constexpr int64_t TYPE_IQ4_NL = 20;
constexpr int64_t TYPE_IQ4_XS = 23;
constexpr int64_t TYPE_BF16 = 30;

// ggml's kvalues_iq4nl: the non-uniform 4-bit grid of IQ4_NL / IQ4_XS
alignas(16) inline constexpr int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                      1,    13,   25,  38,  53,  69,  89,  113};

struct Geometry {
  int64_t block_size;  // values per block
  int64_t type_size;   // bytes per block
};

inline Geometry geometry(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_0: return {32, 18};
    case TYPE_Q4_1: return {32, 20};
    case TYPE_Q5_0: return {32, 22};
    case TYPE_Q5_1: return {32, 24};
    case TYPE_Q8_0: return {32, 34};
    case TYPE_IQ4_NL: return {32, 18};
    case TYPE_Q2_K: return {QK_K, 84};
    case TYPE_Q3_K: return {QK_K, 110};
    case TYPE_Q4_K: return {QK_K, 144};
    case TYPE_Q5_K: return {QK_K, 176};
    case TYPE_Q6_K: return {QK_K, 210};
    case TYPE_IQ4_XS: return {QK_K, 136};
    case TYPE_F32: return {1, 4};
    case TYPE_F16:
    case TYPE_BF16: return {1, 2};
    default: TORCH_CHECK(false, "qwen35_ggml: no fast kernel for ggml type ", type_id);
  }
}

inline void check_blocks(const at::Tensor& blocks, Geometry geo, int64_t k) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
                  blocks.is_contiguous(),
              "blocks must be a contiguous CPU uint8 [rows, row_bytes] tensor");
  TORCH_CHECK(k > 0 && k % geo.block_size == 0 && blocks.size(1) == k / geo.block_size * geo.type_size,
              "blocks do not hold rows of ", k, " values");
}

// One row of x quantized to int8 as llama.cpp does: blocks of `block` values share a float
// scale (amax / 127); `sums` holds the sum of each 16 quantized values (for the weights'
// min/offset terms).
inline void quantize_row(const float* x, int64_t k, int64_t block, int8_t* q, float* scale, int16_t* sums) {
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

// MoE slots grouped by expert (a stable counting sort): expert e's slots are
// order[first[e] .. first[e + 1]). Ids are checked against the expert count.
struct SlotsByExpert {
  std::vector<int64_t> first, order;
};

inline SlotsByExpert sort_slots_by_expert(const int64_t* id, int64_t slots, int64_t n_experts) {
  SlotsByExpert sorted{std::vector<int64_t>(n_experts + 1, 0), std::vector<int64_t>(slots)};
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(id[s] >= 0 && id[s] < n_experts, "expert id ", id[s], " out of range [0, ", n_experts, ")");
    ++sorted.first[id[s] + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) sorted.first[e + 1] += sorted.first[e];
  std::vector<int64_t> fill(sorted.first.begin(), sorted.first.end() - 1);
  for (int64_t s = 0; s < slots; ++s) sorted.order[fill[id[s]]++] = s;
  return sorted;
}

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

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

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

// Q4_K/Q5_K: 12 bytes -> eight 6-bit scales (bytes 0-7) and eight 6-bit mins (bytes 8-15).
// Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
// sub-blocks 4-7 take 4 bits from bytes 8-11 and 2 from the top of bytes 0-7.
inline __m128i q4_k_scales_mins(const uint8_t* s) {
  uint32_t w0, w1, w2;
  std::memcpy(&w0, s, 4);
  std::memcpy(&w1, s + 4, 4);
  std::memcpy(&w2, s + 8, 4);
  const uint32_t six = 0x3F3F3F3F, nib = 0x0F0F0F0F, two = 0x03030303;
  return _mm_setr_epi32(static_cast<int>(w0 & six), static_cast<int>((w2 & nib) | (((w0 >> 6) & two) << 4)),
                        static_cast<int>(w1 & six), static_cast<int>(((w2 >> 4) & nib) | (((w1 >> 6) & two) << 4)));
}

// The eight mins, each twice, as int16: one per sum of 16 values (q4_k_min_dot's operand).
inline __m256i q4_k_mins16(__m128i scales_mins) {
  const __m128i pick = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  return _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scales_mins, pick));
}

// sum_j min_j * (sum of sub-block j's 32 quantized x), from the 16 sums of 16.
inline int32_t q4_k_min_dot(__m256i mins16, const int16_t* sums) {
  return hsum_i32(_mm256_madd_epi16(mins16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums))));
}

// ---------------------------------------------------------------- super-blocks of 16 groups of 16
// (Q2_K, Q3_K, Q6_K): one scale per 16 values; a 32-value chunk spans groups k and k + 1.

// Scales of groups k and k + 1 (of 16 int8 scales) for the dpbusd lanes 0-3 and 4-7.
inline __m256i group_pair_scales(__m128i scales, int k) {
  const __m128i pick = _mm_setr_epi8(k, k, k, k, k + 1, k + 1, k + 1, k + 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm256_cvtepi8_epi32(_mm_shuffle_epi8(scales, pick));
}

// sum_k scales[k] * sums[k] over the 16 groups, spread over 8 int32 lanes.
inline __m256i scaled_group_sums(__m128i scales, const int16_t* sums) {
  return _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums)));
}


// 2-bit fields: chunk (h, s) of a Q2_K/Q3_K block is bits 2s..2s+1 of the 32 bytes at 32h.
inline __m256i two_bits(__m256i v, int s) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * s)), _mm256_set1_epi8(0x03));
}

// Q3_K's 16 signed 6-bit scales (stored plus 32): low 4 bits are the nibbles of bytes 0-7
// (low nibbles first), the high 2 bits of scale i are bits 2 (i / 4) of byte 8 + i % 4.
inline __m128i q3_k_scales(const uint8_t* s) {
  uint32_t low0, low1, high;
  std::memcpy(&low0, s, 4);
  std::memcpy(&low1, s + 4, 4);
  std::memcpy(&high, s + 8, 4);
  const uint32_t nib = 0x0F0F0F0F, two = 0x03030303;
  const __m128i packed = _mm_setr_epi32(static_cast<int>((low0 & nib) | ((high & two) << 4)),
                                        static_cast<int>((low1 & nib) | (((high >> 2) & two) << 4)),
                                        static_cast<int>(((low0 >> 4) & nib) | (((high >> 4) & two) << 4)),
                                        static_cast<int>(((low1 >> 4) & nib) | (((high >> 6) & two) << 4)));
  return _mm_sub_epi8(packed, _mm_set1_epi8(32));
}

// Q3_K quant of chunk (h, s) plus 4, in 0..7: a set hmask bit means no -4 offset.
inline __m256i q3_k_quants(const uint8_t* blk, __m256i hmask, int h, int s) {
  const __m256i low = two_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 32 * h)), s);
  const __m256i high = _mm256_and_si256(_mm256_srl_epi16(hmask, _mm_cvtsi32_si128(4 * h + s)), _mm256_set1_epi8(1));
  return _mm256_or_si256(low, _mm256_slli_epi16(high, 2));
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

// IQ4_XS: eight sub-blocks of 32, each with a 6-bit scale (offset 32) and 4-bit grid indices.
inline int iq4_xs_scale(const uint8_t* blk, int j) {
  uint16_t high;
  std::memcpy(&high, blk + 2, 2);
  return (((blk[4 + j / 2] >> (4 * (j % 2))) & 0x0F) | (((high >> (2 * j)) & 3) << 4)) - 32;
}

// Q5_0/Q5_1: 32 five-bit quants (0..31) from 16 nibble bytes and a 32-bit mask of fifth bits.
inline __m256i five_bits(const uint8_t* qh, const uint8_t* qs) {
  uint32_t high;
  std::memcpy(&high, qh, 4);
  return _mm256_or_si256(nibbles_16(qs), _mm256_and_si256(_mm256_movm_epi8(high), _mm256_set1_epi8(0x10)));
}

// IQ4_NL/IQ4_XS: 16 nibble bytes -> 32 signed values of the non-uniform grid.
inline __m256i iq4_values(const uint8_t* qs) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(IQ4_VALUES)));
  return _mm256_shuffle_epi8(table, nibbles_16(qs));
}

// Float weights: 16 values widened to fp32.
inline __m512 load_f32x16(const uint8_t* p) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
inline float f32_at(const uint8_t* p) {
  float value;
  std::memcpy(&value, p, 4);
  return value;
}
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

}  // namespace qwen35_ggml
