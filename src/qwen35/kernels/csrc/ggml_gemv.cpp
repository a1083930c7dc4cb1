// gemv: y[M, N] = x[M, K] @ W^T straight from ggml blocks, for decode (small M);
// expert_gemv: the same for MoE slots, each with its own expert, in one call.
//
// x is quantized to int8 per row first, like llama.cpp: per 256 values for super-block
// types (with sums per 16 for the min/offset terms), per 32 for 32-value blocks; the dot
// products then run as uint8 x int8 -> int32 (vpdpbusd), scaled once per block.
// F16/BF16 weights are widened to fp32 and multiplied with x in fp32.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ggml_blocks.h"

namespace qwen35_ggml {
namespace {

// One row of x quantized to int8: blocks of `block` values share a float scale;
// `sums` holds the sum of each 16 quantized values (for the weights' min/offset terms).
// Float weights (F16/BF16) skip the quantization and use `x` directly.
struct QuantizedRow {
  const int8_t* q;
  const float* scale;
  const int16_t* sums;
  const float* x;
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

float dot_q4_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 144;
    const float dx = x.scale[b];
    const __m128i scales_mins = q4_k_scales_mins(blk + 4);
    alignas(16) uint8_t sc[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(sc), scales_mins);
    min_total += f16_at(blk + 2) * dx * static_cast<float>(q4_k_min_dot(scales_mins, x.sums + b * 16));

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

float dot_q2_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 84;
    const float dx = x.scale[b];
    // Byte k: scale of group k in the low nibble, its min in the high nibble.
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i scales = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
    const __m128i mins = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
    min_total += f16_at(blk + 82) * dx * static_cast<float>(hsum_i32(scaled_group_sums(mins, x.sums + b * 16)));
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
    const __m128i scales = q3_k_scales(blk + 96);
    // Quants are stored plus 4: subtract 4 * sum_k scale_k * (sum of group k's x).
    __m256i iacc = _mm256_sub_epi32(_mm256_setzero_si256(),
                                    _mm256_slli_epi32(scaled_group_sums(scales, x.sums + b * 16), 2));
    const __m256i hmask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
    const int8_t* xq = x.q + b * QK_K;
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 128 * h + 32 * s));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q3_k_quants(blk, hmask, h, s), xv);
        iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p, group_pair_scales(scales, 8 * h + 2 * s)));
      }
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk + 108) * x.scale[b]), acc);
  }
  return hsum(acc);
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
        iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(p, group_pair_scales(scales, 8 * h + 2 * c)));
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

// Q4_1/Q5_1: w = d * q + m, so sum w x = d dx sum q xq + m dx sum xq.
template <int64_t TypeSize, __m256i (*Quants)(const uint8_t*)>
float dot_with_min(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * TypeSize;
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * b));
    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), Quants(blk), xv);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
    min_total += f16_at(blk + 2) * x.scale[b] * static_cast<float>(x.sums[2 * b] + x.sums[2 * b + 1]);
  }
  return hsum(acc) + min_total;
}

inline __m256i q4_1_quants(const uint8_t* blk) { return nibbles_16(blk + 4); }
inline __m256i q5_1_quants(const uint8_t* blk) { return five_bits(blk + 4, blk + 8); }

// Q5_0/IQ4_NL: signed values times one fp16 scale per 32.
template <int64_t TypeSize, __m256i (*Values)(const uint8_t*)>
float dot_signed_32(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * TypeSize;
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + 32 * b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(Values(blk), xv)), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
  }
  return hsum(acc);
}

inline __m256i q5_0_values(const uint8_t* blk) { return _mm256_sub_epi8(five_bits(blk + 2, blk + 6), _mm256_set1_epi8(16)); }
inline __m256i iq4_nl_values(const uint8_t* blk) { return iq4_values(blk + 2); }

float dot_q5_k(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bit0 = _mm256_set1_epi8(0x01);
  __m256 acc = _mm256_setzero_ps();
  float min_total = 0.0f;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 176;
    const float dx = x.scale[b];
    const __m128i scales_mins = q4_k_scales_mins(blk + 4);
    alignas(16) uint8_t sc[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(sc), scales_mins);
    min_total += f16_at(blk + 2) * dx * static_cast<float>(q4_k_min_dot(scales_mins, x.sums + b * 16));

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

float dot_iq4_xs(const uint8_t* row, const QuantizedRow& x, int64_t n_blocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* blk = row + b * 136;
    const int8_t* xq = x.q + b * QK_K;
    __m256i iacc = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {
      const __m256i w = iq4_values(blk + 8 + 16 * j);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * j));
      iacc = _mm256_add_epi32(iacc, _mm256_mullo_epi32(dot_s8(w, xv), _mm256_set1_epi32(iq4_xs_scale(blk, j))));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc), _mm256_set1_ps(f16_at(blk) * x.scale[b]), acc);
  }
  return hsum(acc);
}

// Float weights: widen 16 values to fp32 and multiply with x in fp32 (no activation rounding).
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

struct DotKernel {
  int64_t act_block;  // activation quantization block; 0: float weights, x stays fp32
  float (*dot)(const uint8_t*, const QuantizedRow&, int64_t);  // last argument: blocks per row
};

DotKernel dot_kernel(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_0: return {32, dot_q4_0};
    case TYPE_Q4_1: return {32, dot_with_min<20, q4_1_quants>};
    case TYPE_Q5_0: return {32, dot_signed_32<22, q5_0_values>};
    case TYPE_Q5_1: return {32, dot_with_min<24, q5_1_quants>};
    case TYPE_Q8_0: return {32, dot_q8_0};
    case TYPE_IQ4_NL: return {32, dot_signed_32<18, iq4_nl_values>};
    case TYPE_Q2_K: return {QK_K, dot_q2_k};
    case TYPE_Q3_K: return {QK_K, dot_q3_k};
    case TYPE_Q4_K: return {QK_K, dot_q4_k};
    case TYPE_Q5_K: return {QK_K, dot_q5_k};
    case TYPE_Q6_K: return {QK_K, dot_q6_k};
    case TYPE_IQ4_XS: return {QK_K, dot_iq4_xs};
    case TYPE_F16: return {0, dot_float<load_f16x16, f16_at>};
    case TYPE_BF16: return {0, dot_float<load_bf16x16, bf16_at>};
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
    for (int64_t r = 0; quantize_ && r < m_; ++r) {
      quantize_row(x_.data_ptr<float>() + r * k_, k_, act_block_, q_.data_ptr<int8_t>() + r * k_,
                   scale_.data_ptr<float>() + r * (k_ / act_block_), sums_.data_ptr<int16_t>() + r * (k_ / 16));
    }
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

at::Tensor gemv(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x) {
  const Geometry geo = geometry(type_id);
  const DotKernel kernel = dot_kernel(type_id);
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  check_blocks(blocks, geo, x.size(1));
  const Activations act(x, kernel);
  const int64_t m = act.rows(), n = blocks.size(0);
  at::Tensor y = at::empty({m, n}, at::kFloat);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1), n_blocks = act.width() / geo.block_size;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t r = 0; r < m; ++r) out[r * n + i] = kernel.dot(w + i * row_bytes, act.row(r), n_blocks);
    }
  });
  return y;
}

// MoE decode in one call: slot s multiplies x[s] with expert ids[s]'s weight.
// blocks [E, N, row_bytes], x [S, K], ids [S] -> [S, N]; threads split the S * N dot products.
at::Tensor expert_gemv(const at::Tensor& blocks, int64_t type_id, const at::Tensor& x, const at::Tensor& ids_in) {
  const Geometry geo = geometry(type_id);
  const DotKernel kernel = dot_kernel(type_id);
  TORCH_CHECK(blocks.dim() == 3, "expert blocks must be [E, N, row_bytes]");
  TORCH_CHECK(x.dim() == 2 && ids_in.dim() == 1 && ids_in.size(0) == x.size(0), "x must be [S, K] and ids [S]");
  const int64_t n_experts = blocks.size(0), n = blocks.size(1), row_bytes = blocks.size(2);
  check_blocks(blocks.view({n_experts * n, row_bytes}), geo, x.size(1));
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t s = 0; s < ids.size(0); ++s) {
    TORCH_CHECK(id[s] >= 0 && id[s] < n_experts, "expert id ", id[s], " out of range [0, ", n_experts, ")");
  }
  const Activations act(x, kernel);
  const int64_t slots = act.rows(), n_blocks = act.width() / geo.block_size;
  at::Tensor y = at::empty({slots, n}, at::kFloat);
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, slots * n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = j / n, i = j % n;
      out[j] = kernel.dot(w + (id[s] * n + i) * row_bytes, act.row(s), n_blocks);
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
