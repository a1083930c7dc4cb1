// The int8 GEMM that reads row-group packed Q4_K / Q6_K / Q8_0 weights (the layout:
// packed_format.h; the packing, at load: ggml_pack.cpp), for decode and prefill alike.
//
// ggml keeps each weight row's blocks together, so a dot product of one row with x ends
// in a horizontal sum, and every row unpacks its own quants. Packed, 16 consecutive rows
// share each block: a 512-bit register holds 4 consecutive quants of each of the 16 rows
// (byte 4n + j: row n, value j), so one vpdpbusd with 4 broadcast x values advances 16
// dot products at once, and one unpacked register serves every row of x in the call.
// Packing happens once, at load; the bytes per weight are those of the file (the scales
// are spread out, not widened: Q4_K takes 2.8% more, Q6_K and Q8_0 the same).
//
// Arithmetic: x is quantized to int8 per row as for the row-major kernels (per 256 values
// for Q4_K/Q6_K, per 32 for Q8_0); weights enter vpdpbusd as unsigned bytes (Q4_K 0..15,
// Q6_K 0..63, Q8_0 stored plus 128) and the offsets come back through exact integer sums
// of x. Integer sums are exact; each output's float accumulation runs block by block in
// one fixed order, whatever the number of x rows or the rows sharing the call: results
// are batch-invariant, bit for bit.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "ggml_blocks.h"
#include "packed_call.h"
#include "packed_format.h"

namespace qwen35_ggml {
namespace {

constexpr int MAX_X_ROWS = 4;   // rows of x per prefill microkernel call
constexpr int MAX_GROUPS = SUPER;  // weight groups per decode microkernel call (one or two rows of x)
constexpr int PREFILL_GROUPS = 2;

// ------------------------------------------------------------------------- activations

// x rows quantized for the packed types: int8 values, a float scale per block and int32
// correction terms that turn the unsigned weight codes back into signed values:
//   Q4_K: per super-block 4 words, each the sums of x over sub-blocks 2i and 2i + 1 as
//         two int16 (paired with the mins by vpdpwssd);
//   Q6_K: -32 * (sum of x) per group of 16;   Q8_0: -128 * (sum of x) per block.
struct XRow {
  const int8_t* q;
  const float* dx;
  const int32_t* corr;
};

constexpr int64_t CORR_TYPES[] = {TYPE_Q4_K, TYPE_Q6_K, TYPE_Q8_0};
constexpr int N_CORR_TYPES = 3;

int corr_index(int64_t type_id) {
  for (int i = 0; i < N_CORR_TYPES; ++i)
    if (CORR_TYPES[i] == type_id) return i;
  TORCH_CHECK(false, "qwen35_ggml: no packed layout for ggml type ", type_id);
}

// One quantization of x serves every packed type with the same block size (Q4_K and Q6_K:
// 256, Q8_0: 32); the correction terms of each type in `types` come from the same sums.
class PackedActivations {
 public:
  PackedActivations(const at::Tensor& x, int64_t block_size, const std::vector<int64_t>& types)
      : m_(x.size(0)), k_(x.size(1)), blocks_(k_ / block_size) {
    TORCH_CHECK(k_ % block_size == 0, "x rows do not split into blocks of ", block_size);
    q_ = at::empty({m_, k_}, at::kChar);
    dx_ = at::empty({m_, blocks_}, at::kFloat);
    for (int64_t type : types) {
      const int i = corr_index(type);
      if (!corr_[i].defined()) corr_[i] = at::empty({m_, blocks_ * packed_format(type).corr_per_block}, at::kInt);
    }
    const float* xp = x.data_ptr<float>();
    int8_t* q = q_.data_ptr<int8_t>();
    float* dx = dx_.data_ptr<float>();
    at::parallel_for(0, m_, 16, [&](int64_t begin, int64_t end) {
      std::vector<int16_t> sums(k_ / 16);
      for (int64_t r = begin; r < end; ++r) {
        quantize_row(xp + r * k_, k_, block_size, q + r * k_, dx + r * blocks_, sums.data());
        for (int i = 0; i < N_CORR_TYPES; ++i) {
          if (corr_[i].defined()) fill_corrections(CORR_TYPES[i], sums.data(), corr_[i].data_ptr<int32_t>() + r * corr_[i].size(1));
        }
      }
    });
  }

  XRow row(int64_t r, int64_t type_id) const {
    const at::Tensor& corr = corr_[corr_index(type_id)];
    return {q_.data_ptr<int8_t>() + r * k_, dx_.data_ptr<float>() + r * blocks_, corr.data_ptr<int32_t>() + r * corr.size(1)};
  }

 private:
  void fill_corrections(int64_t type_id, const int16_t* sums, int32_t* c) const {
    if (type_id == TYPE_Q6_K) {
      for (int64_t i = 0; i < k_ / 16; ++i) c[i] = -32 * sums[i];
      return;
    }
    for (int64_t i = 0; i < k_ / 32; ++i) {
      const int32_t sum32 = sums[2 * i] + sums[2 * i + 1];
      if (type_id == TYPE_Q8_0) {
        c[i] = -128 * sum32;
      } else {  // Q4_K: sub-block i in the low half of word i / 2 when even, the high half when odd
        const uint32_t half = static_cast<uint16_t>(static_cast<int16_t>(sum32));
        c[i / 2] = i % 2 == 0 ? static_cast<int32_t>(half) : static_cast<int32_t>(static_cast<uint32_t>(c[i / 2]) | (half << 16));
      }
    }
  }

  int64_t m_, k_, blocks_;
  at::Tensor q_, dx_;
  at::Tensor corr_[N_CORR_TYPES];
};

// ------------------------------------------------------------------------ microkernels
//
// NR rows of x times NW groups of 16 weight rows over the whole width. w[g] is group g's
// first packed block, out[r] row r's output at the first group's first row; `valid` is the
// number of real rows in the last group (16 but at the matrix's end).

// GF(2) affine byte transforms (vgf2p8affineqb) that move bit fields within each byte in
// one instruction: output bit i takes the input bit named by byte 7 - i of the matrix.
constexpr int64_t HIGH_NIBBLE_DOWN = 0x1020408000000000;  // bits 4..7 -> 0..3, rest zero
constexpr int64_t Q6_HIGH_BITS[4] = {0x01020000, 0x04080000, 0x10200000, 0x40800000};  // bits 2i, 2i+1 -> 4, 5
inline __m512i move_bits(__m512i v, int64_t matrix) { return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(matrix), 0); }
// (a & c) | b, one vpternlogd.
inline __m512i and_or(__m512i a, __m512i b, __m512i c) { return _mm512_ternarylogic_epi32(a, b, c, 0xEC); }

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Block rows to fetch ahead: at least 8 KiB, enough requests in flight to cover memory latency.
constexpr int64_t prefetch_rows(int64_t stride) { return (8192 + stride - 1) / stride; }

// Step `step` of a block's loop fetches line `step` (and `step` + 32, `step` + 64, ...) of the
// group's block AHEAD block rows on, so that its lines are all requested well before use.
inline void prefetch_line(const uint8_t* block_ahead, int step, int lines) {
  for (int line = step; line < lines; line += 32) _mm_prefetch(reinterpret_cast<const char*>(block_ahead + 64 * line), _MM_HINT_T0);
}

// Every accumulator of a tile set to `value`.
template <class V, int NR, int NW>
inline void fill(V (&a)[NR][NW], V value) {
  for (int r = 0; r < NR; ++r)
    for (int g = 0; g < NW; ++g) a[r][g] = value;
}

template <int NR, int NW>
inline void store_outputs(__m512 (&acc)[NR][NW], float* const* out, int64_t valid) {
  for (int r = 0; r < NR; ++r) {
    for (int g = 0; g < NW; ++g) {
      if (g == NW - 1 && valid < GROUP) {
        _mm512_mask_storeu_ps(out[r] + GROUP * g, static_cast<__mmask16>((1u << valid) - 1), acc[r][g]);
      } else {
        _mm512_storeu_ps(out[r] + GROUP * g, acc[r][g]);
      }
    }
  }
}

struct PackedQ4K {
  static constexpr int64_t BYTES = 2368;
  static constexpr int64_t STRIDE = SUPER * BYTES;  // one block of each group of a super-group
  static constexpr int LINES = (BYTES + 63) / 64;  // 37: chunks 0..31 also fetch lines 32..36
  template <int NR, int NW, bool PREFETCH>
  static void run(const uint8_t* const* w, int64_t n_blocks, const XRow* x, float* const* out, int64_t valid) {
    constexpr int64_t AHEAD = prefetch_rows(STRIDE);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[NR][NW];
    fill(acc, _mm512_setzero_ps());
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m512i iacc[NR][NW];
      fill(iacc, _mm512_setzero_si512());
      for (int sb = 0; sb < 8; ++sb) {
        __m512i scale[NW];
        for (int g = 0; g < NW; ++g) {
          scale[g] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[g] + b * STRIDE + 64 + 16 * sb)));
        }
        // Two halves of 16 values: a half's product sum fits int16 (16 * 15 * 127), as vpdpwssd needs.
        for (int h = 0; h < 2; ++h) {
          __m512i p[NR][NW];
          for (int r = 0; r < NR; ++r)
            for (int g = 0; g < NW; ++g) p[r][g] = _mm512_setzero_si512();
          for (int half_chunk = 0; half_chunk < 2; ++half_chunk) {
            const int c = 4 * sb + 2 * h + half_chunk;
            __m512i lo[NW], hi[NW];
            for (int g = 0; g < NW; ++g) {
              if (PREFETCH) prefetch_line(w[g] + (b + AHEAD) * STRIDE, c, LINES);
              const __m512i v = _mm512_loadu_si512(w[g] + b * STRIDE + 320 + 64 * c);
              lo[g] = _mm512_and_si512(v, low4);
              hi[g] = move_bits(v, HIGH_NIBBLE_DOWN);
            }
            for (int r = 0; r < NR; ++r) {
              const int8_t* xq = x[r].q + b * QK_K + 8 * c;
              const __m512i x0 = broadcast4(xq), x1 = broadcast4(xq + 4);
              for (int g = 0; g < NW; ++g) {
                p[r][g] = _mm512_dpbusd_epi32(p[r][g], lo[g], x0);
                p[r][g] = _mm512_dpbusd_epi32(p[r][g], hi[g], x1);
              }
            }
          }
          for (int r = 0; r < NR; ++r)
            for (int g = 0; g < NW; ++g) iacc[r][g] = _mm512_dpwssd_epi32(iacc[r][g], p[r][g], scale[g]);
        }
      }
      for (int g = 0; g < NW; ++g) {
        const uint8_t* blk = w[g] + b * STRIDE;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
        __m512i mins[4];
        for (int i = 0; i < 4; ++i) {
          mins[i] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 192 + 32 * i)));
        }
        for (int r = 0; r < NR; ++r) {
          __m512i min_dot = _mm512_setzero_si512();
          for (int i = 0; i < 4; ++i) min_dot = _mm512_dpwssd_epi32(min_dot, mins[i], _mm512_set1_epi32(x[r].corr[4 * b + i]));
          const __m512 dx = _mm512_set1_ps(x[r].dx[b]);
          acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][g]), _mm512_mul_ps(d, dx), acc[r][g]);
          acc[r][g] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(min_dot), _mm512_mul_ps(dmin, dx), acc[r][g]);
        }
      }
    }
    store_outputs<NR, NW>(acc, out, valid);
  }
};

struct PackedQ6K {
  static constexpr int64_t BYTES = 3360;
  static constexpr int64_t STRIDE = SUPER * BYTES;
  static constexpr int LINES = (BYTES + 63) / 64;
  template <int NR, int NW, bool PREFETCH>
  static void run(const uint8_t* const* w, int64_t n_blocks, const XRow* x, float* const* out, int64_t valid) {
    constexpr int64_t AHEAD = prefetch_rows(STRIDE);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[NR][NW];
    fill(acc, _mm512_setzero_ps());
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m512i iacc[NR][NW];
      fill(iacc, _mm512_setzero_si512());
      for (int s = 0; s < 16; ++s) {
        __m512i scale[NW], qh[NW];
        for (int g = 0; g < NW; ++g) {
          const uint8_t* blk = w[g] + b * STRIDE;
          scale[g] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * s)));
          qh[g] = _mm512_loadu_si512(blk + 2336 + 64 * s);
        }
        // The -32 offset enters as the starting value: p = -32 * sum(x) + sum(q * x).
        __m512i p[NR][NW];
        for (int r = 0; r < NR; ++r) {
          const __m512i start = _mm512_set1_epi32(x[r].corr[16 * b + s]);
          for (int g = 0; g < NW; ++g) p[r][g] = start;
        }
        for (int i = 0; i < 4; ++i) {
          __m512i q[NW];
          for (int g = 0; g < NW; ++g) {
            if (PREFETCH) prefetch_line(w[g] + (b + AHEAD) * STRIDE, 4 * s + i, LINES);
            const __m512i ql = _mm512_loadu_si512(w[g] + b * STRIDE + 288 + 64 * (2 * s + i / 2));
            const __m512i hi = move_bits(qh[g], Q6_HIGH_BITS[i]);
            q[g] = i % 2 == 0 ? and_or(ql, hi, low4) : _mm512_or_si512(move_bits(ql, HIGH_NIBBLE_DOWN), hi);
          }
          for (int r = 0; r < NR; ++r) {
            const __m512i xv = broadcast4(x[r].q + b * QK_K + 16 * s + 4 * i);
            for (int g = 0; g < NW; ++g) p[r][g] = _mm512_dpbusd_epi32(p[r][g], q[g], xv);
          }
        }
        // |p| <= 16 * 63 * 127 + 32 * 16 * 127 needs the full 32-bit multiply by the group scale.
        for (int r = 0; r < NR; ++r)
          for (int g = 0; g < NW; ++g) iacc[r][g] = _mm512_add_epi32(iacc[r][g], _mm512_mullo_epi32(p[r][g], scale[g]));
      }
      for (int g = 0; g < NW; ++g) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[g] + b * STRIDE)));
        for (int r = 0; r < NR; ++r) {
          acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][g]), _mm512_mul_ps(d, _mm512_set1_ps(x[r].dx[b])), acc[r][g]);
        }
      }
    }
    store_outputs<NR, NW>(acc, out, valid);
  }
};

struct PackedQ80 {
  static constexpr int64_t BYTES = 544;
  static constexpr int64_t STRIDE = SUPER * BYTES;
  static constexpr int LINES = (BYTES + 63) / 64;
  template <int NR, int NW, bool PREFETCH>
  static void run(const uint8_t* const* w, int64_t n_blocks, const XRow* x, float* const* out, int64_t valid) {
    constexpr int64_t AHEAD = prefetch_rows(STRIDE);
    __m512 acc[NR][NW];
    fill(acc, _mm512_setzero_ps());
    for (int64_t b = 0; b < n_blocks; ++b) {
      // The +128 of the stored codes comes back as the starting value -128 * sum(x).
      __m512i p[NR][NW];
      for (int r = 0; r < NR; ++r) {
        const __m512i start = _mm512_set1_epi32(x[r].corr[b]);
        for (int g = 0; g < NW; ++g) p[r][g] = start;
      }
      for (int c = 0; c < 8; ++c) {
        __m512i v[NW];
        for (int g = 0; g < NW; ++g) {
          if (PREFETCH) prefetch_line(w[g] + (b + AHEAD) * STRIDE, c, LINES);
          v[g] = _mm512_loadu_si512(w[g] + b * STRIDE + 32 + 64 * c);
        }
        for (int r = 0; r < NR; ++r) {
          const __m512i xv = broadcast4(x[r].q + 32 * b + 4 * c);
          for (int g = 0; g < NW; ++g) p[r][g] = _mm512_dpbusd_epi32(p[r][g], v[g], xv);
        }
      }
      for (int g = 0; g < NW; ++g) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[g] + b * STRIDE)));
        for (int r = 0; r < NR; ++r) {
          acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p[r][g]), _mm512_mul_ps(d, _mm512_set1_ps(x[r].dx[b])), acc[r][g]);
        }
      }
    }
    store_outputs<NR, NW>(acc, out, valid);
  }
};

// ----------------------------------------------------------------------------- dispatch

using TileFn = void (*)(const uint8_t* const* w, int64_t n_blocks, const XRow* x, float* const* out, int64_t valid);

// Decode (one or two rows of x) takes up to MAX_GROUPS groups per call, always fetching
// ahead; prefill takes PREFILL_GROUPS groups and up to MAX_X_ROWS rows, fetching ahead on
// the first pass over the groups only.
struct PackedKernel {
  int64_t bytes;
  TileFn decode[2][MAX_GROUPS];                       // [nr - 1][nw - 1]
  TileFn prefill[2][MAX_X_ROWS][PREFILL_GROUPS];      // [prefetch][nr - 1][nw - 1]
};

template <class K, int NR>
void fill_prefill(PackedKernel& kernel) {
  if constexpr (NR > 1) fill_prefill<K, NR - 1>(kernel);
  kernel.prefill[0][NR - 1][0] = &K::template run<NR, 1, false>;
  kernel.prefill[1][NR - 1][0] = &K::template run<NR, 1, true>;
  if constexpr (PREFILL_GROUPS > 1) {
    kernel.prefill[0][NR - 1][1] = &K::template run<NR, 2, false>;
    kernel.prefill[1][NR - 1][1] = &K::template run<NR, 2, true>;
  }
}

template <class K, int NR>
void fill_decode(PackedKernel& kernel) {
  kernel.decode[NR - 1][0] = &K::template run<NR, 1, true>;
  kernel.decode[NR - 1][1] = &K::template run<NR, 2, true>;
  kernel.decode[NR - 1][2] = &K::template run<NR, 3, true>;
  kernel.decode[NR - 1][3] = &K::template run<NR, 4, true>;
}

template <class K>
PackedKernel kernel_of() {
  PackedKernel kernel{K::BYTES, {}, {}};
  fill_decode<K, 1>(kernel);
  fill_decode<K, 2>(kernel);
  fill_prefill<K, MAX_X_ROWS>(kernel);
  return kernel;
}

PackedKernel packed_kernel(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_K: return kernel_of<PackedQ4K>();
    case TYPE_Q6_K: return kernel_of<PackedQ6K>();
    case TYPE_Q8_0: return kernel_of<PackedQ80>();
    default: TORCH_CHECK(false, "qwen35_ggml: no packed kernel for ggml type ", type_id);
  }
}

// One packed weight matrix of a call: where its outputs go among the call's columns.
struct Matrix {
  const uint8_t* w;
  int64_t type_id;
  PackedKernel kernel;
  int64_t groups, n_blocks, n;  // n: real rows (the last group may be padding)
  int64_t column;               // first output column
  const PackedActivations* act;
  int64_t group_bytes() const { return n_blocks * kernel.bytes; }
  const uint8_t* group(int64_t g) const { return w + ((g / SUPER) * n_blocks * SUPER + g % SUPER) * kernel.bytes; }
};

// Groups [g0, g1) of `mat` times rows x_rows[j] of x, whose outputs go to output rows
// slots[j]: out + slots[j] * ld + mat.column. With one or two rows of x (decode) four groups share
// each broadcast of x; with more, two groups meet every four rows of x while in cache.
void run_groups(const Matrix& mat, int64_t g0, int64_t g1, const int64_t* slots, const int64_t* x_rows, int64_t n_slots,
                float* out, int64_t ld) {
  const bool decode = n_slots <= 2;
  const int64_t step = decode ? MAX_GROUPS : PREFILL_GROUPS;
  XRow rows[MAX_X_ROWS];
  float* outs[MAX_X_ROWS];
  for (int64_t g = g0; g < g1; g += step) {
    const int64_t nw = std::min<int64_t>(step, g1 - g);
    const uint8_t* groups[MAX_GROUPS];
    for (int64_t i = 0; i < nw; ++i) groups[i] = mat.group(g + i);
    const int64_t valid = std::min<int64_t>(GROUP, mat.n - (g + nw - 1) * GROUP);
    for (int64_t j = 0; j < n_slots; j += MAX_X_ROWS) {
      const int64_t nr = std::min<int64_t>(MAX_X_ROWS, n_slots - j);
      for (int64_t r = 0; r < nr; ++r) {
        rows[r] = mat.act->row(x_rows[j + r], mat.type_id);
        outs[r] = out + slots[j + r] * ld + mat.column + g * GROUP;
      }
      // The first pass over these groups reads them from memory: it also requests their
      // next blocks ahead of use; later passes find them in cache.
      const TileFn tile = decode ? mat.kernel.decode[nr - 1][nw - 1] : mat.kernel.prefill[j == 0][nr - 1][nw - 1];
      tile(groups, mat.n_blocks, rows, outs, valid);
    }
  }
}

void check_packed(const at::Tensor& packed, const PackedFormat& fmt, int64_t k, int64_t n, int64_t dims) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == dims &&
                  packed.is_contiguous(),
              "packed weights must be a contiguous CPU uint8 tensor of ", dims, " dimensions");
  TORCH_CHECK(n > 0 && k > 0 && k % fmt.block_size == 0 && packed.size(dims - 1) == fmt.bytes &&
                  packed.size(dims - 2) == SUPER && packed.size(dims - 3) == k / fmt.block_size &&
                  packed.size(dims - 4) == (n + GROUP * SUPER - 1) / (GROUP * SUPER),
              "packed weights do not hold ", n, " rows of ", k, " values");
}

// Threads split the work by its cost, in whole units of MAX_GROUPS groups (each
// with its rows of x): one parallel region for the whole call, each thread a contiguous
// run of units.
struct Unit {
  int64_t matrix, g0, g1;
  const int64_t* slots;   // output rows
  const int64_t* x_rows;  // their rows of x
  int64_t n_slots;
};

void run_units(const std::vector<Matrix>& mats, const std::vector<Unit>& units, float* out, int64_t ld) {
  // A unit's cost: its bytes, read from memory once and then once more per 4 rows of x
  // from cache (4 rows per kernel call).
  std::vector<int64_t> ends(units.size());  // cumulative costs
  int64_t total = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    total += (units[u].g1 - units[u].g0) * mats[units[u].matrix].group_bytes() * (4 + units[u].n_slots) / 4;
    ends[u] = total;
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units.size()));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      // Thread t takes the units whose costs end in (total * t / threads, total * (t + 1) / threads].
      const int64_t low = total * t / threads, high = total * (t + 1) / threads;
      const auto first = std::upper_bound(ends.begin(), ends.end(), low) - ends.begin();
      for (int64_t u = first; u < static_cast<int64_t>(units.size()) && ends[u] <= high; ++u) {
        const Unit& unit = units[u];
        run_groups(mats[unit.matrix], unit.g0, unit.g1, unit.slots, unit.x_rows, unit.n_slots, out, ld);
      }
    }
  });
}

void add_units(std::vector<Unit>& units, int64_t matrix, int64_t groups, const int64_t* slots, const int64_t* x_rows,
               int64_t n_slots) {
  for (int64_t g = 0; g < groups; g += MAX_GROUPS) {
    units.push_back({matrix, g, std::min(groups, g + MAX_GROUPS), slots, x_rows, n_slots});
  }
}

// x quantized once per block size that the weights' types use (Q4_K and Q6_K: 256, Q8_0: 32).
class SharedActivations {
 public:
  SharedActivations(const at::Tensor& x, at::IntArrayRef type_ids) {
    std::vector<int64_t> by_block[2];
    for (int64_t type : type_ids) by_block[slot(type)].push_back(type);
    if (!by_block[0].empty()) acts_[0] = std::make_unique<PackedActivations>(x, QK_K, by_block[0]);
    if (!by_block[1].empty()) acts_[1] = std::make_unique<PackedActivations>(x, 32, by_block[1]);
  }
  const PackedActivations* for_type(int64_t type_id) const {
    const PackedActivations* act = acts_[slot(type_id)].get();
    TORCH_CHECK(act != nullptr, "qwen35_ggml: x was not prepared for ggml type ", type_id);
    return act;
  }

 private:
  static int slot(int64_t type_id) { return packed_format(type_id).block_size == QK_K ? 0 : 1; }
  std::unique_ptr<PackedActivations> acts_[2];
};

void check_lists(size_t n_packed, size_t n_types, size_t n_rows) {
  TORCH_CHECK(n_packed > 0 && n_packed == n_types && n_packed == n_rows, "one type and one row count per packed weight");
}

}  // namespace

void check_packed_weight(const at::Tensor& packed, int64_t type_id, int64_t n, int64_t k, int64_t dims) {
  check_packed(packed, packed_format(type_id), k, n, dims);
}

int64_t packed_matrix_bytes(int64_t type_id, int64_t n, int64_t k) {
  const PackedFormat fmt = packed_format(type_id);
  return (n + GROUP * SUPER - 1) / (GROUP * SUPER) * (k / fmt.block_size) * SUPER * fmt.bytes;
}

struct PackedCall::State {
  at::Tensor x;
  SharedActivations acts;
  std::vector<Matrix> mats;
  std::vector<Unit> units;
};

PackedCall::PackedCall(const at::Tensor& x, at::IntArrayRef type_ids)
    : state_(std::make_unique<State>(State{x, SharedActivations(x, type_ids), {}, {}})) {}

PackedCall::~PackedCall() = default;

void PackedCall::add(const uint8_t* packed, int64_t type_id, int64_t n, int64_t column, const int64_t* slots,
                     const int64_t* x_rows, int64_t n_slots) {
  const int64_t groups = (n + GROUP - 1) / GROUP, n_blocks = state_->x.size(1) / packed_format(type_id).block_size;
  state_->mats.push_back({packed, type_id, packed_kernel(type_id), groups, n_blocks, n, column, state_->acts.for_type(type_id)});
  add_units(state_->units, static_cast<int64_t>(state_->mats.size()) - 1, groups, slots, x_rows, n_slots);
}

void PackedCall::run(float* out, int64_t ld) const {
  if (!state_->units.empty()) run_units(state_->mats, state_->units, out, ld);
}

namespace {

// y [M, sum(ns)] = x [M, K] @ [W_0; W_1; ...]^T for packed weights W_i [ns[i], K] (their
// own types): the projections that read the same input, in one call. The columns of y
// are W_0's outputs, then W_1's, ...
at::Tensor packed_gemv_many(at::TensorList packed, at::IntArrayRef type_ids, const at::Tensor& x_in, at::IntArrayRef ns) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [M, K]");
  check_lists(packed.size(), type_ids.size(), ns.size());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  for (size_t i = 0; i < packed.size(); ++i) check_packed(packed[i], packed_format(type_ids[i]), k, ns[i], 4);
  std::vector<int64_t> all_rows(m);
  for (int64_t r = 0; r < m; ++r) all_rows[r] = r;
  PackedCall call(x, type_ids);
  int64_t columns = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    call.add(packed[i].data_ptr<uint8_t>(), type_ids[i], ns[i], columns, all_rows.data(), all_rows.data(), m);
    columns += ns[i];
  }
  at::Tensor y = at::empty({m, columns}, at::kFloat);
  call.run(y.data_ptr<float>(), columns);
  return y;
}

at::Tensor packed_gemv(const at::Tensor& packed, int64_t type_id, const at::Tensor& x, int64_t n) {
  return packed_gemv_many({packed}, {type_id}, x, {n});
}

// MoE: slot s multiplies its row of x with expert ids[s] of each packed [E, ...] weight in
// `packed` (gate and up: one input, side by side outputs as in packed_gemv_many). x [R, K]
// holds one row per slot (R = S) or one per token shared by its S / R consecutive slots;
// ids [S] -> [S, sum(ns)]. Slots are grouped by expert, so each used expert is read once
// per call, and each row of x is quantized once.
at::Tensor packed_expert_gemv_many(at::TensorList packed, at::IntArrayRef type_ids, const at::Tensor& x_in,
                                   const at::Tensor& ids_in, at::IntArrayRef ns) {
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 1 && x_in.size(0) > 0 && ids_in.size(0) % x_in.size(0) == 0,
              "x must be [R, K] and ids [S], S a multiple of R");
  check_lists(packed.size(), type_ids.size(), ns.size());
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t n_experts = packed[0].size(0), k = x.size(1);
  for (size_t i = 0; i < packed.size(); ++i) {
    check_packed(packed[i], packed_format(type_ids[i]), k, ns[i], 5);
    TORCH_CHECK(packed[i].size(0) == n_experts, "every weight must hold the same experts");
  }
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t slots = ids.size(0);
  const auto [first, order] = sort_slots_by_expert(id, slots, n_experts);
  // Kernels take rows of x by index and write outputs by slot: slot s reads row s / per_row.
  const int64_t per_row = slots / x.size(0);
  std::vector<int64_t> rows(slots);
  for (int64_t j = 0; j < slots; ++j) rows[j] = order[j] / per_row;

  PackedCall call(x, type_ids);
  int64_t columns = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    const int64_t expert_bytes = packed_matrix_bytes(type_ids[i], ns[i], k);
    for (int64_t e = 0; e < n_experts; ++e) {
      if (first[e + 1] == first[e]) continue;
      call.add(packed[i].data_ptr<uint8_t>() + e * expert_bytes, type_ids[i], ns[i], columns, order.data() + first[e],
               rows.data() + first[e], first[e + 1] - first[e]);
    }
    columns += ns[i];
  }
  at::Tensor y = at::empty({slots, columns}, at::kFloat);
  call.run(y.data_ptr<float>(), columns);
  return y;
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("packed_gemv(Tensor packed, int type_id, Tensor x, int n) -> Tensor", &qwen35_ggml::packed_gemv);
  m.def("packed_gemv_many(Tensor[] packed, int[] type_ids, Tensor x, int[] ns) -> Tensor", &qwen35_ggml::packed_gemv_many);
  m.def("packed_expert_gemv_many(Tensor[] packed, int[] type_ids, Tensor x, Tensor ids, int[] ns) -> Tensor",
        &qwen35_ggml::packed_expert_gemv_many);
}
