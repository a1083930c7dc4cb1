// Dequantization of ggml blocks to fp32 or bf16, and the prefill matmul built on it.
//
// dequantize_f32:    W rows -> fp32, bit-equal to the reference (same operations in the
//                    same order; compiled with -ffp-contract=off so no FMA fuses them).
// dequantize_bf16:   W rows -> bf16 (each value rounded once from that fp32).
// tiled_matmul_bf16: x[M, K] @ W^T for many rows: W dequantized to bf16 a tile at a time,
//                    each tile multiplied with x in bf16 (fp32 accumulation), fp32 result.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ggml_blocks.h"

namespace qwen35_ggml {
namespace {

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
  alignas(16) int8_t scales[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(scales), q3_k_scales(blk + 96));
  const __m256i hmask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      const __m256i q = _mm256_sub_epi8(q3_k_quants(blk, hmask, h, s), _mm256_set1_epi8(4));
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
  alignas(16) uint8_t sc[16];  // eight scales, then eight mins
  _mm_store_si128(reinterpret_cast<__m128i*>(sc), q4_k_scales_mins(blk + 4));
  const uint8_t* mn = sc + 8;
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

// 32 values d * v (+ m): v given as 32 signed or unsigned bytes.
template <typename Out, bool Signed>
void scale_32(__m256i v, float d, const float* m, Out* out) {
  const __m512 dv = _mm512_set1_ps(d);
  for (int half = 0; half < 2; ++half) {
    const __m128i q = half ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v);
    __m512 y = _mm512_mul_ps(dv, Signed ? i8_to_f32(q) : u8_to_f32(q));
    if (m != nullptr) y = _mm512_add_ps(y, _mm512_set1_ps(*m));
    store16(out + 16 * half, y);
  }
}

template <typename Out>
void dequant_q4_1(const uint8_t* blk, Out* out) {
  const float m = f16_at(blk + 2);
  scale_32<Out, false>(nibbles_16(blk + 4), f16_at(blk), &m, out);
}

template <typename Out>
void dequant_q5_0(const uint8_t* blk, Out* out) {
  scale_32<Out, true>(_mm256_sub_epi8(five_bits(blk + 2, blk + 6), _mm256_set1_epi8(16)), f16_at(blk), nullptr, out);
}

template <typename Out>
void dequant_q5_1(const uint8_t* blk, Out* out) {
  const float m = f16_at(blk + 2);
  scale_32<Out, false>(five_bits(blk + 4, blk + 8), f16_at(blk), &m, out);
}

template <typename Out>
void dequant_iq4_nl(const uint8_t* blk, Out* out) {
  scale_32<Out, true>(iq4_values(blk + 2), f16_at(blk), nullptr, out);
}

template <typename Out>
void dequant_q5_k(const uint8_t* blk, Out* out) {
  const float d = f16_at(blk), dmin = f16_at(blk + 2);
  alignas(16) uint8_t sc[16];  // eight scales, then eight mins
  _mm_store_si128(reinterpret_cast<__m128i*>(sc), q4_k_scales_mins(blk + 4));
  const uint8_t* mn = sc + 8;
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
  for (int j = 0; j < 8; ++j) {
    const __m512 dl = _mm512_set1_ps(d * static_cast<float>(iq4_xs_scale(blk, j)));
    const __m256i v = iq4_values(blk + 8 + 16 * j);
    store16(out + 32 * j, _mm512_mul_ps(dl, i8_to_f32(_mm256_castsi256_si128(v))));
    store16(out + 32 * j + 16, _mm512_mul_ps(dl, i8_to_f32(_mm256_extracti128_si256(v, 1))));
  }
}

inline void store1(float* out, float v) { *out = v; }
inline void store1(at::BFloat16* out, float v) { *out = at::BFloat16(v); }

// Float types convert a whole row (their "block" is one value of `Bytes` bytes).
template <typename Out, int Bytes, __m512 (*Load)(const uint8_t*), float (*Scalar)(const uint8_t*)>
void convert_row(const uint8_t* row, Out* out, int64_t k) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) store16(out + i, Load(row + Bytes * i));
  for (; i < k; ++i) store1(out + i, Scalar(row + Bytes * i));
}

template <typename Out>
void (*block_dequantizer(int64_t type_id))(const uint8_t*, Out*) {
  switch (type_id) {
    case TYPE_Q4_0: return dequant_q4_0<Out>;
    case TYPE_Q4_1: return dequant_q4_1<Out>;
    case TYPE_Q5_0: return dequant_q5_0<Out>;
    case TYPE_Q5_1: return dequant_q5_1<Out>;
    case TYPE_Q8_0: return dequant_q8_0<Out>;
    case TYPE_IQ4_NL: return dequant_iq4_nl<Out>;
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
    case TYPE_F32: return convert_row<Out, 4, load_f32x16, f32_at>;
    case TYPE_F16: return convert_row<Out, 2, load_f16x16, f16_at>;
    case TYPE_BF16: return convert_row<Out, 2, load_bf16x16, bf16_at>;
    default: return nullptr;
  }
}

template <typename Out>
at::Tensor dequantize_rows(const at::Tensor& blocks, int64_t type_id, int64_t k, at::ScalarType dtype) {
  const Geometry geo = geometry(type_id);
  check_blocks(blocks, geo, k);
  const int64_t n = blocks.size(0), row_bytes = blocks.size(1), n_blocks = k / geo.block_size;
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
        block_fn(src + i * row_bytes + b * geo.type_size, dst + i * k + b * geo.block_size);
      }
    }
  });
  return out;
}

// x [M, K] @ W^T for many rows: each thread takes whole tiles of `tile_rows` weight rows,
// dequantizes one into its own bf16 buffer and multiplies it single-threaded (nested
// parallelism is off inside parallel_for), so a call synchronizes its threads once.
at::Tensor tiled_matmul_bf16(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x, int64_t tile_rows) {
  const Geometry geo = geometry(type_id);
  TORCH_CHECK(x.dim() == 2 && tile_rows > 0, "x must be [M, K] and tile_rows positive");
  const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
  check_blocks(blocks, geo, k);
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  at::Tensor out = at::empty({m, n}, at::kFloat);
  const auto block_fn = block_dequantizer<at::BFloat16>(type_id);
  const auto row_fn = row_converter<at::BFloat16>(type_id);
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), n_blocks = k / geo.block_size;
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
        for (int64_t b = 0; b < n_blocks; ++b) block_fn(row + b * geo.type_size, dst + i * k + b * geo.block_size);
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
}  // namespace qwen35_ggml

TORCH_LIBRARY(qwen35_ggml, m) {
  m.def("tiled_matmul_bf16(Tensor blocks, int type_id, Tensor x, int tile_rows) -> Tensor",
        &qwen35_ggml::tiled_matmul_bf16);
  m.def("dequantize_bf16(Tensor blocks, int type_id, int k) -> Tensor", &qwen35_ggml::dequantize_bf16);
  m.def("dequantize_f32(Tensor blocks, int type_id, int k) -> Tensor", &qwen35_ggml::dequantize_f32);
}
