// gemv: y[M, N] = x[M, K] @ W^T straight from ggml blocks, for any M (decode and prefill);
// expert_gemv: the same for MoE slots, each with its own expert, in one call.
//
// x is quantized to int8 per row first, like llama.cpp: per 256 values for super-block
// types (with sums per 16 for the min/offset terms), per 32 for 32-value blocks; the dot
// products then run as uint8 x int8 -> int32 (vpdpbusd), scaled once per block.
// F16/BF16 weights are widened to fp32 and multiplied with x in fp32.
//
// Each dot kernel takes NR rows of x at once (NR = 1..4): a weight block is loaded and
// unpacked once and used for all NR rows, which is what makes many-row calls (prefill)
// fast. Every row still goes through exactly the operations, in exactly the order, of a
// single-row call (its own integer sums, its own float accumulator), so a row's result is
// bit-identical whatever M is and whichever rows share its call: batch invariance.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "ggml_blocks.h"

namespace qwen35_ggml {
namespace {

constexpr int MAX_ROWS = 4;  // rows of x per kernel call (8 measured no faster)

// One row of x quantized to int8: blocks of `block` values share a float scale;
// `sums` holds the sum of each 16 quantized values (for the weights' min/offset terms).
// Float weights (F16/BF16) skip the quantization and use `x` directly.
struct QuantizedRow {
  const int8_t* q;
  const float* scale;
  const int16_t* sums;
  const float* x;
};

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// acc + p * scale for int32 lanes p that fit in int16 (every unsigned-quant dpbusd of 4
// products here: |p| <= 4 * 63 * 127) and a scale in int16: one vpdpwssd instead of a
// vpmulld and a vpaddd, same integers. `scale` holds each lane's scale in its low 16 bits
// and zeros above (see low_half), so p's upper (sign) half meets a zero.
inline __m256i add_scaled(__m256i acc, __m256i p, __m256i scale) { return _mm256_dpwssd_epi32(acc, p, scale); }
inline __m256i low_half(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)); }

// Per-row float state of a dot: a vector accumulator of block results and a scalar one.
template <int NR>
struct Accumulators {
  __m256 acc[NR];
  float scalar[NR];
  Accumulators() {
    for (int r = 0; r < NR; ++r) {
      acc[r] = _mm256_setzero_ps();
      scalar[r] = 0.0f;
    }
  }
};

// ------------------------------------------------------------------------------- K-quants

// Two 32-value sub-blocks per 512-bit step (lanes 0-7: the first, 8-15: the second) whose
// x values lie side by side: half the instructions of 256-bit steps. The two halves of the
// int32 accumulator are added at the end of the block, exactly.
inline __m512i join(__m256i low, __m256i high) { return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1); }
inline __m256i fold(__m512i v) { return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)); }
inline __m512i load64(const int8_t* p) { return _mm512_loadu_si512(p); }

struct Q4K {
  // Per row: a 512-bit float accumulator of scaled sub-block pairs and a 256-bit one of the
  // min terms, reduced once at the end (no horizontal sums per block).
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m512 acc[NR];
    __m256 acc_min[NR];
    for (int r = 0; r < NR; ++r) {
      acc[r] = _mm512_setzero_ps();
      acc_min[r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * 144;
      const __m128i scales_mins = q4_k_scales_mins(blk + 4);
      alignas(16) uint8_t sc[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(sc), scales_mins);
      const float d = f16_at(blk), dmin = f16_at(blk + 2);
      const __m256i mins16 = q4_k_mins16(scales_mins);
      __m512i iacc[NR];
      for (int r = 0; r < NR; ++r) iacc[r] = _mm512_setzero_si512();
      const uint8_t* qs = blk + 16;
      for (int g = 0; g < 4; ++g) {
        // Sub-block 2g: low nibbles of these 32 bytes; 2g + 1: high nibbles; x: 64 values in a row.
        const __m256i w = load32(qs + 32 * g);
        const __m512i q = join(_mm256_and_si256(w, low4), _mm256_and_si256(_mm256_srli_epi16(w, 4), low4));
        const __m512i scale = join(_mm256_set1_epi32(sc[2 * g]), _mm256_set1_epi32(sc[2 * g + 1]));
        for (int r = 0; r < NR; ++r) {
          const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, load64(x[r].q + b * QK_K + 64 * g));
          iacc[r] = _mm512_dpwssd_epi32(iacc[r], p, scale);
        }
      }
      for (int r = 0; r < NR; ++r) {
        const float dx = x[r].scale[b];
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_set1_ps(d * dx), acc[r]);
        const __m256i mins = _mm256_madd_epi16(mins16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r].sums + b * 16)));
        acc_min[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(dmin * dx), acc_min[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 folded = _mm256_add_ps(_mm512_castps512_ps256(acc[r]), _mm512_extractf32x8_ps(acc[r], 1));
      out[r] = hsum(folded) - hsum(acc_min[r]);
    }
  }
};

struct Q5K {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i bit0 = _mm256_set1_epi8(0x01);
    Accumulators<NR> a;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * 176;
      const __m128i scales_mins = q4_k_scales_mins(blk + 4);
      alignas(16) uint8_t sc[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(sc), scales_mins);
      const float d = f16_at(blk), dmin = f16_at(blk + 2);
      const __m256i mins16 = q4_k_mins16(scales_mins);
      for (int r = 0; r < NR; ++r) {
        a.scalar[r] += dmin * x[r].scale[b] * static_cast<float>(q4_k_min_dot(mins16, x[r].sums + b * 16));
      }
      const __m256i qh = load32(blk + 16);
      __m256i iacc[NR];
      for (int r = 0; r < NR; ++r) iacc[r] = _mm256_setzero_si256();
      for (int g = 0; g < 4; ++g) {
        const __m256i w = load32(blk + 48 + 32 * g);
        // Sub-block j takes bit j of each qh byte as its fifth bit.
        const __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g)), bit0);
        const __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g + 1)), bit0);
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(w, low4), _mm256_slli_epi16(h0, 4));
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w, 4), low4), _mm256_slli_epi16(h1, 4));
        const __m256i s0 = _mm256_set1_epi32(sc[2 * g]), s1 = _mm256_set1_epi32(sc[2 * g + 1]);
        for (int r = 0; r < NR; ++r) {
          const int8_t* xq = x[r].q + b * QK_K + 64 * g;
          const __m256i p0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, load32(xq));
          const __m256i p1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, load32(xq + 32));
          iacc[r] = add_scaled(add_scaled(iacc[r], p0, s0), p1, s1);
        }
      }
      for (int r = 0; r < NR; ++r) {
        a.acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), _mm256_set1_ps(d * x[r].scale[b]), a.acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(a.acc[r]) - a.scalar[r];
  }
};

// Q2_K/Q3_K/Q6_K: 16 groups of 16 with one scale each; a 32-value chunk spans two groups.

struct Q2K {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    Accumulators<NR> a;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * 84;
      // Byte k: scale of group k in the low nibble, its min in the high nibble.
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
      const __m128i scales = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
      const __m128i mins = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
      const float d = f16_at(blk + 80), dmin = f16_at(blk + 82);
      for (int r = 0; r < NR; ++r) {
        a.scalar[r] += dmin * x[r].scale[b] * static_cast<float>(hsum_i32(scaled_group_sums(mins, x[r].sums + b * 16)));
      }
      __m256i iacc[NR];
      for (int r = 0; r < NR; ++r) iacc[r] = _mm256_setzero_si256();
      for (int h = 0; h < 2; ++h) {
        const __m256i v = load32(blk + 16 + 32 * h);
        for (int s = 0; s < 4; ++s) {
          const __m256i q = two_bits(v, s);
          const __m256i scale = low_half(group_pair_scales(scales, 8 * h + 2 * s));
          for (int r = 0; r < NR; ++r) {
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, load32(x[r].q + b * QK_K + 128 * h + 32 * s));
            iacc[r] = add_scaled(iacc[r], p, scale);
          }
        }
      }
      for (int r = 0; r < NR; ++r) {
        a.acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), _mm256_set1_ps(d * x[r].scale[b]), a.acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(a.acc[r]) - a.scalar[r];
  }
};

struct Q3K {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    Accumulators<NR> a;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * 110;
      const __m128i scales = q3_k_scales(blk + 96);
      // Quants are stored plus 4: subtract 4 * sum_k scale_k * (sum of group k's x).
      __m256i iacc[NR];
      for (int r = 0; r < NR; ++r) {
        iacc[r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(scaled_group_sums(scales, x[r].sums + b * 16), 2));
      }
      const __m256i hmask = load32(blk);
      for (int h = 0; h < 2; ++h) {
        for (int s = 0; s < 4; ++s) {
          const __m256i q = q3_k_quants(blk, hmask, h, s);
          const __m256i scale = low_half(group_pair_scales(scales, 8 * h + 2 * s));
          for (int r = 0; r < NR; ++r) {
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, load32(x[r].q + b * QK_K + 128 * h + 32 * s));
            iacc[r] = add_scaled(iacc[r], p, scale);
          }
        }
      }
      const float d = f16_at(blk + 108);
      for (int r = 0; r < NR; ++r) {
        a.acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), _mm256_set1_ps(d * x[r].scale[b]), a.acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(a.acc[r]);
  }
};

struct Q6K {
  // Two 32-value chunks per 512-bit step (x side by side), one 512-bit float accumulator per row.
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * 210;
      const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));  // int8 [16]
      // The -32 offset: subtract 32 * sum_k scale_k * (sum of the 16 x values of group k).
      __m512i iacc[NR];
      for (int r = 0; r < NR; ++r) {
        iacc[r] = _mm512_zextsi256_si512(_mm256_sub_epi32(
            _mm256_setzero_si256(), _mm256_slli_epi32(scaled_group_sums(scales, x[r].sums + b * 16), 5)));
      }
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = blk + 64 * h;
        const __m256i qh = load32(blk + 128 + 32 * h);
        for (int c = 0; c < 4; c += 2) {
          const __m512i q = join(q6_k_quants(ql, qh, c), q6_k_quants(ql, qh, c + 1));
          const __m512i scale = join(low_half(group_pair_scales(scales, 8 * h + 2 * c)),
                                     low_half(group_pair_scales(scales, 8 * h + 2 * c + 2)));
          for (int r = 0; r < NR; ++r) {
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, load64(x[r].q + b * QK_K + 128 * h + 32 * c));
            iacc[r] = _mm512_dpwssd_epi32(iacc[r], p, scale);
          }
        }
      }
      const float d = f16_at(blk + 208);
      for (int r = 0; r < NR; ++r) {
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_set1_ps(d * x[r].scale[b]), acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      out[r] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[r]), _mm512_extractf32x8_ps(acc[r], 1)));
    }
  }
};

struct IQ4XS {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    Accumulators<NR> a;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * 136;
      __m256i iacc[NR];
      for (int r = 0; r < NR; ++r) iacc[r] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i w = iq4_values(blk + 8 + 16 * j);
        // Signed weights: dot_s8 moves w's signs onto x; |w| <= 127 needs a full 32-bit multiply.
        const __m256i w_abs = _mm256_sign_epi8(w, w);
        const __m256i scale = _mm256_set1_epi32(iq4_xs_scale(blk, j));
        for (int r = 0; r < NR; ++r) {
          const __m256i xv = _mm256_sign_epi8(load32(x[r].q + b * QK_K + 32 * j), w);
          const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_abs, xv);
          iacc[r] = _mm256_add_epi32(iacc[r], _mm256_mullo_epi32(p, scale));
        }
      }
      const float d = f16_at(blk);
      for (int r = 0; r < NR; ++r) {
        a.acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), _mm256_set1_ps(d * x[r].scale[b]), a.acc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(a.acc[r]);
  }
};

// ------------------------------------------------------------------------ 32-value blocks

// Signed values times one fp16 scale per 32 (Q4_0, Q5_0, Q8_0, IQ4_NL). Two blocks per
// 512-bit step: lanes 0-7 hold block b's products, 8-15 block b + 1's, each half scaled by
// its own d * dx into one float accumulator per row; an odd last block uses the low half.
template <int64_t TypeSize, __m256i (*Values)(const uint8_t*)>
struct Signed32 {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= n_blocks; b += 2) {
      const uint8_t* blk = row + b * TypeSize;
      const __m512i w = join(Values(blk), Values(blk + TypeSize));
      // dpbusd multiplies unsigned by signed: |w| times x with w's sign moved onto x.
      const __m512i w_abs = _mm512_abs_epi8(w);
      const __mmask64 negative = _mm512_movepi8_mask(w);
      const float d0 = f16_at(blk), d1 = f16_at(blk + TypeSize);
      for (int r = 0; r < NR; ++r) {
        const __m512i xv = load64(x[r].q + 32 * b);
        const __m512i signed_x = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w_abs, signed_x);
        const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(d0 * x[r].scale[b]), _mm256_set1_ps(d1 * x[r].scale[b + 1]), 1);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
      }
    }
    if (b < n_blocks) {
      const uint8_t* blk = row + b * TypeSize;
      const __m256i w = Values(blk);
      const __m256i w_abs = _mm256_sign_epi8(w, w);
      const float d = f16_at(blk);
      for (int r = 0; r < NR; ++r) {
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_abs, _mm256_sign_epi8(load32(x[r].q + 32 * b), w));
        const __m256 low = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[r].scale[b]), _mm512_castps512_ps256(acc[r]));
        acc[r] = _mm512_insertf32x8(acc[r], low, 0);
      }
    }
    for (int r = 0; r < NR; ++r) {
      out[r] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[r]), _mm512_extractf32x8_ps(acc[r], 1)));
    }
  }
};

inline __m256i q4_0_values(const uint8_t* blk) { return _mm256_sub_epi8(nibbles_16(blk + 2), _mm256_set1_epi8(8)); }
inline __m256i q5_0_values(const uint8_t* blk) { return _mm256_sub_epi8(five_bits(blk + 2, blk + 6), _mm256_set1_epi8(16)); }
inline __m256i q8_0_values(const uint8_t* blk) { return load32(blk + 2); }
inline __m256i iq4_nl_values(const uint8_t* blk) { return iq4_values(blk + 2); }

// Q4_1/Q5_1: w = d * q + m, so sum w x = d dx sum q xq + m dx sum xq.
template <int64_t TypeSize, __m256i (*Quants)(const uint8_t*)>
struct WithMin32 {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out) {
    Accumulators<NR> a;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = row + b * TypeSize;
      const __m256i q = Quants(blk);
      const float d = f16_at(blk), m = f16_at(blk + 2);
      for (int r = 0; r < NR; ++r) {
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, load32(x[r].q + 32 * b));
        a.acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[r].scale[b]), a.acc[r]);
        a.scalar[r] += m * x[r].scale[b] * static_cast<float>(x[r].sums[2 * b] + x[r].sums[2 * b + 1]);
      }
    }
    for (int r = 0; r < NR; ++r) out[r] = hsum(a.acc[r]) + a.scalar[r];
  }
};

inline __m256i q4_1_quants(const uint8_t* blk) { return nibbles_16(blk + 4); }
inline __m256i q5_1_quants(const uint8_t* blk) { return five_bits(blk + 4, blk + 8); }

// ------------------------------------------------------------------------- float weights

// Widen 16 values to fp32 and multiply with x in fp32 (no activation rounding); `n_blocks`
// is the row width here (float weights have blocks of one value, of `Bytes` bytes).
template <int Bytes, __m512 (*Load)(const uint8_t*), float (*Scalar)(const uint8_t*)>
struct Float {
  template <int NR>
  static void dot(const uint8_t* row, const QuantizedRow* x, int64_t k, float* out) {
    __m512 acc0[NR], acc1[NR];
    for (int r = 0; r < NR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      const __m512 w0 = Load(row + Bytes * i), w1 = Load(row + Bytes * (i + 16));
      for (int r = 0; r < NR; ++r) {
        acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r].x + i), acc0[r]);
        acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r].x + i + 16), acc1[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      float total = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
      for (int64_t j = i; j < k; ++j) total += Scalar(row + Bytes * j) * x[r].x[j];
      out[r] = total;
    }
  }
};

// ----------------------------------------------------------------------------- dispatch

using DotFn = void (*)(const uint8_t* row, const QuantizedRow* x, int64_t n_blocks, float* out);

struct DotKernel {
  int64_t act_block;       // activation quantization block; 0: float weights, x stays fp32
  DotFn dot[MAX_ROWS];     // dot[nr - 1] takes nr rows of x
};

template <class Kernel>
DotKernel kernel_of(int64_t act_block) {
  return {act_block, {&Kernel::template dot<1>, &Kernel::template dot<2>, &Kernel::template dot<3>, &Kernel::template dot<4>}};
}

DotKernel dot_kernel(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_0: return kernel_of<Signed32<18, q4_0_values>>(32);
    case TYPE_Q4_1: return kernel_of<WithMin32<20, q4_1_quants>>(32);
    case TYPE_Q5_0: return kernel_of<Signed32<22, q5_0_values>>(32);
    case TYPE_Q5_1: return kernel_of<WithMin32<24, q5_1_quants>>(32);
    case TYPE_Q8_0: return kernel_of<Signed32<34, q8_0_values>>(32);
    case TYPE_IQ4_NL: return kernel_of<Signed32<18, iq4_nl_values>>(32);
    case TYPE_Q2_K: return kernel_of<Q2K>(QK_K);
    case TYPE_Q3_K: return kernel_of<Q3K>(QK_K);
    case TYPE_Q4_K: return kernel_of<Q4K>(QK_K);
    case TYPE_Q5_K: return kernel_of<Q5K>(QK_K);
    case TYPE_Q6_K: return kernel_of<Q6K>(QK_K);
    case TYPE_IQ4_XS: return kernel_of<IQ4XS>(QK_K);
    case TYPE_F32: return kernel_of<Float<4, load_f32x16, f32_at>>(0);
    case TYPE_F16: return kernel_of<Float<2, load_f16x16, f16_at>>(0);
    case TYPE_BF16: return kernel_of<Float<2, load_bf16x16, bf16_at>>(0);
    default: TORCH_CHECK(false, "qwen35_ggml: no gemv kernel for ggml type ", type_id);
  }
}

// x [M, K] prepared for a kernel: quantized rows (or the fp32 rows for float weights).
class Activations {
 public:
  Activations(const at::Tensor& x_in, const DotKernel& kernel)
      : x_(x_in.to(at::kFloat).contiguous()),
        m_(x_.size(0)),
        k_(x_.size(1)),
        quantize_(kernel.act_block > 0),
        act_block_(quantize_ ? kernel.act_block : k_) {
    TORCH_CHECK(k_ % act_block_ == 0, "x rows do not split into blocks of ", act_block_);
    q_ = at::empty({quantize_ ? m_ : 0, k_}, at::kChar);
    scale_ = at::empty({m_, k_ / act_block_}, at::kFloat);
    sums_ = at::empty({m_, k_ / 16}, at::kShort);
    if (!quantize_) return;
    const float* x = x_.data_ptr<float>();
    int8_t* q = q_.data_ptr<int8_t>();
    float* scale = scale_.data_ptr<float>();
    int16_t* sums = sums_.data_ptr<int16_t>();
    at::parallel_for(0, m_, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        quantize_row(x + r * k_, k_, act_block_, q + r * k_, scale + r * (k_ / act_block_), sums + r * (k_ / 16));
      }
    });
  }

  int64_t rows() const { return m_; }
  int64_t width() const { return k_; }

  QuantizedRow row(int64_t r) const {
    return {q_.data_ptr<int8_t>() + (quantize_ ? r * k_ : 0), scale_.data_ptr<float>() + r * (k_ / act_block_),
            sums_.data_ptr<int16_t>() + r * (k_ / 16), x_.data_ptr<float>() + r * k_};
  }

 private:
  at::Tensor x_, q_, scale_, sums_;
  int64_t m_, k_;
  bool quantize_;
  int64_t act_block_;
};

// Weight rows per tile: a tile stays in a core's L2 while every row of x passes over it.
constexpr int64_t TILE_BYTES = 256 * 1024;

// out[slots[j] * n + i] = row i of w . x[slots[j]], for weight rows [i0, i1) and the listed
// rows of x, MAX_ROWS rows of x per kernel call.
void dot_tile(const DotKernel& kernel, const uint8_t* w, int64_t row_bytes, int64_t n_blocks, int64_t i0, int64_t i1,
              const Activations& act, const int64_t* slots, int64_t n_slots, float* out, int64_t n) {
  QuantizedRow rows[MAX_ROWS];
  float result[MAX_ROWS];
  for (int64_t j0 = 0; j0 < n_slots; j0 += MAX_ROWS) {
    const int64_t nr = std::min<int64_t>(MAX_ROWS, n_slots - j0);
    for (int64_t r = 0; r < nr; ++r) rows[r] = act.row(slots[j0 + r]);
    const DotFn dot = kernel.dot[nr - 1];
    for (int64_t i = i0; i < i1; ++i) {
      dot(w + i * row_bytes, rows, n_blocks, result);
      for (int64_t r = 0; r < nr; ++r) out[slots[j0 + r] * n + i] = result[r];
    }
  }
}

int64_t tile_rows(int64_t row_bytes) { return std::max<int64_t>(16, TILE_BYTES / row_bytes); }

at::Tensor gemv(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x) {
  const Geometry geo = geometry(type_id);
  const DotKernel kernel = dot_kernel(type_id);
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  check_blocks(blocks, geo, x.size(1));
  const Activations act(x, kernel);
  const int64_t m = act.rows(), n = blocks.size(0);
  at::Tensor y = at::empty({m, n}, at::kFloat);
  const at::Tensor all_rows = at::arange(m, at::kLong);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), n_blocks = act.width() / geo.block_size;
  const int64_t tile = tile_rows(row_bytes);
  float* out = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end; i0 += tile) {
      dot_tile(kernel, w, row_bytes, n_blocks, i0, std::min(end, i0 + tile), act, all_rows.data_ptr<int64_t>(), m, out, n);
    }
  });
  return y;
}

// MoE in one call: slot s multiplies x[s] with expert ids[s]'s weight.
// blocks [E, N, row_bytes], x [S, K], ids [S] -> [S, N]. Slots are grouped by expert, so each
// used expert's weight is read once per call however many slots use it; threads take
// (expert, tile of weight rows) work items. Each slot's result is what gemv gives its row alone.
at::Tensor expert_gemv(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x, const at::Tensor& ids_in) {
  const Geometry geo = geometry(type_id);
  const DotKernel kernel = dot_kernel(type_id);
  TORCH_CHECK(blocks.dim() == 3, "expert blocks must be [E, N, row_bytes]");
  TORCH_CHECK(x.dim() == 2 && ids_in.dim() == 1 && ids_in.size(0) == x.size(0), "x must be [S, K] and ids [S]");
  const int64_t n_experts = blocks.size(0), n = blocks.size(1), row_bytes = blocks.size(2);
  check_blocks(blocks.view({n_experts * n, row_bytes}), geo, x.size(1));
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t slots = ids.size(0);
  const auto [first, order] = sort_slots_by_expert(id, slots, n_experts);

  const Activations act(x, kernel);
  const int64_t n_blocks = act.width() / geo.block_size;
  const int64_t tile = std::min(n, tile_rows(row_bytes));
  const int64_t tiles_per_expert = (n + tile - 1) / tile;
  std::vector<std::pair<int64_t, int64_t>> items;  // (expert, first weight row)
  for (int64_t e = 0; e < n_experts; ++e) {
    for (int64_t t = 0; first[e + 1] > first[e] && t < tiles_per_expert; ++t) items.emplace_back(e, t * tile);
  }
  at::Tensor y = at::empty({slots, n}, at::kFloat);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [e, i0] = items[item];
      dot_tile(kernel, w + e * n * row_bytes, row_bytes, n_blocks, i0, std::min(n, i0 + tile), act,
               order.data() + first[e], first[e + 1] - first[e], out, n);
    }
  });
  return y;
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("gemv(Tensor blocks, int type_id, Tensor x) -> Tensor", &qwen35_ggml::gemv);
  m.def("expert_gemv(Tensor blocks, int type_id, Tensor x, Tensor ids) -> Tensor", &qwen35_ggml::expert_gemv);
}
