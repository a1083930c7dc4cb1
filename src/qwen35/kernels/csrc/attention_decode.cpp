// A gated full-attention layer's decode step (one new token per row) between its two matmuls,
// as one call: q/k RMS norms, partial rotate-half RoPE, the K/V cache write, single-query GQA
// attention and the sigmoid output gate. The plain reference is Attention.__call__ in
// model/qwen35.py for length 1 (layer_rms_norm, apply_rotary, AttentionKV.write,
// _single_query_attention, the gate); tests/test_attention_decode.py pins them together.
//
// In torch ops that step is ~30 small operations and their dispatches, which cost far more
// than the arithmetic of a short context. Here each row's context is cut into fixed ranges of
// slots, each with its own softmax maximum and sum, merged at the end (the split-context form
// of decode attention); a short context runs on the calling thread, a long one's ranges over
// the threads. The cuts depend on the row's length alone: batch- and thread-invariant bits.
// Everything is computed in fp32. K and V storage is each of its own type, llama.cpp's cache
// types: fp32, fp16, bf16, or Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 blocks (attention_kv_blocks.h: read
// a block at a time, the new token quantized as the cache's `write` quantizes it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_kv_blocks.h"
#include "ggml_blocks.h"
#include "vector_math.h"

namespace qwen35_ggml {
namespace {

// Slots per tile of the value pass: a tile's V rows stay in L1 while every query head of
// the group reads them.
constexpr int64_t kTileSlots = 32;
// Below this much work (slots x query heads, over the batch) one thread does it all. Measured
// on 2 cores (n_q 8 and 16, hd 256, calls back to back so the threads are awake, as after the
// matmuls before): a second thread gains 1.2x at 512, 1.4x at 1024, 1.8x from 4096; 1024
// leaves room for threads that have gone to sleep (serial calls then take ~15 us at most).
constexpr int64_t kSerialWork = 1024;
// Slots per range: each (row, kv head) attends over its slots in ranges of this many, merged
// at the end, whether one thread or several run them. The ranges depend on the row's own
// length alone, so a row's result is the same bits whatever shares its batch and however many
// threads there are. Long enough to outweigh its share of the merge; its score buffer stays small.
constexpr int64_t kRangeSlots = 512;
// How far ahead the score pass fetches K rows (DRAM latency, not bandwidth, bounds one thread
// reading a few short rows at a time). Measured with K/V out of cache: 16 rows ahead beat 4,
// 32 and 64 by 5-15%.
constexpr int64_t kPrefetchSlots = 16;

// 16 stored values as fp32, and fp32 rounded to the storage's type as torch's .to() rounds.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
}
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store16(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16(at::BFloat16* p, __m512 x, __mmask16 m) {
  // Round to nearest even in integers (vcvtneps2bf16 would flush denormals), NaN as torch's 0x7FC0.
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(rounded));
}
inline void store16(at::Half* p, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// A storage row (one slot's vector of one kv head) as every storage type is read and written:
// values c .. c + 15 of the row, where its values start to prefetch, the whole row written.
// The block types' overloads are in attention_kv_blocks.h.
template <typename T>
inline __m512 load_at(const T* row, int64_t c, __mmask16 m) {
  return load16(row + c, m);
}
template <typename T>
inline const char* address(const T* row, int64_t c) {
  return reinterpret_cast<const char*>(row + c / Unit<T>::values);
}
template <typename T>
inline void store_row(T* row, const float* x, int64_t dim) {
  for (int64_t c = 0; c < dim; c += kLanes) {
    const __mmask16 m = lanes_below(dim - c);
    store16(row + c, _mm512_maskz_loadu_ps(m, x + c), m);
  }
}

// One head: out = x * rsqrt(mean(x^2) + eps) * weight. The same sums in the same order as
// layer_ops.cpp's norm_row (the reference's layer_rms_norm), so the same bits.
void norm_head(const float* x, const float* weight, float* out, int64_t n, float eps) {
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  float total = _mm512_reduce_add_ps(sum);
  for (; i < n; ++i) total += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(total / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

// Rotate-half RoPE on the first rotary_dim values of x, in place: x*cos + rotate_half(x)*sin,
// multiplied and added apart as the reference does (the build does not contract to FMAs).
void rotate_half(float* x, const float* cos, const float* sin, int64_t rotary_dim, float* scratch) {
  const int64_t half = rotary_dim / 2;
  std::copy_n(x, rotary_dim, scratch);
  for (int64_t i = 0; i < half; ++i) x[i] = scratch[i] * cos[i] - scratch[i + half] * sin[i];
  for (int64_t i = half; i < rotary_dim; ++i) x[i] = scratch[i] * cos[i] + scratch[i - half] * sin[i];
}

// Lane sums of 16 vectors as one vector (lane j: the sum of v[j]'s lanes), in four steps of
// shuffles and adds (halves, quarters, pairs, single lanes): 15 adds instead of 16 reductions.
__attribute__((always_inline)) inline __m512 lane_sums16(const __m512* v) {
  __m512 halves[8], quarters[4], pairs[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // 256-bit blocks 0-1 hold v[2i]'s 8 partial sums, blocks 2-3 v[2i+1]'s
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 128-bit block j holds v[4i+j]'s 4 partial sums
    const __m512 a = halves[2 * i], b = halves[2 * i + 1];
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // block j: 2 partial sums of v[8i+j], then 2 of v[8i+4+j]
    const __m512 a = quarters[2 * i], b = quarters[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Lane 4j+p now holds the sum of v[4p+j]: transpose that 4 x 4 order back.
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// q . k for kHeads query heads (q, q + dim, ...) and the kSlots K rows k, k + stride, ...: 16
// sums in registers, each load of q or k serving several products, reduced together. Lane
// h * kSlots + s of the result is head h's product with row s. (Small loops are unrolled by
// hand so that the arrays of vectors live in registers: GCC keeps an array indexed by a loop
// variable in memory.) `prefetch`: rows to fetch meanwhile, or nullptr.
template <int kHeads, int kSlots, typename T>
inline __m512 score_block(const float* q, const T* k, int64_t stride, int64_t dim, const T* prefetch) {
  static_assert(kHeads * kSlots == kLanes, "one sum per lane");
  __m512 sums[kLanes];
#pragma GCC unroll 16
  for (int j = 0; j < kLanes; ++j) sums[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < dim; c += kLanes) {
    const __mmask16 m = lanes_below(dim - c);
    __m512 qc[kHeads];
#pragma GCC unroll 4
    for (int h = 0; h < kHeads; ++h) qc[h] = _mm512_maskz_loadu_ps(m, q + h * dim + c);
    if (prefetch != nullptr) {
#pragma GCC unroll 16
      for (int s = 0; s < kSlots; ++s) {
        _mm_prefetch(address(prefetch + s * stride, c), _MM_HINT_T0);
      }
    }
#pragma GCC unroll 16
    for (int s = 0; s < kSlots; ++s) {
      const __m512 x = load_at(k + s * stride, c, m);
#pragma GCC unroll 4
      for (int h = 0; h < kHeads; ++h) sums[h * kSlots + s] = _mm512_fmadd_ps(qc[h], x, sums[h * kSlots + s]);
    }
  }
  return lane_sums16(sums);
}

// Rows of 4- and 5-bit blocks that several passes read (the group's query heads a few at a time)
// are decoded once into fp32 rows first: unpacking 16 values takes several instructions, more
// than the products they feed. The same fp32 values either way, so the same sums. Measured at
// 8K slots (16 query heads over 2 kv heads): K decoded once for two passes or more and V for
// three or more, 1.3-1.6x on one thread (q4_0 1.08x on two); V for two passes gained nothing.
// Q8_0's rows (a widening and a product per 16 values) are read in place: decoded once they
// gained 1.1x on one thread but lost 1.1x on two.
template <typename T>
constexpr bool kDecodedOnce = Unit<T>::values > 1 && !std::is_same_v<T, BlockQ8_0>;

// rows[0 : count] (each dim values, dim a multiple of 32) as fp32 rows of out, fetching the rows
// at `prefetch` meanwhile unless it is nullptr.
template <typename T>
void decode_rows(const T* rows, int64_t stride, int64_t count, int64_t dim, float* out, const T* prefetch) {
  const int64_t row_bytes = dim / Unit<T>::values * static_cast<int64_t>(sizeof(T));
  for (int64_t s = 0; s < count; ++s, out += dim) {
    if (prefetch != nullptr) {
      const char* ahead = reinterpret_cast<const char*>(prefetch + s * stride);
      for (int64_t byte = 0; byte < row_bytes; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
      _mm_prefetch(ahead + row_bytes - 1, _MM_HINT_T0);
    }
    const T* row = rows + s * stride;
    for (int64_t c = 0; c < dim; c += 2 * kLanes) {  // a block's two halves, its scale read once
      const __m512 low = load_at(row, c, 0xFFFF), high = load_at(row, c + kLanes, 0xFFFF);
      _mm512_storeu_ps(out + c, low);
      _mm512_storeu_ps(out + c + kLanes, high);
    }
  }
}

// scores[g][s] = scale q_g . k_s for the group's heads over count >= 16 rows, in blocks of
// kHeads x kSlots; the last block of rows ends at the last row, overlapping the one before
// (only its new rows are kept). `decoded`: room for kSlots fp32 rows.
template <int kHeads, int kSlots, typename T>
void score_rows(const float* q, const T* k, int64_t stride, int64_t count, int64_t dim, int64_t group, float scale,
                float* scores, float* decoded) {
  const bool decode = kDecodedOnce<T> && group > kHeads;
  for (int64_t s = 0; s < count; s += kSlots) {
    const int64_t first = std::min(s, count - kSlots), fresh = s - first;
    const T* ahead = first + kPrefetchSlots + kSlots <= count ? k + (first + kPrefetchSlots) * stride : nullptr;
    if (decode) decode_rows(k + first * stride, stride, kSlots, dim, decoded, ahead);
    for (int64_t g = 0; g < group; g += kHeads) {
      alignas(64) float dots[kLanes];
      const __m512 block = decode ? score_block<kHeads, kSlots, float>(q + g * dim, decoded, dim, dim, nullptr)
                                  : score_block<kHeads, kSlots>(q + g * dim, k + first * stride, stride, dim,
                                                                g == 0 ? ahead : nullptr);
      _mm512_store_ps(dots, _mm512_mul_ps(block, _mm512_set1_ps(scale)));
      for (int h = 0; h < kHeads; ++h) {
        for (int64_t j = fresh; j < kSlots; ++j) scores[(g + h) * count + first + j] = dots[h * kSlots + j];
      }
    }
  }
}

// One q . k at a time, for contexts under 16 slots.
template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < dim; c += kLanes) {
    const __mmask16 m = lanes_below(dim - c);
    sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + c), load_at(k, c, m), sum);
  }
  return _mm512_reduce_add_ps(sum);
}

// out[h][0 : 16 kChunks] += sum_s weights[h][s] * rows[s][first : first + 16 kChunks] for kHeads
// query heads at once (each V value loaded once for all of them), the sums held in registers
// across the slots; `last` masks the final chunk of a head whose size is no multiple of 16.
template <int kHeads, int kChunks, typename T>
void accumulate_rows(const float* weights, int64_t weight_stride, const T* rows, int64_t first, int64_t stride,
                     int64_t count, float* out, int64_t out_stride, __mmask16 last) {
  __m512 sums[kHeads][kChunks];
#pragma GCC unroll 2
  for (int h = 0; h < kHeads; ++h) {
#pragma GCC unroll 8
    for (int c = 0; c < kChunks; ++c) {
      sums[h][c] = _mm512_maskz_loadu_ps(c + 1 == kChunks ? last : 0xFFFF, out + h * out_stride + c * kLanes);
    }
  }
  for (int64_t s = 0; s < count; ++s) {
    __m512 w[kHeads];
#pragma GCC unroll 2
    for (int h = 0; h < kHeads; ++h) w[h] = _mm512_set1_ps(weights[h * weight_stride + s]);
    const T* row = rows + s * stride;
#pragma GCC unroll 8
    for (int c = 0; c < kChunks; ++c) {
      const __m512 x = load_at(row, first + c * kLanes, c + 1 == kChunks ? last : 0xFFFF);
#pragma GCC unroll 2
      for (int h = 0; h < kHeads; ++h) sums[h][c] = _mm512_fmadd_ps(w[h], x, sums[h][c]);
    }
  }
#pragma GCC unroll 2
  for (int h = 0; h < kHeads; ++h) {
#pragma GCC unroll 8
    for (int c = 0; c < kChunks; ++c) {
      _mm512_mask_storeu_ps(out + h * out_stride + c * kLanes, c + 1 == kChunks ? last : 0xFFFF, sums[h][c]);
    }
  }
}

template <int kHeads, typename T>
void accumulate_heads(const float* weights, int64_t weight_stride, const T* rows, int64_t stride, int64_t count,
                      float* out, int64_t dim) {
  const int64_t chunks = (dim + kLanes - 1) / kLanes;
  const __mmask16 tail = lanes_below(dim - (chunks - 1) * kLanes);
  for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
    const int64_t block = std::min<int64_t>(8, chunks - c0);
    const __mmask16 last = c0 + block == chunks ? tail : static_cast<__mmask16>(0xFFFF);
    const int64_t first = c0 * kLanes;
    float* o = out + first;
    switch (block) {
      case 1: accumulate_rows<kHeads, 1>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      case 2: accumulate_rows<kHeads, 2>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      case 3: accumulate_rows<kHeads, 3>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      case 4: accumulate_rows<kHeads, 4>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      case 5: accumulate_rows<kHeads, 5>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      case 6: accumulate_rows<kHeads, 6>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      case 7: accumulate_rows<kHeads, 7>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
      default: accumulate_rows<kHeads, 8>(weights, weight_stride, rows, first, stride, count, o, dim, last); break;
    }
  }
}

// accumulate_heads for every query head of the group, two at a time.
template <typename T>
void accumulate_group(const float* weights, int64_t weight_stride, const T* rows, int64_t stride, int64_t count,
                      float* out, int64_t dim, int64_t group) {
  int64_t g = 0;
  for (; g + 2 <= group; g += 2) {
    accumulate_heads<2>(weights + g * weight_stride, weight_stride, rows, stride, count, out + g * dim, dim);
  }
  if (g < group) {
    accumulate_heads<1>(weights + g * weight_stride, weight_stride, rows, stride, count, out + g * dim, dim);
  }
}

// One kv head of one row over slots [begin, end): its query heads' softmax maximum, sum of
// exp(score - maximum) and the V rows weighted by those exps (not yet divided by the sum).
struct Range {
  int64_t row, kv_head, begin, end;
};

// A K or V storage's strides, in its units (elements, or blocks of a block storage).
struct Strides {
  int64_t row, slot, head;
  int64_t at(int64_t row_index, int64_t slot_index, int64_t head_index) const {
    return row_index * row + slot_index * slot + head_index * head;
  }
};

struct Shapes {
  int64_t query_heads, group, dim;
  Strides k, v;
  float scale;
};

template <typename TK, typename TV>
void attend_range(const Range& range, const Shapes& sh, const float* queries, const TK* keys, const TV* values,
                  float* partial) {
  const int64_t dim = sh.dim, group = sh.group, count = range.end - range.begin, stride = sh.k.slot;
  const float* q = queries + (range.row * sh.query_heads + range.kv_head * group) * dim;
  const TK* k = keys + sh.k.at(range.row, range.begin, range.kv_head);
  const TV* v = values + sh.v.at(range.row, range.begin, range.kv_head);
  float *maxima = partial, *sums = partial + group, *out = partial + 2 * group;
  std::vector<float> scores(group * count);
  // fp32 rows of K's blocks (score_rows), then of a tile of V's; left uninitialized.
  const std::unique_ptr<float[]> decoded(kDecodedOnce<TK> || kDecodedOnce<TV> ? new float[kTileSlots * dim] : nullptr);
  if (count < kLanes) {
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t s = 0; s < count; ++s) scores[g * count + s] = dot(q + g * dim, k + s * stride, dim) * sh.scale;
    }
  } else if (group % 4 == 0) {  // each K load serves 4 heads, each q load 4 rows
    score_rows<4, 4>(q, k, stride, count, dim, group, sh.scale, scores.data(), decoded.get());
  } else if (group % 2 == 0) {
    score_rows<2, 8>(q, k, stride, count, dim, group, sh.scale, scores.data(), decoded.get());
  } else {
    score_rows<1, 16>(q, k, stride, count, dim, group, sh.scale, scores.data(), decoded.get());
  }
  for (int64_t g = 0; g < group; ++g) {
    float* p = scores.data() + g * count;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < count; s += kLanes) {
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, lanes_below(count - s), p + s));
    }
    const float maximum = _mm512_reduce_max_ps(top);
    const __m512 shift = _mm512_set1_ps(maximum);
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < count; s += kLanes) {
      const __mmask16 m = lanes_below(count - s);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + s), shift));
      _mm512_mask_storeu_ps(p + s, m, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
    }
    maxima[g] = maximum;
    sums[g] = _mm512_reduce_add_ps(total);
  }
  std::fill_n(out, group * dim, 0.0f);
  for (int64_t t = 0; t < count; t += kTileSlots) {  // a tile of V rows (in L1) serves every query head
    const int64_t tile = std::min(kTileSlots, count - t);
    const float* weights = scores.data() + t;
    if (kDecodedOnce<TV> && group > 4) {
      decode_rows<TV>(v + t * sh.v.slot, sh.v.slot, tile, dim, decoded.get(), nullptr);
      accumulate_group(weights, count, decoded.get(), dim, tile, out, dim, group);
    } else {
      accumulate_group(weights, count, v + t * sh.v.slot, sh.v.slot, tile, out, dim, group);
    }
  }
}

struct Checked {
  int64_t batch, rotary_dim;
};

// Storage types: kFloatStorage (keys and values of one float dtype, `attention_decode`) or a ggml
// type id each (`attention_decode_blocks`), a float type counted as blocks of one value, as ggml does.
constexpr int64_t kFloatStorage = -1;

// The storage unit of a ggml type id passed to f (as a value of that type); f(nullptr) for others.
template <typename F>
auto with_unit(int64_t type, F&& f) {
  switch (type) {
    case TYPE_F32: return f(0.0f);
    case TYPE_F16: return f(at::Half());
    case TYPE_BF16: return f(at::BFloat16());
    case TYPE_Q8_0: return f(BlockQ8_0());
    case TYPE_Q4_0: return f(BlockQ4_0());
    case TYPE_Q4_1: return f(BlockQ4_1());
    case TYPE_Q5_0: return f(BlockQ5_0());
    case TYPE_Q5_1: return f(BlockQ5_1());
    default: return f(nullptr);
  }
}

template <typename T>
constexpr bool is_unit() {
  return !std::is_same_v<T, std::nullptr_t>;
}

void check_typed_storage(const at::Tensor& store, int64_t type, int64_t batch, int64_t n_kv, int64_t dim,
                         const char* name) {
  const bool known = with_unit(type, [](auto unit) { return is_unit<decltype(unit)>(); });
  TORCH_CHECK(known, "attention_decode_blocks: ", name,
              " must be f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (ggml types 0, 1, 30, 8, 2, 3, 6, 7), ",
              "not type ", type);
  TORCH_CHECK(store.dim() == 4 && store.size(0) >= batch && store.size(2) == n_kv && store.stride(3) == 1,
              "attention_decode_blocks: ", name, " must be [rows >= B, capacity, num_kv_heads, row] with its last ",
              "dim contiguous");
  if (type == TYPE_F32 || type == TYPE_F16 || type == TYPE_BF16) {
    const auto dtype = type == TYPE_F32 ? at::kFloat : type == TYPE_F16 ? at::kHalf : at::kBFloat16;
    TORCH_CHECK(store.scalar_type() == dtype && store.size(3) == dim, "attention_decode_blocks: ", name, " of type ",
                type, " must be ", dtype, " [rows >= B, capacity, num_kv_heads, ", dim, "]");
    return;
  }
  TORCH_CHECK(dim % 32 == 0, "attention_decode_blocks: head_dim must be a multiple of 32 for block storage");
  const int64_t block_bytes = geometry(type).type_size;
  TORCH_CHECK(store.scalar_type() == at::kByte && store.size(3) == dim / 32 * block_bytes &&
                  store.stride(0) % block_bytes == 0 && store.stride(1) % block_bytes == 0 &&
                  store.stride(2) % block_bytes == 0,
              "attention_decode_blocks: ", name, " must be uint8 [rows >= B, capacity, num_kv_heads, ",
              dim / 32 * block_bytes, "] whole blocks");
}

Checked check_inputs(const at::Tensor& q_gate, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm,
                     const at::Tensor& k_norm, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& keys,
                     const at::Tensor& values, const at::Tensor& starts, int64_t n_q, int64_t n_kv, int64_t dim,
                     int64_t key_type, int64_t value_type) {
  TORCH_CHECK(n_kv >= 1 && n_q >= 1 && n_q % n_kv == 0 && dim >= 1,
              "attention_decode: num_heads must be a positive multiple of num_kv_heads, head_dim positive");
  for (const at::Tensor* t : {&q_gate, &k, &v, &q_norm, &k_norm, &cos, &sin, &keys, &values, &starts}) {
    TORCH_CHECK(t->device().is_cpu(), "attention_decode: every tensor must be on the CPU");
  }
  const int64_t batch = q_gate.dim() == 3 ? q_gate.size(0) : -1;
  auto token_rows = [&](const at::Tensor& t, int64_t width, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == batch && t.size(1) == 1 &&
                    t.size(2) == width && t.stride(2) == 1,
                "attention_decode: ", name, " must be fp32 [B, 1, ", width, "] with its last dim contiguous");
  };
  token_rows(q_gate, 2 * n_q * dim, "q_gate");
  token_rows(k, n_kv * dim, "k");
  token_rows(v, n_kv * dim, "v");
  const int64_t rotary_dim = cos.dim() == 3 ? cos.size(2) : -1;
  TORCH_CHECK(rotary_dim >= 0 && rotary_dim <= dim && rotary_dim % 2 == 0,
              "attention_decode: cos must be [B, 1, rotary_dim] with an even rotary_dim <= head_dim");
  token_rows(cos, rotary_dim, "cos");
  token_rows(sin, rotary_dim, "sin");
  for (const at::Tensor* t : {&q_norm, &k_norm}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == dim && t->is_contiguous(),
                "attention_decode: q_norm and k_norm must be contiguous fp32 [head_dim]");
  }
  if (key_type == kFloatStorage) {
    const auto type = keys.scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf,
                "attention_decode: K/V storage must be fp32, bf16 or fp16");
    TORCH_CHECK(values.scalar_type() == type && keys.dim() == 4 && keys.sizes() == values.sizes() &&
                    keys.strides() == values.strides() && keys.size(0) >= batch && keys.size(2) == n_kv &&
                    keys.size(3) == dim && keys.stride(3) == 1,
                "attention_decode: keys and values must be alike [rows >= B, capacity, num_kv_heads, head_dim] ",
                "storage");
  } else {
    check_typed_storage(keys, key_type, batch, n_kv, dim, "keys");
    check_typed_storage(values, value_type, batch, n_kv, dim, "values");
    TORCH_CHECK(keys.size(1) == values.size(1), "attention_decode_blocks: keys and values must have one capacity");
  }
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.size(0) == batch,
              "attention_decode: starts must be int64 [B]");
  const int64_t* slot = starts.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(slot[b * starts.stride(0)] >= 0 && slot[b * starts.stride(0)] < keys.size(1),
                "attention_decode: row ", b, "'s slot ", slot[b * starts.stride(0)], " is outside a K/V capacity of ",
                keys.size(1));
  }
  return {batch, rotary_dim};
}

// A storage tensor as units of T (a block storage is uint8), and its strides in those units.
template <typename T>
T* units_of(at::Tensor& store) {
  if constexpr (Unit<T>::values == 1) {
    return store.data_ptr<T>();
  } else {
    return reinterpret_cast<T*>(store.data_ptr<uint8_t>());
  }
}
template <typename T>
Strides strides_of(const at::Tensor& store) {
  const int64_t unit_bytes = Unit<T>::values == 1 ? 1 : static_cast<int64_t>(sizeof(T));
  return {store.stride(0) / unit_bytes, store.stride(1) / unit_bytes, store.stride(2) / unit_bytes};
}

template <typename TK, typename TV>
at::Tensor attention_decode_typed(const at::Tensor& q_gate, const at::Tensor& k_new, const at::Tensor& v_new,
                                  const at::Tensor& q_norm, const at::Tensor& k_norm, const at::Tensor& cos,
                                  const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                                  const at::Tensor& starts, int64_t n_q, int64_t n_kv, int64_t dim, float eps,
                                  float scale, int64_t batch, int64_t rotary_dim) {
  const Shapes sh{n_q, n_q / n_kv, dim, strides_of<TK>(keys), strides_of<TV>(values), scale};
  TK* key_store = units_of<TK>(keys);
  TV* value_store = units_of<TV>(values);
  const int64_t* slot = starts.data_ptr<int64_t>();
  const float *qn = q_norm.data_ptr<float>(), *kn = k_norm.data_ptr<float>();
  std::vector<float> queries(batch * n_q * dim), key(dim), scratch(rotary_dim);
  const int64_t chunks = (dim + kLanes - 1) / kLanes;

  // The new token of each row: normed and rotated q kept here, k and v into their slots.
  for (int64_t b = 0; b < batch; ++b) {
    const float* qg = q_gate.data_ptr<float>() + b * q_gate.stride(0);
    const float* c = cos.data_ptr<float>() + b * cos.stride(0);
    const float* s = sin.data_ptr<float>() + b * sin.stride(0);
    for (int64_t h = 0; h < n_q; ++h) {
      float* q = queries.data() + (b * n_q + h) * dim;
      norm_head(qg + h * 2 * dim, qn, q, dim, eps);
      rotate_half(q, c, s, rotary_dim, scratch.data());
    }
    const float* kr = k_new.data_ptr<float>() + b * k_new.stride(0);
    const float* vr = v_new.data_ptr<float>() + b * v_new.stride(0);
    const int64_t at_slot = slot[b * starts.stride(0)];
    for (int64_t h = 0; h < n_kv; ++h) {
      norm_head(kr + h * dim, kn, key.data(), dim, eps);
      rotate_half(key.data(), c, s, rotary_dim, scratch.data());
      store_row(key_store + sh.k.at(b, at_slot, h), key.data(), dim);
      store_row(value_store + sh.v.at(b, at_slot, h), vr + h * dim, dim);
    }
  }

  // Each (row, kv head) over its slots 0..start, in ranges of kRangeSlots.
  int64_t work = 0;
  for (int64_t b = 0; b < batch; ++b) work += (slot[b * starts.stride(0)] + 1) * n_q;
  const bool serial = at::get_num_threads() == 1 || work < kSerialWork;
  std::vector<Range> ranges;
  std::vector<int64_t> first_range;  // per (row, kv head)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = slot[b * starts.stride(0)] + 1;
    for (int64_t h = 0; h < n_kv; ++h) {
      first_range.push_back(static_cast<int64_t>(ranges.size()));
      for (int64_t begin = 0; begin < length; begin += kRangeSlots) {
        ranges.push_back({b, h, begin, std::min(length, begin + kRangeSlots)});
      }
    }
  }
  first_range.push_back(static_cast<int64_t>(ranges.size()));
  const int64_t partial_size = sh.group * (dim + 2), n_ranges = static_cast<int64_t>(ranges.size());
  std::vector<float> partials(n_ranges * partial_size);
  auto attend = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      attend_range(ranges[i], sh, queries.data(), key_store, value_store, partials.data() + i * partial_size);
    }
  };
  if (serial) {
    attend(0, n_ranges);
  } else {
    at::parallel_for(0, n_ranges, 1, attend);
  }

  // Merge each (row, kv head)'s ranges and apply the gate: out * sigmoid(gate).
  at::Tensor result = at::empty({batch, 1, n_q * dim}, at::kFloat);
  float* out = result.data_ptr<float>();
  std::vector<float> merged(dim);
  for (int64_t b = 0; b < batch; ++b) {
    const float* qg = q_gate.data_ptr<float>() + b * q_gate.stride(0);
    for (int64_t h = 0; h < n_kv; ++h) {
      const int64_t pair = b * n_kv + h, from = first_range[pair], to = first_range[pair + 1];
      for (int64_t g = 0; g < sh.group; ++g) {
        float maximum = -INFINITY, total = 0.0f;
        for (int64_t r = from; r < to; ++r) maximum = std::max(maximum, partials[r * partial_size + g]);
        std::fill(merged.begin(), merged.end(), 0.0f);
        for (int64_t r = from; r < to; ++r) {
          const float* p = partials.data() + r * partial_size;
          const float weight = std::exp(p[g] - maximum);
          total += weight * p[sh.group + g];
          const float* o = p + 2 * sh.group + g * dim;
          for (int64_t i = 0; i < dim; ++i) merged[i] += weight * o[i];
        }
        const int64_t head = h * sh.group + g;
        const __m512 inverse = _mm512_set1_ps(1.0f / total);
        for (int64_t i = 0; i < chunks; ++i) {
          const __mmask16 m = lanes_below(dim - i * kLanes);
          const __m512 gate = _mm512_maskz_loadu_ps(m, qg + head * 2 * dim + dim + i * kLanes);
          const __m512 sigmoid = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(-gate)));
          const __m512 attended = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, merged.data() + i * kLanes), inverse);
          _mm512_mask_storeu_ps(out + (b * n_q + head) * dim + i * kLanes, m, _mm512_mul_ps(attended, sigmoid));
        }
      }
    }
  }
  return result;
}

// q_gate [B, 1, n_q * 2 hd] (per head hd query values, then hd gate values), k and v
// [B, 1, n_kv * hd] (rows may be strided, e.g. column slices of one projection's output);
// q_norm, k_norm [hd]; cos, sin [B, 1, rotary_dim]; keys, values: the whole K/V storage
// [rows >= B, capacity, n_kv, hd]; starts [B]. Row b's k (normed and rotated) and v are
// written to slot starts[b] of row b of keys/values; the token then attends to that row's
// slots 0..starts[b]. Returns attention * sigmoid(gate), [B, 1, n_q * hd] fp32.
at::Tensor attention_decode(const at::Tensor& q_gate, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& q_norm, const at::Tensor& k_norm, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, const at::Tensor& starts,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  const Checked c = check_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, num_heads,
                                 num_kv_heads, head_dim, kFloatStorage, kFloatStorage);
  const auto run = [&](auto unit) {
    using T = decltype(unit);
    return attention_decode_typed<T, T>(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, num_heads,
                                        num_kv_heads, head_dim, static_cast<float>(eps), static_cast<float>(scale),
                                        c.batch, c.rotary_dim);
  };
  switch (keys.scalar_type()) {
    case at::kBFloat16: return run(at::BFloat16());
    case at::kHalf: return run(at::Half());
    default: return run(0.0f);
  }
}

// attention_decode over K and V each stored as one of llama.cpp's cache types, given as ggml type
// ids key_type and value_type: F32 0, F16 1 and BF16 30 (storage of that dtype [rows >= B,
// capacity, num_kv_heads, head_dim]), Q8_0 8, Q4_0 2, Q4_1 3, Q5_0 6 and Q5_1 7 (uint8 [rows >= B,
// capacity, num_kv_heads, head_dim / 32 * block bytes]). The new token's K and V are rounded or
// quantized into their slots.
at::Tensor attention_decode_blocks(const at::Tensor& q_gate, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& q_norm, const at::Tensor& k_norm, const at::Tensor& cos,
                                   const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                                   const at::Tensor& starts, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t head_dim, double eps, double scale, int64_t key_type, int64_t value_type) {
  const Checked c = check_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, num_heads,
                                 num_kv_heads, head_dim, key_type, value_type);
  return with_unit(key_type, [&](auto key_unit) {
    return with_unit(value_type, [&](auto value_unit) {
      using TK = decltype(key_unit);
      using TV = decltype(value_unit);
      if constexpr (is_unit<TK>() && is_unit<TV>()) {
        return attention_decode_typed<TK, TV>(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts,
                                              num_heads, num_kv_heads, head_dim, static_cast<float>(eps),
                                              static_cast<float>(scale), c.batch, c.rotary_dim);
      } else {
        return at::Tensor();  // not reached: check_inputs refused the type
      }
    });
  });
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def(
      "attention_decode(Tensor q_gate, Tensor k, Tensor v, Tensor q_norm, Tensor k_norm, Tensor cos, Tensor sin, "
      "Tensor(a!) keys, Tensor(b!) values, Tensor starts, int num_heads, int num_kv_heads, int head_dim, float eps, "
      "float scale) -> Tensor",
      &qwen35_ggml::attention_decode);
  m.def(
      "attention_decode_blocks(Tensor q_gate, Tensor k, Tensor v, Tensor q_norm, Tensor k_norm, Tensor cos, "
      "Tensor sin, Tensor(a!) keys, Tensor(b!) values, Tensor starts, int num_heads, int num_kv_heads, int head_dim, "
      "float eps, float scale, int key_type, int value_type) -> Tensor",
      &qwen35_ggml::attention_decode_blocks);
}
