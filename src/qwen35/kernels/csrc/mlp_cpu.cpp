// Qwen 3.5's MLP blocks in one call each, on row-group packed weights (packed_call.h):
// - dense_mlp: down(silu(gate x) * up x), two packed calls;
// - sparse_moe: after the router, softmax top-k renormalised, the chosen experts' SwiGLU MLPs
//   and the sigmoid-gated shared expert: every used expert's gate and up with the shared
//   expert's in one packed call, then every down in another, whatever the number of tokens.
// In Python these are a dozen tensor operations and several kernel calls per layer and token.
// Plain references: MLP and SparseMoE in model/qwen35.py (tests/test_moe.py pins them together).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ggml_blocks.h"
#include "packed_call.h"
#include "vector_math.h"

namespace qwen35_ggml {
namespace {

// Per token: the top_k experts by softmax probability (ties: the lower id first) and their
// probabilities renormalised to sum to 1.
void route(const float* logits, int64_t n_experts, int64_t top_k, int64_t* ids, float* weights) {
  const float largest = *std::max_element(logits, logits + n_experts);
  std::vector<float> probs(n_experts);
  float total = 0;
  for (int64_t e = 0; e < n_experts; ++e) total += probs[e] = std::exp(logits[e] - largest);
  std::vector<int64_t> order(n_experts);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                    [&](int64_t a, int64_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); });
  float chosen = 0;
  for (int64_t j = 0; j < top_k; ++j) chosen += probs[order[j]] / total;
  for (int64_t j = 0; j < top_k; ++j) {
    ids[j] = order[j];
    weights[j] = probs[order[j]] / total / chosen;
  }
}

// hidden[r] = silu(gate) * up, gate and up side by side in rows of `ld` floats.
void swiglu_rows(const float* gate_up, int64_t ld, int64_t width, int64_t rows, float* hidden) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = gate_up + r * ld;
      const float* up = gate + width;
      float* out = hidden + r * width;
      for (int64_t i = 0; i < width; i += kLanes) {
        const __mmask16 mask = lanes_below(width - i);
        _mm512_mask_storeu_ps(out + i, mask,
                              _mm512_mul_ps(silu16(_mm512_maskz_loadu_ps(mask, gate + i)), _mm512_maskz_loadu_ps(mask, up + i)));
      }
    }
  });
}

// x [M, K] fp32; gate, up [intermediate, K] and down [K, intermediate] packed. Returns [M, K].
at::Tensor dense_mlp(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef types, int64_t intermediate) {
  TORCH_CHECK(x_in.dim() == 2 && weights.size() == 3 && types.size() == 3, "x [M, K]; gate, up and down");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  for (int i = 0; i < 3; ++i) check_packed_weight(weights[i], types[i], i < 2 ? intermediate : k, i < 2 ? k : intermediate, 4);
  std::vector<int64_t> rows(m);
  std::iota(rows.begin(), rows.end(), 0);
  at::Tensor gate_up = at::empty({m, 2 * intermediate}, at::kFloat);
  {
    PackedCall call(x, {types[0], types[1]});
    call.add(weights[0].data_ptr<uint8_t>(), types[0], intermediate, 0, rows.data(), rows.data(), m);
    call.add(weights[1].data_ptr<uint8_t>(), types[1], intermediate, intermediate, rows.data(), rows.data(), m);
    call.run(gate_up.data_ptr<float>(), 2 * intermediate);
  }
  at::Tensor hidden = at::empty({m, intermediate}, at::kFloat);
  swiglu_rows(gate_up.data_ptr<float>(), 2 * intermediate, intermediate, m, hidden.data_ptr<float>());
  at::Tensor out = at::empty({m, k}, at::kFloat);
  PackedCall call(hidden, {types[2]});
  call.add(weights[2].data_ptr<uint8_t>(), types[2], k, 0, rows.data(), rows.data(), m);
  call.run(out.data_ptr<float>(), k);
  return out;
}

// x [N, K] fp32, logits [N, E]; experts = [gate, up, down], packed [E, ...] stacks of
// [intermediate, K], [intermediate, K], [K, intermediate]; shared = [] or the shared
// expert's [gate, up, down] packed matrices, with shared_gate [K] (or [1, K]).
// Returns [N, K] fp32.
at::Tensor sparse_moe(const at::Tensor& x_in, const at::Tensor& logits_in, int64_t top_k, at::TensorList experts,
                      at::IntArrayRef expert_types, int64_t intermediate, at::TensorList shared,
                      at::IntArrayRef shared_types, int64_t shared_intermediate, const std::optional<at::Tensor>& shared_gate_in) {
  TORCH_CHECK(x_in.dim() == 2 && logits_in.dim() == 2 && logits_in.size(0) == x_in.size(0), "x [N, K], logits [N, E]");
  TORCH_CHECK(experts.size() == 3 && expert_types.size() == 3, "experts: gate, up and down");
  const bool has_shared = !shared.empty();
  TORCH_CHECK(!has_shared || (shared.size() == 3 && shared_types.size() == 3 && shared_gate_in.has_value()),
              "shared expert: gate, up, down and its gate vector");
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), logits = logits_in.to(at::kFloat).contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n_experts = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= n_experts, "top_k must be in [1, ", n_experts, "]");
  for (int i = 0; i < 3; ++i) {
    check_packed_weight(experts[i], expert_types[i], i < 2 ? intermediate : k, i < 2 ? k : intermediate, 5);
    TORCH_CHECK(experts[i].size(0) == n_experts, "expert weights must hold one expert per router logit");
    if (has_shared) {
      check_packed_weight(shared[i], shared_types[i], i < 2 ? shared_intermediate : k, i < 2 ? k : shared_intermediate, 4);
    }
  }
  const int64_t slots = tokens * top_k;
  std::vector<int64_t> ids(slots);
  std::vector<float> weights(slots);
  const float* lp = logits.data_ptr<float>();
  for (int64_t n = 0; n < tokens; ++n) route(lp + n * n_experts, n_experts, top_k, ids.data() + n * top_k, weights.data() + n * top_k);

  const auto [first, order] = sort_slots_by_expert(ids.data(), slots, n_experts);
  std::vector<int64_t> token_of(slots), shared_rows(tokens), shared_slots(tokens);
  for (int64_t j = 0; j < slots; ++j) token_of[j] = order[j] / top_k;
  for (int64_t n = 0; n < tokens; ++n) shared_rows[n] = n, shared_slots[n] = slots + n;
  const int64_t expert_bytes[3] = {packed_matrix_bytes(expert_types[0], intermediate, k),
                                   packed_matrix_bytes(expert_types[1], intermediate, k),
                                   packed_matrix_bytes(expert_types[2], k, intermediate)};
  auto expert_matrix = [&](int m, int64_t e) { return experts[m].data_ptr<uint8_t>() + e * expert_bytes[m]; };

  // Gate and up of every used expert (rows: slots) and of the shared expert (rows: slots + token).
  const int64_t widest = std::max(intermediate, has_shared ? shared_intermediate : 0);
  at::Tensor gate_up = at::empty({slots + tokens, 2 * widest}, at::kFloat);
  {
    std::vector<int64_t> types = {expert_types[0], expert_types[1]};
    if (has_shared) types.insert(types.end(), {shared_types[0], shared_types[1]});
    PackedCall call(x, types);
    for (int64_t e = 0; e < n_experts; ++e) {
      const int64_t count = first[e + 1] - first[e];
      if (count == 0) continue;
      for (int m = 0; m < 2; ++m) {
        call.add(expert_matrix(m, e), expert_types[m], intermediate, m * intermediate, order.data() + first[e],
                 token_of.data() + first[e], count);
      }
    }
    if (has_shared) {
      for (int m = 0; m < 2; ++m) {
        call.add(shared[m].data_ptr<uint8_t>(), shared_types[m], shared_intermediate, m * shared_intermediate,
                 shared_slots.data(), shared_rows.data(), tokens);
      }
    }
    call.run(gate_up.data_ptr<float>(), 2 * widest);
  }

  // Down: one call when the shared expert is as wide as the routed ones, else two.
  at::Tensor down_out = at::empty({slots + tokens, k}, at::kFloat);
  const float* gu = gate_up.data_ptr<float>();
  const bool together = !has_shared || shared_intermediate == intermediate;
  at::Tensor hidden = at::empty({together ? slots + tokens : slots, intermediate}, at::kFloat);
  swiglu_rows(gu, 2 * widest, intermediate, slots, hidden.data_ptr<float>());
  at::Tensor shared_hidden = hidden;
  if (has_shared) {
    if (!together) shared_hidden = at::empty({tokens, shared_intermediate}, at::kFloat);
    float* target = together ? hidden.data_ptr<float>() + slots * intermediate : shared_hidden.data_ptr<float>();
    swiglu_rows(gu + slots * 2 * widest, 2 * widest, shared_intermediate, tokens, target);
  }
  {
    PackedCall call(hidden, {expert_types[2]});
    for (int64_t e = 0; e < n_experts; ++e) {
      const int64_t count = first[e + 1] - first[e];
      if (count > 0) call.add(expert_matrix(2, e), expert_types[2], k, 0, order.data() + first[e], order.data() + first[e], count);
    }
    if (has_shared && together) call.add(shared[2].data_ptr<uint8_t>(), shared_types[2], k, 0, shared_slots.data(), shared_slots.data(), tokens);
    call.run(down_out.data_ptr<float>(), k);
  }
  if (has_shared && !together) {
    // Shared rows land after the routed ones: output row slots + n, input row n.
    PackedCall call(shared_hidden, {shared_types[2]});
    call.add(shared[2].data_ptr<uint8_t>(), shared_types[2], k, 0, shared_slots.data(), shared_rows.data(), tokens);
    call.run(down_out.data_ptr<float>(), k);
  }

  // Weighted sum of each token's experts, plus sigmoid(shared_gate . x) times the shared expert.
  at::Tensor shared_gate;
  if (has_shared) {
    shared_gate = shared_gate_in->to(at::kFloat).contiguous();
    TORCH_CHECK(shared_gate.numel() == k, "shared expert gate must hold ", k, " values");
  }
  at::Tensor out = at::empty({tokens, k}, at::kFloat);
  const float* y = down_out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* row = op + n * k;
      std::fill(row, row + k, 0.0f);
      for (int64_t j = 0; j < top_k; ++j) {
        const float w = weights[n * top_k + j];
        const float* expert_row = y + (n * top_k + j) * k;
        for (int64_t i = 0; i < k; ++i) row[i] += w * expert_row[i];
      }
      if (!has_shared) continue;
      const float* g = shared_gate.data_ptr<float>();
      float dot = 0;
      for (int64_t i = 0; i < k; ++i) dot += g[i] * xp[n * k + i];
      const float factor = 1.0f / (1.0f + std::exp(-dot));
      const float* shared_row = y + (slots + n) * k;
      for (int64_t i = 0; i < k; ++i) row[i] += factor * shared_row[i];
    }
  });
  return out;
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("dense_mlp(Tensor x, Tensor[] weights, int[] types, int intermediate) -> Tensor", &qwen35_ggml::dense_mlp);
  m.def(
      "sparse_moe(Tensor x, Tensor logits, int top_k, Tensor[] experts, int[] expert_types, int intermediate, "
      "Tensor[] shared, int[] shared_types, int shared_intermediate, Tensor? shared_gate) -> Tensor",
      &qwen35_ggml::sparse_moe);
}
