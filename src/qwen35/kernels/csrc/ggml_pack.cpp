// Row-group packing of Q4_K / Q6_K / Q8_0 weights (the layout: packed_format.h), once at load,
// into buffers that ask for transparent huge pages. The kernels that read it: ggml_packed.cpp.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstring>
#include <optional>

#include "ggml_blocks.h"
#include "packed_format.h"

namespace qwen35_ggml {
namespace {

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

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("pack_rows(Tensor blocks, int type_id, int k, Tensor? out=None) -> Tensor", &qwen35_ggml::pack_rows);
  m.def("huge_page_buffer(int nbytes) -> Tensor", &qwen35_ggml::huge_page_buffer);
}
