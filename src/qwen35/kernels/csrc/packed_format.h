// The row-group packed layout of Q4_K / Q6_K / Q8_0 weights, shared by the packing
// (ggml_pack.cpp) and the kernels that read it (ggml_packed.cpp).
//
// Packed, 16 consecutive rows share each block: a 512-bit register holds 4 consecutive quants of
// each of the 16 rows (byte 4n + j: row n, value j).
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

#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "ggml_blocks.h"

namespace qwen35_ggml {

constexpr int64_t GROUP = 16;  // weight rows per packed group: one 32-bit lane each
// Groups stored together: a super-group's blocks lie block by block, the 4 groups' packed
// blocks side by side ([super-group][block][group][bytes]), so a decode call that takes 4
// groups at a time reads one linear stream.
constexpr int64_t SUPER = 4;

struct PackedFormat {
  int64_t block_size;  // values of a row per packed block
  int64_t bytes;       // bytes per packed block of GROUP rows
  int64_t corr_per_block;  // int32 correction terms of x per block
};

inline PackedFormat packed_format(int64_t type_id) {
  switch (type_id) {
    case TYPE_Q4_K: return {QK_K, 2368, 4};
    case TYPE_Q6_K: return {QK_K, 3360, 16};
    case TYPE_Q8_0: return {32, 544, 1};
    default: TORCH_CHECK(false, "qwen35_ggml: no packed layout for ggml type ", type_id);
  }
}

}  // namespace qwen35_ggml
