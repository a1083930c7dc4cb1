// The small steps of a Gated DeltaNet layer around the delta rule, each one C++ call instead
// of a dozen tensor operations (and, when decoding, a dozen Python dispatches per layer).
// Their plain references are GatedDeltaNet's methods in model/qwen35.py:
//   causal_conv_silu   <- GatedDeltaNet.causal_conv
//   deltanet_inputs    <- GatedDeltaNet.delta_rule_inputs
//   gated_rms_norm     <- GatedDeltaNet.gated_norm
// Everything is computed in fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace qwen35_ggml {
namespace {

constexpr int64_t kLanes = 16;

inline __mmask16 lanes_below(int64_t count) {
  return count >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

// Channels [begin, end) of one token's conv: each window is the channel's K-1 held inputs and
// the new one. kKept > 0 fixes K-1 at compile time (loops unrolled); 0 reads it from `kept`.
template <int kKept>
void conv_step_channels(const float* held_rows, const float* weight_rows, const float* newest, float* out,
                        float* next_rows, int64_t begin, int64_t end, int64_t kept_at_runtime) {
  const int64_t kept = kKept > 0 ? kKept : kept_at_runtime, taps = kept + 1;
  for (int64_t c = begin; c < end; ++c) {
    const float* held = held_rows + c * kept;
    const float* w = weight_rows + c * taps;
    float* next = next_rows + c * kept;
    float sum = held[0] * w[0];
    for (int64_t j = 1; j < kept; ++j) sum += held[j] * w[j];
    out[c] = sum + newest[c] * w[kept];
    for (int64_t j = 0; j + 1 < kept; ++j) next[j] = held[j + 1];
    next[kept - 1] = newest[c];
  }
}

// One token (decode): the held inputs and the weights are both channel-major, so each
// channel is a short dot product and nothing needs transposing (transposes would cost more
// than the arithmetic here).
std::tuple<at::Tensor, at::Tensor> causal_conv_step(const at::Tensor& x_in, const at::Tensor& conv_state,
                                                    const at::Tensor& weight_in) {
  const int64_t batch = x_in.size(0), channels = x_in.size(2), kept = weight_in.size(1) - 1;
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), weight = weight_in.to(at::kFloat).contiguous();
  const at::Tensor history = conv_state.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({batch, 1, channels}, at::kFloat);
  at::Tensor new_history = at::empty({batch, channels, kept}, at::kFloat);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *hp = history.data_ptr<float>();
  float *op = out.data_ptr<float>(), *np = new_history.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* held = hp + b * channels * kept;
    const float* newest = xp + b * channels;
    float* next = np + b * channels * kept;
    if (kept == 3) {  // Qwen 3.5's kernel of 4
      conv_step_channels<3>(held, wp, newest, op + b * channels, next, 0, channels, kept);
    } else {
      conv_step_channels<0>(held, wp, newest, op + b * channels, next, 0, channels, kept);
    }
  }
  at::silu_(out);
  return {out, new_history.to(conv_state.scalar_type())};
}

// Depthwise causal conv + SiLU: x [B, T, C] continues the inputs held in conv_state
// [B, C, K-1] (the previous K-1 steps, oldest first); weight [C, K].
// Returns (SiLU(conv) [B, T, C] fp32, the last K-1 inputs [B, C, K-1] in conv_state's dtype).
// Each output is w0 x0 + w1 x1 + ... summed in that order without fused multiply-adds, as the
// reference's shifted multiply-adds (and its 4-term sum for one token) do, so the
// pre-activation values match it exactly.
std::tuple<at::Tensor, at::Tensor> causal_conv_silu(const at::Tensor& x_in, const at::Tensor& conv_state,
                                                    const at::Tensor& weight_in) {
  TORCH_CHECK(x_in.dim() == 3 && conv_state.dim() == 3 && weight_in.dim() == 2,
              "causal conv: x [B, T, C], conv_state [B, C, K-1], weight [C, K]");
  const int64_t batch = x_in.size(0), length = x_in.size(1), channels = x_in.size(2), taps = weight_in.size(1);
  TORCH_CHECK(taps >= 1 && weight_in.size(0) == channels && conv_state.size(0) == batch &&
                  conv_state.size(1) == channels && conv_state.size(2) == taps - 1,
              "causal conv: shapes do not agree");
  if (length == 1 && taps > 1) return causal_conv_step(x_in, conv_state, weight_in);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  // Taps first and the state time-major, so that every tap reads a contiguous row of channels.
  const at::Tensor weight = weight_in.to(at::kFloat).t().contiguous();                // [K, C]
  const at::Tensor history = conv_state.to(at::kFloat).transpose(1, 2).contiguous();  // [B, K-1, C]
  at::Tensor out = at::empty({batch, length, channels}, at::kFloat);
  at::Tensor new_history = at::empty({batch, taps - 1, channels}, at::kFloat);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *hp = history.data_ptr<float>();
  float *op = out.data_ptr<float>(), *np = new_history.data_ptr<float>();
  const int64_t kept = taps - 1;
  // Step p of the window: p < 0 are the held inputs, p >= 0 the new ones.
  auto input_row = [&](int64_t b, int64_t p) -> const float* {
    return p < 0 ? hp + (b * kept + kept + p) * channels : xp + (b * length + p) * channels;
  };
  at::parallel_for(0, batch * length, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / length, t = bt % length;
      float* row = op + bt * channels;
      for (int64_t c = 0; c < channels; c += kLanes) {
        const __mmask16 mask = lanes_below(channels - c);
        __m512 sum = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, input_row(b, t - kept) + c),
                                   _mm512_maskz_loadu_ps(mask, wp + c));
        for (int64_t j = 1; j < taps; ++j) {
          const __m512 term = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, input_row(b, t - kept + j) + c),
                                            _mm512_maskz_loadu_ps(mask, wp + j * channels + c));
          sum = _mm512_add_ps(sum, term);
        }
        _mm512_mask_storeu_ps(row + c, mask, sum);
      }
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < kept; ++i) {
      std::copy_n(input_row(b, length - kept + i), channels, np + (b * kept + i) * channels);
    }
  }
  at::silu_(out);
  return {out, new_history.transpose(1, 2).to(conv_state.scalar_type()).contiguous()};
}

// 1 / sqrt(reduce(x^2) + eps) over the last dim, by torch's own reduction: its summation order
// is the reference's (it depends on the layout, which both sides share), so the norms below
// keep the reference's bits. A few values per head and token.
at::Tensor inverse_norms(const at::Tensor& x, double eps, bool mean) {
  const at::Tensor squares = x * x;
  const at::Tensor reduced = mean ? at::mean(squares, {-1}, true) : at::sum(squares, {-1}, true);
  return at::rsqrt(reduced + eps).contiguous();
}

// out = x * factor, over `size` floats.
void scale_into(const float* x, float factor, float* out, int64_t size) {
  const __m512 f = _mm512_set1_ps(factor);
  for (int64_t i = 0; i < size; i += kLanes) {
    const __mmask16 mask = lanes_below(size - i);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), f));
  }
}

// From the conv output mixed [B, T, 2 n_k d_k + n_v d_v] (q, k, v side by side) and the gate
// projections a, b [B, T, n_v]: the delta rule's inputs, head-major, with key heads matched to
// value heads (`grouped`: value head j reads key head j / (n_v / n_k); else j % n_k):
//   q = l2norm(q) / sqrt(d_k), k = l2norm(k) [B, n_v, T, d_k]; v [B, n_v, T, d_v];
//   g = decay_rate softplus(a + dt_bias), beta = sigmoid(b) [B, n_v, T].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deltanet_inputs(
    const at::Tensor& mixed_in, const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& dt_bias,
    const at::Tensor& decay_rate, int64_t key_heads, int64_t key_dim, int64_t value_heads, int64_t value_dim,
    bool grouped, double eps) {
  TORCH_CHECK(mixed_in.dim() == 3 && a_in.dim() == 3 && b_in.sizes() == a_in.sizes(),
              "deltanet inputs: mixed [B, T, C], a and b [B, T, n_v]");
  const int64_t batch = mixed_in.size(0), length = mixed_in.size(1);
  TORCH_CHECK(key_heads >= 1 && value_heads % key_heads == 0 &&
                  mixed_in.size(2) == 2 * key_heads * key_dim + value_heads * value_dim && a_in.size(0) == batch &&
                  a_in.size(1) == length && a_in.size(2) == value_heads && dt_bias.numel() == value_heads &&
                  decay_rate.numel() == value_heads,
              "deltanet inputs: shapes do not agree");
  const at::Tensor mixed = mixed_in.to(at::kFloat).contiguous();
  const int64_t width = mixed.size(2), repeats = value_heads / key_heads;
  // q's and k's heads side by side: one reduction for both (each head's row is summed alone,
  // the same way as when the reference norms q and k apart).
  const at::Tensor query_and_key = mixed.narrow(2, 0, 2 * key_heads * key_dim);
  const at::Tensor norms = inverse_norms(query_and_key.view({batch, length, 2 * key_heads, key_dim}), eps, false);
  // torch's own softplus and sigmoid too (the reference's bits); only their layout changes below.
  const at::Tensor decay = (decay_rate.to(at::kFloat) * at::softplus(a_in.to(at::kFloat) + dt_bias.to(at::kFloat))).contiguous();
  const at::Tensor write_strength = at::sigmoid(b_in.to(at::kFloat)).contiguous();

  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor q = at::empty({batch, value_heads, length, key_dim}, f32);
  at::Tensor k = at::empty({batch, value_heads, length, key_dim}, f32);
  at::Tensor v = at::empty({batch, value_heads, length, value_dim}, f32);
  at::Tensor g = at::empty({batch, value_heads, length}, f32);
  at::Tensor beta = at::empty({batch, value_heads, length}, f32);
  // As the reference rounds it (d_k ** -0.5): the normalised q, then times the scale.
  const float q_scale = static_cast<float>(std::pow(static_cast<double>(key_dim), -0.5));
  const float *mp = mixed.data_ptr<float>(), *np = norms.data_ptr<float>();
  const float *decay_p = decay.data_ptr<float>(), *strength_p = write_strength.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *gp = g.data_ptr<float>(), *betap = beta.data_ptr<float>();
  at::parallel_for(0, batch * length, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t bi = bt / length, t = bt % length;
      const float* row = mp + bt * width;
      for (int64_t kh = 0; kh < key_heads; ++kh) {
        for (int64_t r = 0; r < repeats; ++r) {
          const int64_t vh = grouped ? kh * repeats + r : r * key_heads + kh;
          float* q_head = qp + ((bi * value_heads + vh) * length + t) * key_dim;
          float* k_head = kp + ((bi * value_heads + vh) * length + t) * key_dim;
          scale_into(row + kh * key_dim, np[bt * 2 * key_heads + kh], q_head, key_dim);
          scale_into(q_head, q_scale, q_head, key_dim);
          scale_into(row + (key_heads + kh) * key_dim, np[bt * 2 * key_heads + key_heads + kh], k_head, key_dim);
        }
      }
      const float* values = row + 2 * key_heads * key_dim;
      for (int64_t vh = 0; vh < value_heads; ++vh) {
        const int64_t at_head = (bi * value_heads + vh) * length + t;
        std::copy_n(values + vh * value_dim, value_dim, vp + at_head * value_dim);
        gp[at_head] = decay_p[bt * value_heads + vh];
        betap[at_head] = strength_p[bt * value_heads + vh];
      }
    }
  });
  return {q, k, v, g, beta};
}

// The output gate: out [B, H, T, d_v] (head-major, as the delta rule returns it) RMS-normed per
// head, times weight [d_v] and silu(z), z [B, T, H d_v]. Returns [B, T, H d_v] (token-major,
// for out_proj), rounded as the reference (rms_norm, then the gate) rounds.
at::Tensor gated_rms_norm(const at::Tensor& out_in, const at::Tensor& z_in, const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(out_in.dim() == 4 && z_in.dim() == 3 && weight_in.dim() == 1,
              "gated norm: out [B, H, T, d_v], z [B, T, H d_v], weight [d_v]");
  const int64_t batch = out_in.size(0), heads = out_in.size(1), length = out_in.size(2), dim = out_in.size(3);
  TORCH_CHECK(z_in.size(0) == batch && z_in.size(1) == length && z_in.size(2) == heads * dim &&
                  weight_in.size(0) == dim,
              "gated norm: shapes do not agree");
  const at::Tensor out = out_in.to(at::kFloat).contiguous();
  const at::Tensor factors = inverse_norms(out.transpose(1, 2), eps, true);  // [B, T, H, 1], token-major like the reference
  const at::Tensor gate = at::silu(z_in.to(at::kFloat)).contiguous();
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  at::Tensor result = at::empty({batch, length, heads * dim}, at::kFloat);
  const float *op = out.data_ptr<float>(), *fp = factors.data_ptr<float>();
  const float *zp = gate.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  at::parallel_for(0, batch * length, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / length, t = bt % length;
      for (int64_t h = 0; h < heads; ++h) {
        const float* x = op + ((b * heads + h) * length + t) * dim;
        const __m512 factor = _mm512_set1_ps(fp[bt * heads + h]);
        const float* z = zp + (bt * heads + h) * dim;
        float* y = rp + (bt * heads + h) * dim;
        for (int64_t i = 0; i < dim; i += kLanes) {
          const __mmask16 mask = lanes_below(dim - i);
          const __m512 normed = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), factor);
          const __m512 weighted = _mm512_mul_ps(normed, _mm512_maskz_loadu_ps(mask, wp + i));
          _mm512_mask_storeu_ps(y + i, mask, _mm512_mul_ps(weighted, _mm512_maskz_loadu_ps(mask, z + i)));
        }
      }
    }
  });
  return result;
}

}  // namespace
}  // namespace qwen35_ggml

TORCH_LIBRARY_FRAGMENT(qwen35_ggml, m) {
  m.def("causal_conv_silu(Tensor x, Tensor conv_state, Tensor weight) -> (Tensor, Tensor)",
        &qwen35_ggml::causal_conv_silu);
  m.def(
      "deltanet_inputs(Tensor mixed, Tensor a, Tensor b, Tensor dt_bias, Tensor decay_rate, int key_heads, "
      "int key_dim, int value_heads, int value_dim, bool grouped, float eps) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)",
      &qwen35_ggml::deltanet_inputs);
  m.def("gated_rms_norm(Tensor out, Tensor z, Tensor weight, float eps) -> Tensor", &qwen35_ggml::gated_rms_norm);
}
