// K/V cache rows kept as GGUF blocks (engine/quantized_kv.py, llama.cpp's -ctk/-ctv q8_0, q4_0,
// q4_1, q5_0 and q5_1), as attention_decode.cpp reads and writes them: each (row, slot, kv head)
// vector of head_dim values is head_dim / 32 blocks, read 16 values at a time straight from the
// blocks (never the whole cache dequantized) and written by quantizing the new token's vector as
// gguf-py's reference quantizer does, bit for bit (quantize_rows in engine/quantized_kv.py).
// Values read are those kernels/dequant.py gives: d * q, or d * q + m rounded twice.
// The build does not contract to FMAs, so x * inverse + 8.5 rounds twice, as numpy's does.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qwen35_ggml {

// ggml's block_q8_0: a float16 scale d, then 32 int8 quants; value i = d * quants[i].
struct BlockQ8_0 {
  static constexpr int64_t kValues = 32;
  uint8_t scale[2];
  int8_t quants[32];
};
// ggml's block_q4_0: a float16 scale d, then 16 bytes: value i in the low nibble of byte i,
// value i + 16 in its high nibble; value = d * (nibble - 8).
struct BlockQ4_0 {
  static constexpr int64_t kValues = 32;
  uint8_t scale[2];
  uint8_t nibbles[16];
};
// ggml's block_q4_1: d, a float16 minimum m, the nibbles as Q4_0's; value = d * nibble + m.
struct BlockQ4_1 {
  static constexpr int64_t kValues = 32;
  uint8_t scale[2];
  uint8_t minimum[2];
  uint8_t nibbles[16];
};
// ggml's block_q5_0: d, then bit 4 of quant i at bit i of a little-endian uint32, then its low
// four bits as Q4_0's nibbles; value = d * (quant - 16).
struct BlockQ5_0 {
  static constexpr int64_t kValues = 32;
  uint8_t scale[2];
  uint8_t high_bits[4];
  uint8_t nibbles[16];
};
// ggml's block_q5_1: d, m, then the quants as Q5_0's; value = d * quant + m.
struct BlockQ5_1 {
  static constexpr int64_t kValues = 32;
  uint8_t scale[2];
  uint8_t minimum[2];
  uint8_t high_bits[4];
  uint8_t nibbles[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 &&
                  sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24,
              "ggml's block sizes");

// Values per storage unit: an element of a float storage, a block of a block storage.
template <typename T, typename = void>
struct Unit {
  static constexpr int64_t values = 1;
};
template <typename T>
struct Unit<T, std::void_t<decltype(T::kValues)>> {
  static constexpr int64_t values = T::kValues;
};

inline __m512 half_to_lanes(const uint8_t* half) {
  uint16_t bits;
  std::memcpy(&bits, half, sizeof(bits));
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(bits)));
}

// Quants c % 32 .. c % 32 + 15 of a block's nibbles (c a multiple of 16): the low nibbles of
// its 16 bytes, or their high ones.
inline __m512i nibbles_at(const uint8_t* nibbles, int64_t c) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles)));
  return c % 32 ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
}

// The five-bit quants at c: the nibbles with bit 4 set where the block's high bits say.
inline __m512i five_bits_at(const uint8_t* high_bits, const uint8_t* nibbles, int64_t c) {
  uint32_t bits;
  std::memcpy(&bits, high_bits, sizeof(bits));
  const __m512i low = nibbles_at(nibbles, c);
  return _mm512_mask_or_epi32(low, static_cast<__mmask16>(bits >> (c % 32)), low, _mm512_set1_epi32(16));
}

inline __m512 scaled(__m512i quants, const uint8_t* scale) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(quants), half_to_lanes(scale));
}

inline __m512 scaled_plus_minimum(__m512i quants, const uint8_t* scale, const uint8_t* minimum) {
  return _mm512_add_ps(scaled(quants, scale), half_to_lanes(minimum));
}

// Values c .. c + 15 of a row (c a multiple of 16; head_dim a multiple of 32, so no lane is
// masked) as fp32.
inline __m512 load_at(const BlockQ8_0* row, int64_t c, __mmask16) {
  const BlockQ8_0& block = row[c / 32];
  const __m128i quants = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block.quants + c % 32));
  return scaled(_mm512_cvtepi8_epi32(quants), block.scale);
}

inline __m512 load_at(const BlockQ4_0* row, int64_t c, __mmask16) {
  const BlockQ4_0& block = row[c / 32];
  return scaled(_mm512_sub_epi32(nibbles_at(block.nibbles, c), _mm512_set1_epi32(8)), block.scale);
}

inline __m512 load_at(const BlockQ4_1* row, int64_t c, __mmask16) {
  const BlockQ4_1& block = row[c / 32];
  return scaled_plus_minimum(nibbles_at(block.nibbles, c), block.scale, block.minimum);
}

inline __m512 load_at(const BlockQ5_0* row, int64_t c, __mmask16) {
  const BlockQ5_0& block = row[c / 32];
  return scaled(_mm512_sub_epi32(five_bits_at(block.high_bits, block.nibbles, c), _mm512_set1_epi32(16)),
                block.scale);
}

inline __m512 load_at(const BlockQ5_1* row, int64_t c, __mmask16) {
  const BlockQ5_1& block = row[c / 32];
  return scaled_plus_minimum(five_bits_at(block.high_bits, block.nibbles, c), block.scale, block.minimum);
}

// ---------------------------------------------------------------- writing: gguf-py's quantizers

inline void store_half(uint8_t* half, float x) {
  const uint16_t bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // numpy's astype(float16)
  std::memcpy(half, &bits, sizeof(bits));
}

// Q4_0 and Q5_0: d = the value of largest magnitude (the first such) / -levels, quants =
// trunc(x / d + levels + 0.5) clipped to 0 .. 2 levels - 1 (x / d as x * (1 / d)). Returns d.
inline float symmetric_quants(const float* x, int levels, uint8_t* quants) {
  int largest = 0;
  for (int i = 1; i < 32; ++i) {
    if (std::fabs(x[i]) > std::fabs(x[largest])) largest = i;
  }
  const float d = x[largest] / static_cast<float>(-levels);
  const float inverse = d == 0.0f ? 0.0f : 1.0f / d;
  const float offset = static_cast<float>(levels) + 0.5f;
  for (int i = 0; i < 32; ++i) {
    const int quant = static_cast<int>(std::trunc(x[i] * inverse + offset));
    quants[i] = static_cast<uint8_t>(std::clamp(quant, 0, 2 * levels - 1));
  }
  return d;
}

// Q4_1 and Q5_1: m = the smallest value, d = (largest - m) / top, quants = trunc((x - m) / d +
// 0.5) clipped to 0 .. top. Returns d, m in `minimum`.
inline float quants_over_minimum(const float* x, int top, uint8_t* quants, float* minimum) {
  float low = x[0], high = x[0];
  for (int i = 1; i < 32; ++i) {
    low = std::min(low, x[i]);
    high = std::max(high, x[i]);
  }
  const float d = (high - low) / static_cast<float>(top);
  const float inverse = d == 0.0f ? 0.0f : 1.0f / d;
  for (int i = 0; i < 32; ++i) {
    quants[i] = static_cast<uint8_t>(std::clamp(static_cast<int>(std::trunc((x[i] - low) * inverse + 0.5f)), 0, top));
  }
  *minimum = low;
  return d;
}

inline void pack_nibbles(const uint8_t* quants, uint8_t* nibbles) {
  for (int i = 0; i < 16; ++i) nibbles[i] = static_cast<uint8_t>((quants[i] & 0x0F) | quants[i + 16] << 4);
}

inline void pack_high_bits(const uint8_t* quants, uint8_t* high_bits) {
  uint32_t bits = 0;
  for (int i = 0; i < 32; ++i) bits |= static_cast<uint32_t>(quants[i] >> 4) << i;
  std::memcpy(high_bits, &bits, sizeof(bits));  // little-endian, as np.packbits(bitorder="little")
}

// Q8_0: d = max |x| / 127, quants = round half away from zero (x / d as x * (1 / d)).
inline void store_row(BlockQ8_0* row, const float* x, int64_t dim) {
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    float largest = 0.0f;
    for (int i = 0; i < 32; ++i) largest = std::max(largest, std::fabs(x[i]));
    const float d = largest / 127.0f;
    const float inverse = d == 0.0f ? 0.0f : 1.0f / d;
    store_half(row[b].scale, d);
    for (int i = 0; i < 32; ++i) row[b].quants[i] = static_cast<int8_t>(std::round(x[i] * inverse));
  }
}

inline void store_row(BlockQ4_0* row, const float* x, int64_t dim) {
  uint8_t quants[32];
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    store_half(row[b].scale, symmetric_quants(x, 8, quants));
    pack_nibbles(quants, row[b].nibbles);
  }
}

inline void store_row(BlockQ4_1* row, const float* x, int64_t dim) {
  uint8_t quants[32];
  float minimum;
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    store_half(row[b].scale, quants_over_minimum(x, 15, quants, &minimum));
    store_half(row[b].minimum, minimum);
    pack_nibbles(quants, row[b].nibbles);
  }
}

inline void store_row(BlockQ5_0* row, const float* x, int64_t dim) {
  uint8_t quants[32];
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    store_half(row[b].scale, symmetric_quants(x, 16, quants));
    pack_high_bits(quants, row[b].high_bits);
    pack_nibbles(quants, row[b].nibbles);
  }
}

inline void store_row(BlockQ5_1* row, const float* x, int64_t dim) {
  uint8_t quants[32];
  float minimum;
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    store_half(row[b].scale, quants_over_minimum(x, 31, quants, &minimum));
    store_half(row[b].minimum, minimum);
    pack_high_bits(quants, row[b].high_bits);
    pack_nibbles(quants, row[b].nibbles);
  }
}

}  // namespace qwen35_ggml
