// K/V cache rows kept as GGUF blocks (engine/quantized_kv.py, llama.cpp's -ctk/-ctv q8_0 and
// q4_0), as attention_decode.cpp reads and writes them: each (row, slot, kv head) vector of
// head_dim values is head_dim / 32 blocks, read 16 values at a time straight from the blocks
// (never the whole cache dequantized) and written by quantizing the new token's vector as
// gguf-py's reference quantizer does, bit for bit (quantize_rows in engine/quantized_kv.py).
// The build does not contract to FMAs, so x * inverse + 8.5 rounds twice, as numpy's does.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace qwen35_ggml {

// ggml's block_q8_0: a float16 scale d, then 32 int8 quants; value i = d * quants[i].
struct BlockQ8_0 {
  uint8_t scale[2];
  int8_t quants[32];
};
// ggml's block_q4_0: a float16 scale d, then 16 bytes: value i in the low nibble of byte i,
// value i + 16 in its high nibble; value = d * (nibble - 8).
struct BlockQ4_0 {
  uint8_t scale[2];
  uint8_t nibbles[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18, "ggml's block sizes");

// Values per storage unit: an element of a float storage, a block of a block storage.
template <typename T>
struct Unit {
  static constexpr int64_t values = 1;
};
template <>
struct Unit<BlockQ8_0> {
  static constexpr int64_t values = 32;
};
template <>
struct Unit<BlockQ4_0> {
  static constexpr int64_t values = 32;
};

inline __m512 block_scale(const uint8_t* scale) {
  uint16_t bits;
  std::memcpy(&bits, scale, sizeof(bits));
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(bits)));
}

// Values c .. c + 15 of a row (c a multiple of 16; head_dim a multiple of 32, so no lane is
// masked) as fp32: d times the quant, exact in fp32 as the reference's dequantized values are.
inline __m512 load_at(const BlockQ8_0* row, int64_t c, __mmask16) {
  const BlockQ8_0& block = row[c / 32];
  const __m128i quants = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block.quants + c % 32));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(quants)), block_scale(block.scale));
}

inline __m512 load_at(const BlockQ4_0* row, int64_t c, __mmask16) {
  const BlockQ4_0& block = row[c / 32];
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block.nibbles)));
  const __m512i nibbles = c % 32 ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F));
  const __m512 centred = _mm512_cvtepi32_ps(_mm512_sub_epi32(nibbles, _mm512_set1_epi32(8)));
  return _mm512_mul_ps(centred, block_scale(block.scale));
}

inline void store_scale(uint8_t* scale, float d) {
  const uint16_t bits = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // numpy's astype(float16)
  std::memcpy(scale, &bits, sizeof(bits));
}

// gguf-py's Q8_0: d = max |x| / 127, quants = round half away from zero (x / d as x * (1 / d)).
inline void store_row(BlockQ8_0* row, const float* x, int64_t dim) {
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    float largest = 0.0f;
    for (int i = 0; i < 32; ++i) largest = std::max(largest, std::fabs(x[i]));
    const float d = largest / 127.0f;
    const float inverse = d == 0.0f ? 0.0f : 1.0f / d;
    store_scale(row[b].scale, d);
    for (int i = 0; i < 32; ++i) row[b].quants[i] = static_cast<int8_t>(std::round(x[i] * inverse));
  }
}

// gguf-py's Q4_0: d = the value of largest magnitude (the first such) / -8, quants =
// trunc(x / d + 8.5) clipped to 0..15.
inline void store_row(BlockQ4_0* row, const float* x, int64_t dim) {
  auto quant = [](float value, float inverse) {
    return std::clamp(static_cast<int>(std::trunc(value * inverse + 8.5f)), 0, 15);
  };
  for (int64_t b = 0; b < dim / 32; ++b, x += 32) {
    int largest = 0;
    for (int i = 1; i < 32; ++i) {
      if (std::fabs(x[i]) > std::fabs(x[largest])) largest = i;
    }
    const float d = x[largest] / -8.0f;
    const float inverse = d == 0.0f ? 0.0f : 1.0f / d;
    store_scale(row[b].scale, d);
    for (int i = 0; i < 16; ++i) {
      row[b].nibbles[i] = static_cast<uint8_t>(quant(x[i], inverse) | quant(x[i + 16], inverse) << 4);
    }
  }
}

}  // namespace qwen35_ggml
