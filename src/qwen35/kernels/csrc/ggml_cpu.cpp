// Fast CPU kernels over ggml blocks (AVX-512 VNNI + BF16), registered as torch.ops.qwen35_ggml.*.
//
// gemv:            y[M, N] = x[M, K] @ W^T straight from the blocks (decode, small M).
//                  x is quantized to int8 per row first, like llama.cpp: per 256 values for
//                  K-quants (with sums per 16 for the min/offset terms), per 32 for Q8_0;
//                  the dot products then run in int8 x uint8 -> int32 (vpdpbusd).
// dequantize_bf16: W rows -> bf16, for prefill tiles fed to a bf16 matmul.
// dequantize_f32:  W rows -> fp32, bit-equal to the reference (same operations, no FMA
//                  contraction: compiled with -ffp-contract=off).
//
// Block layouts follow ggml-common.h; see dequant.py for the plain reference.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t QK_K = 256;
// ggml type ids
constexpr int64_t TYPE_Q8_0 = 8;
constexpr int64_t TYPE_Q4_K = 12;
constexpr int64_t TYPE_Q6_K = 14;

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
struct QuantizedRow {
  const int8_t* q;
  const float* scale;
  const int16_t* sums;
};

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
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    // The -32 offset: subtract 32 * sum_k scale_k * (sum of the 16 x values of group k).
    const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sums + b * 16));
    __m256i iacc = _mm256_sub_epi32(_mm256_setzero_si256(),
                                    _mm256_slli_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), sums), 5));
    const int8_t* xq = x.q + b * QK_K;
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = blk + 64 * h;
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
      for (int c = 0; c < 4; ++c) {
        const __m256i q = q6_k_quants(ql, qh, c);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 128 * h + 32 * c));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xv);
        // Lanes 0-3 cover group k, lanes 4-7 group k + 1.
        const int k = 8 * h + 2 * c;
        const __m256i sc = _mm256_setr_epi32(reinterpret_cast<const int8_t*>(blk + 192)[k],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k + 1],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k + 1],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k + 1],
                                             reinterpret_cast<const int8_t*>(blk + 192)[k + 1]);
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
    // int8 x int8 via the unsigned x signed instruction: |w| times x with w's sign.
    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
  }
  return hsum(acc);
}

struct TypeInfo {
  int64_t block_size;
  int64_t type_size;
  int64_t act_block;  // activation quantization block for gemv
  float (*dot)(const uint8_t*, const QuantizedRow&, int64_t);
};

TypeInfo type_info(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_K: return {QK_K, 144, QK_K, dot_q4_k};
    case TYPE_Q6_K: return {QK_K, 210, QK_K, dot_q6_k};
    case TYPE_Q8_0: return {32, 34, 32, dot_q8_0};
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
  at::Tensor xq = at::empty({m, k}, at::kChar);
  at::Tensor xd = at::empty({m, k / info.act_block}, at::kFloat);
  at::Tensor xs = at::empty({m, k / 16}, at::kShort);
  for (int64_t r = 0; r < m; ++r) {
    quantize_row(x.data_ptr<float>() + r * k, k, info.act_block, xq.data_ptr<int8_t>() + r * k,
                 xd.data_ptr<float>() + r * (k / info.act_block), xs.data_ptr<int16_t>() + r * (k / 16));
  }
  at::Tensor y = at::empty({m, n}, at::kFloat);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), n_blocks = k / info.block_size;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t r = 0; r < m; ++r) {
        const QuantizedRow row{xq.data_ptr<int8_t>() + r * k, xd.data_ptr<float>() + r * (k / info.act_block),
                               xs.data_ptr<int16_t>() + r * (k / 16)};
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
    store16(out + 16 * half, _mm512_mul_ps(i8_to_f32(q), d));
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
  void (*block_fn)(const uint8_t*, Out*) = type_id == TYPE_Q4_K   ? dequant_q4_k<Out>
                                           : type_id == TYPE_Q6_K ? dequant_q6_k<Out>
                                                                  : dequant_q8_0<Out>;
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t b = 0; b < n_blocks; ++b) {
        block_fn(src + i * row_bytes + b * info.type_size, dst + i * k + b * info.block_size);
      }
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
  m.def("dequantize_bf16(Tensor blocks, int type_id, int k) -> Tensor", &dequantize_bf16);
  m.def("dequantize_f32(Tensor blocks, int type_id, int k) -> Tensor", &dequantize_f32);
}
