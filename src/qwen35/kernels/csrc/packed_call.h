// Several matmuls with row-group packed weights (ggml_packed.cpp) in one parallel region:
// the projections that read one input (q/k/v, gate/up), an MoE layer's used experts, or
// both at once. x is quantized once per block size its weights' types need; the threads
// split the whole call by its cost.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

namespace qwen35_ggml {

// Checks that `packed` holds packed [n, k] weights of `type_id` (`dims` 4: one matrix, 5: a
// stack of experts), as pack_rows makes them.
void check_packed_weight(const at::Tensor& packed, int64_t type_id, int64_t n, int64_t k, int64_t dims);

// Bytes of one packed [n, k] matrix of a packed type (an expert's stride in an [E, ...] stack).
int64_t packed_matrix_bytes(int64_t type_id, int64_t n, int64_t k);

class PackedCall {
 public:
  // x [M, K] fp32, contiguous, alive until run() returns; `type_ids`: every type that add() will get.
  PackedCall(const at::Tensor& x, at::IntArrayRef type_ids);
  ~PackedCall();
  PackedCall(const PackedCall&) = delete;
  PackedCall& operator=(const PackedCall&) = delete;

  // Packed weight W [n, K] (`packed` points at its first byte) times rows x_rows[j] of x, for
  // j < n_slots: row slots[j] of the output gets W x_rows[j] in columns [column, column + n).
  // The two index arrays must stay alive until run() returns.
  void add(const uint8_t* packed, int64_t type_id, int64_t n, int64_t column, const int64_t* slots,
           const int64_t* x_rows, int64_t n_slots);

  // Every added product into out (rows `ld` floats apart).
  void run(float* out, int64_t ld) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace qwen35_ggml
