// A Gated DeltaNet layer's whole decode step (one token) between in_proj and out_proj, as one
// C++ call: causal conv + SiLU, q/k l2 norms, the gates, the delta rule step and the gated
// output norm. Its plain reference is GatedDeltaNet's chain of methods in model/qwen35.py:
//     causal_conv -> delta_rule_inputs -> recurrent_gated_delta_rule -> gated_norm
// One parallel region over (batch row, value head): each head convolves its own q, k and v
// channels (with n_v > n_k the value heads of one key head each redo its q and k channels, a few
// hundred multiply-adds, cheaper than a second region), then steps its state (delta_rule_step.h)
// and norms its output. The state is what costs: read once from memory (the next head's while
// this one is updated: prefetched, with its conv inputs), written once with streaming stores.
// A serial pre-pass for the conv and norms measured ~5 us slower on Qwen3.5-0.8B's shapes.
// Everything is computed in fp32; the inputs are left unchanged (a cache snapshot may hold them).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "delta_rule_step.h"
#include "vector_math.h"

namespace qwen35_ggml {
namespace {

// x [B, 1, width] as fp32 with a contiguous last dim; rows may be strided (a, b, z and the conv
// input are column slices of one projection), and are not copied for it.
at::Tensor token_rows(const at::Tensor& x, int64_t batch, int64_t width, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(0) == batch && x.size(1) == 1 && x.size(2) == width,
              "deltanet decode: ", name, " must be a CPU tensor [", batch, ", 1, ", width, "], got ", x.sizes());
  at::Tensor rows = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  return width > 1 && rows.stride(2) != 1 ? rows.contiguous() : rows;
}

// Channels [first, first + count) of one token's conv (before SiLU) into out[0, count): each
// window is the channel's K-1 held inputs then the new one, summed in that order without fused
// multiply-adds, as the reference sums them. `next` (when not null) receives the channels'
// new held inputs. kKept > 0 fixes K-1 at compile time; 0 reads it from `kept_at_runtime`.
template <int kKept>
void conv_channels(const float* held_rows, const float* weight_rows, const float* newest, int64_t first, int64_t count,
                   int64_t kept_at_runtime, float* out, float* next_rows) {
  const int64_t kept = kKept > 0 ? kKept : kept_at_runtime, taps = kept + 1;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t c = first + i;
    const float* held = held_rows + c * kept;
    const float* w = weight_rows + c * taps;
    float sum = held[0] * w[0];
    for (int64_t j = 1; j < kept; ++j) sum += held[j] * w[j];
    out[i] = sum + newest[c] * w[kept];
    if (next_rows != nullptr) {
      float* next = next_rows + c * kept;
      for (int64_t j = 0; j + 1 < kept; ++j) next[j] = held[j + 1];
      next[kept - 1] = newest[c];
    }
  }
}

// The same for Qwen 3.5's kernel of 4 (three held inputs), 16 channels at a time: the held
// inputs [16, 3] and the weights [16, 4] are read as whole vectors and their taps picked out by
// permutes; the rest of the channels go through conv_channels.
struct ConvPermutes {
  __m512i held_tap[3], weight_tap[4], shifted_newest[3];
  __mmask16 held_high[3], newest_lanes[3];

  ConvPermutes() {
    alignas(64) int32_t index[16];
    for (int j = 0; j < 3; ++j) {
      // Lane c wants float 3c + j of [H0 H1 H2]: from H0:H1 (5 index bits) or, past 31, from H2 (4 bits).
      for (int c = 0; c < 16; ++c) index[c] = 3 * c + j;
      held_tap[j] = _mm512_load_si512(index);
      held_high[j] = static_cast<__mmask16>(0xFFFF << ((32 - j + 2) / 3));
    }
    for (int j = 0; j < 4; ++j) {  // lane c wants float 4c + j of [W0 W1 W2 W3]
      for (int c = 0; c < 16; ++c) index[c] = 4 * c + j;
      weight_tap[j] = _mm512_load_si512(index);
    }
    // Float p = 16r + l of the new held rows is channel (p - 2) / 3's newest when p % 3 == 2.
    for (int r = 0; r < 3; ++r) {
      newest_lanes[r] = 0;
      for (int l = 0; l < 16; ++l) {
        const int p = 16 * r + l;
        index[l] = p % 3 == 2 ? (p - 2) / 3 : 0;
        if (p % 3 == 2) newest_lanes[r] = static_cast<__mmask16>(newest_lanes[r] | (1u << l));
      }
      shifted_newest[r] = _mm512_load_si512(index);
    }
  }
};

void conv_channels_kernel4(const ConvPermutes& permutes, const float* held_rows, const float* weight_rows,
                           const float* newest, int64_t first, int64_t count, float* out, float* next_rows) {
  const int64_t whole = count / kLanes * kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
    const int64_t c = first + i;
    const float* held = held_rows + c * 3;
    const float* w = weight_rows + c * 4;
    const __m512 h0 = _mm512_loadu_ps(held), h1 = _mm512_loadu_ps(held + 16), h2 = _mm512_loadu_ps(held + 32);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
    const __m512 w3 = _mm512_loadu_ps(w + 48), x = _mm512_loadu_ps(newest + c);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      const __m512 tap_weight = _mm512_mask_blend_ps(0xFF00, _mm512_permutex2var_ps(w0, permutes.weight_tap[j], w1),
                                                     _mm512_permutex2var_ps(w2, permutes.weight_tap[j], w3));
      const __m512 input = j == 3 ? x
                                  : _mm512_mask_permutexvar_ps(_mm512_permutex2var_ps(h0, permutes.held_tap[j], h1),
                                                               permutes.held_high[j], permutes.held_tap[j], h2);
      const __m512 term = _mm512_mul_ps(input, tap_weight);
      sum = j == 0 ? term : _mm512_add_ps(sum, term);
    }
    _mm512_storeu_ps(out + i, sum);
    if (next_rows != nullptr) {  // each channel's held inputs move one place; the newest comes last
      float* next = next_rows + c * 3;
      const __m512 s0 = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(h1), _mm512_castps_si512(h0), 1));
      const __m512 s1 = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(h2), _mm512_castps_si512(h1), 1));
      const __m512 s2 = _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(h2), _mm512_castps_si512(h2), 1));
      _mm512_storeu_ps(next, _mm512_mask_permutexvar_ps(s0, permutes.newest_lanes[0], permutes.shifted_newest[0], x));
      _mm512_storeu_ps(next + 16,
                       _mm512_mask_permutexvar_ps(s1, permutes.newest_lanes[1], permutes.shifted_newest[1], x));
      _mm512_storeu_ps(next + 32,
                       _mm512_mask_permutexvar_ps(s2, permutes.newest_lanes[2], permutes.shifted_newest[2], x));
    }
  }
  conv_channels<3>(held_rows, weight_rows, newest, first + whole, count - whole, 3, out + whole, next_rows);
}

// Every 64-byte line of `count` floats from `start`.
void prefetch_range(const float* start, int64_t count) {
  const char* first = reinterpret_cast<const char*>(start);
  for (const char* line = first; line < first + count * sizeof(float); line += 64) _mm_prefetch(line, _MM_HINT_T0);
}

void silu_in_place(float* x, int64_t size) {
  for (int64_t i = 0; i < size; i += kLanes) {
    const __mmask16 mask = lanes_below(size - i);
    _mm512_mask_storeu_ps(x + i, mask, silu16(_mm512_maskz_loadu_ps(mask, x + i)));
  }
}

float sum_of_squares(const float* x, int64_t size) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < size; i += kLanes) {
    const __m512 value = _mm512_maskz_loadu_ps(lanes_below(size - i), x + i);
    sum = _mm512_fmadd_ps(value, value, sum);
  }
  return _mm512_reduce_add_ps(sum);
}

// x = x * first * second, rounded after each product as the reference rounds (second = 1: once).
void scale_in_place(float* x, int64_t size, float first, float second) {
  const __m512 f = _mm512_set1_ps(first), s = _mm512_set1_ps(second);
  for (int64_t i = 0; i < size; i += kLanes) {
    const __mmask16 mask = lanes_below(size - i);
    __m512 value = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), f);
    if (second != 1.0f) value = _mm512_mul_ps(value, s);
    _mm512_mask_storeu_ps(x + i, mask, value);
  }
}

// torch's softplus (threshold 20: above it, x itself).
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// The head's output o [d_v], in place: o * rsqrt(mean(o^2) + eps) * weight * silu(z).
void gated_norm_in_place(float* out, const float* z, const float* weight, int64_t dim, float eps) {
  const float factor = 1.0f / std::sqrt(sum_of_squares(out, dim) / static_cast<float>(dim) + eps);
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t i = 0; i < dim; i += kLanes) {
    const __mmask16 mask = lanes_below(dim - i);
    const __m512 normed = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, out + i), f),
                                        _mm512_maskz_loadu_ps(mask, weight + i));
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(normed, silu16(_mm512_maskz_loadu_ps(mask, z + i))));
  }
}

// projected [B, 1, conv_dim] (q, k, v channels side by side), a, b [B, 1, n_v], z [B, 1, n_v d_v];
// conv_state [B, conv_dim, K-1], conv_weight [conv_dim, K]; dt_bias, decay_rate [n_v];
// norm_weight [d_v]; recurrent_state [B, n_v, d_k, d_v] fp32. Value head j reads key head
// j / (n_v / n_k) when `grouped`, else j % n_k.
// Returns (y [B, 1, n_v d_v] fp32 for out_proj, the new conv state in conv_state's dtype, the new
// recurrent state).
std::tuple<at::Tensor, at::Tensor, at::Tensor> deltanet_decode(
    const at::Tensor& projected_in, const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& z_in,
    const at::Tensor& conv_state_in, const at::Tensor& conv_weight_in, const at::Tensor& dt_bias_in,
    const at::Tensor& decay_rate_in, const at::Tensor& norm_weight_in, const at::Tensor& recurrent_in,
    int64_t key_heads, int64_t key_dim, int64_t value_heads, int64_t value_dim, bool grouped, double l2_eps,
    double norm_eps) {
  TORCH_CHECK(key_heads >= 1 && key_dim >= 1 && value_dim >= 1 && value_heads >= key_heads &&
                  value_heads % key_heads == 0,
              "deltanet decode: value heads must be a positive multiple of key heads, and head sizes positive");
  TORCH_CHECK(projected_in.dim() == 3, "deltanet decode: projected must be [B, 1, conv_dim]");
  const int64_t batch = projected_in.size(0), key_width = key_heads * key_dim, value_width = value_heads * value_dim;
  const int64_t channels = 2 * key_width + value_width;
  const at::Tensor projected = token_rows(projected_in, batch, channels, "projected");
  const at::Tensor a = token_rows(a_in, batch, value_heads, "a"), b = token_rows(b_in, batch, value_heads, "b");
  const at::Tensor z = token_rows(z_in, batch, value_width, "z");
  TORCH_CHECK(conv_weight_in.dim() == 2 && conv_weight_in.size(0) == channels && conv_weight_in.size(1) >= 2,
              "deltanet decode: conv_weight must be [", channels, ", K] with K >= 2, got ", conv_weight_in.sizes());
  const int64_t kept = conv_weight_in.size(1) - 1;
  TORCH_CHECK(conv_state_in.dim() == 3 && conv_state_in.size(0) == batch && conv_state_in.size(1) == channels &&
                  conv_state_in.size(2) == kept,
              "deltanet decode: conv_state must be [", batch, ", ", channels, ", ", kept, "], got ",
              conv_state_in.sizes());
  TORCH_CHECK(conv_state_in.device().is_cpu() && conv_weight_in.device().is_cpu() && recurrent_in.device().is_cpu(),
              "deltanet decode: the states and weights must be CPU tensors");
  TORCH_CHECK(recurrent_in.dim() == 4 && recurrent_in.size(0) == batch && recurrent_in.size(1) == value_heads &&
                  recurrent_in.size(2) == key_dim && recurrent_in.size(3) == value_dim,
              "deltanet decode: recurrent_state must be [", batch, ", ", value_heads, ", ", key_dim, ", ", value_dim,
              "], got ", recurrent_in.sizes());
  TORCH_CHECK(dt_bias_in.numel() == value_heads && decay_rate_in.numel() == value_heads &&
                  norm_weight_in.numel() == value_dim,
              "deltanet decode: dt_bias and decay_rate need n_v values, norm_weight d_v");
  const auto fp32 = [](const at::Tensor& x) { return x.to(at::kFloat).contiguous(); };
  const at::Tensor conv_state = fp32(conv_state_in), conv_weight = fp32(conv_weight_in);
  const at::Tensor dt_bias = fp32(dt_bias_in), decay_rate = fp32(decay_rate_in), norm_weight = fp32(norm_weight_in);
  const at::Tensor old_state = fp32(recurrent_in);

  at::Tensor y = at::empty({batch, 1, value_width}, at::kFloat);
  at::Tensor new_conv_state = at::empty({batch, channels, kept}, at::kFloat);
  at::Tensor new_state = at::empty(old_state.sizes(), at::kFloat);
  const float *projected_p = projected.data_ptr<float>(), *a_p = a.data_ptr<float>(), *b_p = b.data_ptr<float>();
  const float *z_p = z.data_ptr<float>(), *held_p = conv_state.data_ptr<float>();
  const float* weight_p = conv_weight.data_ptr<float>();
  const float *dt_bias_p = dt_bias.data_ptr<float>(), *decay_rate_p = decay_rate.data_ptr<float>();
  const float *norm_p = norm_weight.data_ptr<float>(), *old_p = old_state.data_ptr<float>();
  float *y_p = y.data_ptr<float>(), *next_held_p = new_conv_state.data_ptr<float>();
  float* state_p = new_state.data_ptr<float>();
  const int64_t projected_stride = projected.stride(0), a_stride = a.stride(0), b_stride = b.stride(0);
  const int64_t z_stride = z.stride(0), repeats = value_heads / key_heads, head_state = key_dim * value_dim;
  // As the reference rounds it (d_k ** -0.5): the normalised q, then times the scale.
  const float q_scale = static_cast<float>(std::pow(static_cast<double>(key_dim), -0.5));
  const float l2 = static_cast<float>(l2_eps), norm = static_cast<float>(norm_eps);
  const bool stream = value_dim % kLanes == 0 && reinterpret_cast<uintptr_t>(state_p) % 64 == 0;
  // A thread's share must outweigh waking it (tens of microseconds with passive OpenMP waits).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / head_state);

  static const ConvPermutes permutes;
  // The first q, k and v channel of value head `head`.
  const auto first_channels = [&](int64_t head) {
    const int64_t key_head = grouped ? head / repeats : head % key_heads;
    return std::array<int64_t, 3>{key_head * key_dim, key_width + key_head * key_dim, 2 * key_width + head * value_dim};
  };
  // Value head `head` of batch row `row`: its q, k (normed) and v after the conv and SiLU.
  const auto prepare = [&](int64_t row, int64_t head, float* q, float* k, float* v) {
    // One value head per key head writes the q and k channels' new held inputs.
    const bool writes_key_channels = grouped ? head % repeats == 0 : head < key_heads;
    const float* held = held_p + row * channels * kept;
    const float* newest = projected_p + row * projected_stride;
    float* next_held = next_held_p + row * channels * kept;
    float* key_next = writes_key_channels ? next_held : nullptr;
    const auto [q_first, k_first, v_first] = first_channels(head);
    if (kept == 3) {  // Qwen 3.5's kernel of 4
      conv_channels_kernel4(permutes, held, weight_p, newest, q_first, key_dim, q, key_next);
      conv_channels_kernel4(permutes, held, weight_p, newest, k_first, key_dim, k, key_next);
      conv_channels_kernel4(permutes, held, weight_p, newest, v_first, value_dim, v, next_held);
    } else {
      conv_channels<0>(held, weight_p, newest, q_first, key_dim, kept, q, key_next);
      conv_channels<0>(held, weight_p, newest, k_first, key_dim, kept, k, key_next);
      conv_channels<0>(held, weight_p, newest, v_first, value_dim, kept, v, next_held);
    }
    silu_in_place(q, key_dim);
    silu_in_place(k, key_dim);
    silu_in_place(v, value_dim);
    scale_in_place(q, key_dim, 1.0f / std::sqrt(sum_of_squares(q, key_dim) + l2), q_scale);
    scale_in_place(k, key_dim, 1.0f / std::sqrt(sum_of_squares(k, key_dim) + l2), 1.0f);
  };
  // The conv's inputs for value head `head` of batch row `row` (cold: every layer's weights went
  // through the caches since this layer's last step), fetched while the head before it steps.
  const auto prefetch_conv_inputs = [&](int64_t row, int64_t head) {
    const auto firsts = first_channels(head);
    for (int part = 0; part < 3; ++part) {
      const int64_t count = part < 2 ? key_dim : value_dim;
      prefetch_range(held_p + (row * channels + firsts[part]) * kept, count * kept);
      prefetch_range(weight_p + firsts[part] * (kept + 1), count * (kept + 1));
      prefetch_range(projected_p + row * projected_stride + firsts[part], count);
    }
  };
  at::parallel_for(0, batch * value_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> workspace(2 * key_dim + value_dim);  // this head's q, k, v
    float *q = workspace.data(), *k = q + key_dim, *v = k + key_dim;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / value_heads, head = unit % value_heads;
      prepare(row, head, q, k, v);
      const float g = decay_rate_p[head] * softplus(a_p[row * a_stride + head] + dt_bias_p[head]);
      const float beta = 1.0f / (1.0f + std::exp(-b_p[row * b_stride + head]));
      const bool last = unit + 1 == end;
      if (!last) prefetch_conv_inputs((unit + 1) / value_heads, (unit + 1) % value_heads);
      float* out = y_p + unit * value_dim;
      step_head(old_p + unit * head_state, state_p + unit * head_state, q, k, v, g, beta, out, key_dim, value_dim,
                stream, last ? nullptr : old_p + (unit + 1) * head_state);
      gated_norm_in_place(out, z_p + row * z_stride + head * value_dim, norm_p, value_dim, norm);
    }
    _mm_sfence();  // the streamed rows are visible before the states are handed back
  });
  const at::Tensor conv_out =
      conv_state_in.scalar_type() == at::kFloat ? new_conv_state : new_conv_state.to(conv_state_in.scalar_type());
  return {y, conv_out, new_state};
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def(
      "deltanet_decode(Tensor projected, Tensor a, Tensor b, Tensor z, Tensor conv_state, Tensor conv_weight, "
      "Tensor dt_bias, Tensor decay_rate, Tensor norm_weight, Tensor recurrent_state, int key_heads, int key_dim, "
      "int value_heads, int value_dim, bool grouped, float l2_eps, float norm_eps) -> (Tensor, Tensor, Tensor)",
      &qwen35_ggml::deltanet_decode);
}
