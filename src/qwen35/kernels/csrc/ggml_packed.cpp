// Row-group packing of Q4_K / Q6_K / Q8_0 weights and the int8 GEMM that reads it, for
// decode and prefill alike.
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

#include <sys/mman.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "ggml_blocks.h"
#include "packed_call.h"

namespace qwen35_ggml {
namespace {

constexpr int64_t GROUP = 16;   // weight rows per packed group: one 32-bit lane each
constexpr int MAX_X_ROWS = 4;   // rows of x per prefill microkernel call
constexpr int MAX_GROUPS = 4;   // weight groups per decode microkernel call (one or two rows of x)
constexpr int PREFILL_GROUPS = 2;
// Groups stored together: a super-group's blocks lie block by block, the 4 groups' packed
// blocks side by side ([super-group][block][group][bytes]), so a decode call that takes 4
// groups at a time reads one linear stream.
constexpr int64_t SUPER = MAX_GROUPS;

struct PackedFormat {
  int64_t block_size;  // values of a row per packed block
  int64_t bytes;       // bytes per packed block of GROUP rows
  int64_t corr_per_block;  // int32 correction terms of x per block
};

PackedFormat packed_format(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_K: return {QK_K, 2368, 4};
    case TYPE_Q6_K: return {QK_K, 3360, 16};
    case TYPE_Q8_0: return {32, 544, 1};
    default: TORCH_CHECK(false, "qwen35_ggml: no packed layout for ggml type ", type_id);
  }
}

// ------------------------------------------------------------------------------- packing
//
// Q4_K, per group and super-block (2368 bytes):
//   [0, 32) d of the 16 rows (fp16)    [32, 64) dmin (fp16)
//   [64, 192) scales [8 sub-blocks][16 rows] u8
//   [192, 320) mins [4 sub-block pairs][16 rows][2] u8
//   [320, 2368) 32 chunks of 64 bytes, chunk c = values 8c..8c+7:
//       byte 4n + j = q[n][8c + j] | q[n][8c + 4 + j] << 4
// Q6_K (3360 bytes):
//   [0, 32) d (fp16)    [32, 288) scales [16 groups][16 rows] int8
//   [288, 2336) low 4 bits, 32 chunks laid out as Q4_K's quants
//   [2336, 3360) high 2 bits, 16 chunks of 64 bytes, chunk s = values 16s..16s+15:
//       bits 2i, 2i+1 of byte 4n + j = high bits of q[n][16s + 4i + j]
// Q8_0, per group and 32-value block (544 bytes):
//   [0, 32) d (fp16)    [32, 544) 8 chunks, byte 4n + j of chunk c = q[n][4c + j] + 128

void unpack_q4_k(const uint8_t* blk, uint8_t* q, uint8_t* scales, uint8_t* mins) {
  alignas(16) uint8_t sm[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(sm), q4_k_scales_mins(blk + 4));
  std::memcpy(scales, sm, 8);
  std::memcpy(mins, sm + 8, 8);
  for (int g = 0; g < 4; ++g) {
    for (int l = 0; l < 32; ++l) {
      q[64 * g + l] = blk[16 + 32 * g + l] & 0x0F;
      q[64 * g + 32 + l] = blk[16 + 32 * g + l] >> 4;
    }
  }
}

void unpack_q6_k(const uint8_t* blk, uint8_t* q) {
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = blk + 64 * half;
    const uint8_t* qh = blk + 128 + 32 * half;
    uint8_t* out = q + 128 * half;
    for (int l = 0; l < 32; ++l) {
      out[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
      out[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
      out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
      out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
    }
  }
}

// Interleave 4-value runs of 16 rows' quants: 64 bytes per 4 values, nibbles of `q` packed
// as described above (two 4-value runs per byte).
// Word n of the result: the 4 bytes at `base + n * stride` (one per row of a group).
inline __m512i gather_rows(const uint8_t* base, int64_t stride) {
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(stride)));
  return _mm512_i32gather_epi32(offsets, base, 1);
}

void put_nibble_chunks(const uint8_t (*q)[QK_K], uint8_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int c = 0; c < QK_K / 8; ++c) {
    const __m512i lo = _mm512_and_si512(gather_rows(&q[0][8 * c], QK_K), low4);
    const __m512i hi = _mm512_and_si512(gather_rows(&q[0][8 * c + 4], QK_K), low4);
    _mm512_storeu_si512(out + 64 * c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)));  // nibbles: no carries
  }
}

// The high 2 bits of Q6_K quants, 16 values per 64-byte chunk (see the layout above).
void put_high_bits(const uint8_t (*q)[QK_K], uint8_t* out) {
  const __m512i two = _mm512_set1_epi8(0x03);
  for (int s = 0; s < 16; ++s) {
    __m512i bits = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      const __m512i high = _mm512_and_si512(_mm512_srli_epi32(gather_rows(&q[0][16 * s + 4 * i], QK_K), 4), two);
      bits = _mm512_or_si512(bits, _mm512_slli_epi32(high, 2 * i));  // 2-bit fields: no carries
    }
    _mm512_storeu_si512(out + 64 * s, bits);
  }
}

// One packed block from GROUP source blocks (nullptr: a padding row, all zero).
void pack_block(int64_t type_id, const uint8_t* const* src, uint8_t* out) {
  alignas(64) uint8_t q[GROUP][QK_K];
  // Real rows write every byte they own; padding rows (the matrix's end) stay zero.
  if (std::any_of(src, src + GROUP, [](const uint8_t* row) { return row == nullptr; })) {
    std::memset(out, 0, packed_format(type_id).bytes);
    std::memset(q, 0, sizeof(q));
  }
  if (type_id == TYPE_Q4_K) {
    for (int n = 0; n < GROUP; ++n) {
      if (src[n] == nullptr) continue;
      uint8_t scales[8], mins[8];
      unpack_q4_k(src[n], q[n], scales, mins);
      std::memcpy(out + 2 * n, src[n], 2);
      std::memcpy(out + 32 + 2 * n, src[n] + 2, 2);
      for (int sb = 0; sb < 8; ++sb) {
        out[64 + GROUP * sb + n] = scales[sb];
        out[192 + 32 * (sb / 2) + 2 * n + sb % 2] = mins[sb];
      }
    }
    put_nibble_chunks(q, out + 320);
  } else if (type_id == TYPE_Q6_K) {
    for (int n = 0; n < GROUP; ++n) {
      if (src[n] == nullptr) continue;
      unpack_q6_k(src[n], q[n]);
      std::memcpy(out + 2 * n, src[n] + 208, 2);
      for (int s = 0; s < 16; ++s) out[32 + GROUP * s + n] = src[n][192 + s];
    }
    put_nibble_chunks(q, out + 288);
    put_high_bits(q, out + 2336);
  } else {  // Q8_0
    for (int n = 0; n < GROUP; ++n) {
      if (src[n] == nullptr) continue;
      std::memcpy(out + 2 * n, src[n], 2);
      std::memcpy(q[n], src[n] + 2, 32);
    }
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int c = 0; c < 8; ++c) {
      const __m512i values = _mm512_xor_si512(gather_rows(&q[0][4 * c], QK_K), offset);
      // Padding rows stay zero (their codes would be 0x80).
      __mmask16 real = 0;
      for (int n = 0; n < GROUP; ++n) real |= static_cast<__mmask16>(src[n] != nullptr) << n;
      _mm512_mask_storeu_epi32(out + 32 + 64 * c, real, values);
    }
  }
}

// Decode streams every packed weight once per token: with 4 KiB pages that is a TLB miss
// and a page walk every 4 KiB. Transparent huge pages (2 MiB) take them away; where THP
// is in "madvise" mode (a common default) memory gets them only when asked, before it is
// first touched.
void ask_for_huge_pages(const at::Tensor& t) {
  constexpr uintptr_t HUGE = 2u << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + HUGE - 1) & ~(HUGE - 1), last = (start + t.nbytes()) & ~(HUGE - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

// blocks [E, N, row_bytes] (or [N, row_bytes]) -> [E, ceil(N / 64), blocks per row, 4, packed bytes]:
// per super-group of 4 groups of 16 rows, block by block, the 4 groups' packed blocks.
// A byte buffer starting on a 2 MiB boundary, with huge pages asked for: one allocation can
// hold all of a model's packed weights (carved out by pack_rows' `out`), so every one of them
// gets huge pages, not just the interiors of the large ones.
at::Tensor huge_page_buffer(int64_t nbytes) {
  TORCH_CHECK(nbytes >= 0, "huge_page_buffer: negative size");
  constexpr int64_t HUGE = 2 << 20;
  const at::Tensor raw = at::empty({nbytes + HUGE}, at::kByte);
  const int64_t skew = static_cast<int64_t>(reinterpret_cast<uintptr_t>(raw.data_ptr()) % HUGE);
  at::Tensor buffer = raw.narrow(0, skew == 0 ? 0 : HUGE - skew, nbytes);
  ask_for_huge_pages(buffer);
  return buffer;
}

at::Tensor pack_rows(const at::Tensor& blocks_in, int64_t type_id, int64_t k, const std::optional<at::Tensor>& out) {
  const PackedFormat fmt = packed_format(type_id);
  const Geometry geo = geometry(type_id);
  const at::Tensor blocks = blocks_in.dim() == 2 ? blocks_in.unsqueeze(0) : blocks_in;
  TORCH_CHECK(blocks.dim() == 3, "blocks must be [N, row_bytes] or [E, N, row_bytes]");
  const int64_t experts = blocks.size(0), n = blocks.size(1);
  check_blocks(blocks.reshape({experts * n, blocks.size(2)}), geo, k);
  const at::Tensor source = blocks.contiguous();
  const int64_t groups = (n + GROUP - 1) / GROUP, n_blocks = k / fmt.block_size, row_bytes = source.size(2);
  const int64_t supers = (groups + SUPER - 1) / SUPER;
  at::Tensor packed;
  if (out.has_value()) {
    TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == at::kByte && out->is_contiguous() &&
                    out->numel() == experts * supers * n_blocks * SUPER * fmt.bytes,
                "pack_rows: `out` must be a contiguous CPU uint8 tensor of the packed size");
    packed = out->view({experts, supers, n_blocks, SUPER, fmt.bytes});
  } else {
    packed = at::empty({experts, supers, n_blocks, SUPER, fmt.bytes}, at::kByte);
    ask_for_huge_pages(packed);
  }
  packed.zero_();  // padding groups of the last super-group stay zero (never computed)
  const uint8_t* src = source.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, experts * groups, 1, [&](int64_t begin, int64_t end) {
    const uint8_t* rows[GROUP];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t e = item / groups, g = item % groups;
      for (int64_t b = 0; b < n_blocks; ++b) {
        for (int64_t r = 0; r < GROUP; ++r) {
          const int64_t row = g * GROUP + r;
          rows[r] = row < n ? src + (e * n + row) * row_bytes + b * geo.type_size : nullptr;
        }
        const int64_t super_index = e * supers + g / SUPER;
        pack_block(type_id, rows, dst + ((super_index * n_blocks + b) * SUPER + g % SUPER) * fmt.bytes);
      }
    }
  });
  return blocks_in.dim() == 2 ? packed.squeeze(0) : packed;
}

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
  m.def("pack_rows(Tensor blocks, int type_id, int k, Tensor? out=None) -> Tensor", &qwen35_ggml::pack_rows);
  m.def("huge_page_buffer(int nbytes) -> Tensor", &qwen35_ggml::huge_page_buffer);
  m.def("packed_gemv(Tensor packed, int type_id, Tensor x, int n) -> Tensor", &qwen35_ggml::packed_gemv);
  m.def("packed_gemv_many(Tensor[] packed, int[] type_ids, Tensor x, int[] ns) -> Tensor", &qwen35_ggml::packed_gemv_many);
  m.def("packed_expert_gemv_many(Tensor[] packed, int[] type_ids, Tensor x, Tensor ids, int[] ns) -> Tensor",
        &qwen35_ggml::packed_expert_gemv_many);
}
