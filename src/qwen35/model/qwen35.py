"""The Qwen 3.5 text network: hybrid Gated DeltaNet + gated full attention, dense or MoE.

This file holds the maths only. Weights arrive already in one canonical form
(`model/weight_specs.py` lists them), whatever file they came from:
- every norm weight is the multiplier itself (HF's zero-centred `w` becomes `1 + w`),
  except the DeltaNet output norm, which is a plain multiplier everywhere;
- `linear_attn.decay_rate` is -exp(A_log);
- `linear_attn.conv1d` is [conv_dim, kernel];
- linear weights are `QuantLinear` modules (forward in fp32, `.rows(ids)` for the
  embedding), experts `QuantExperts`; dense checkpoints wrap their tensors in them too.
DeltaNet value heads may come in grouped or tiled order (config.value_head_order);
the maths honours either by choosing which key head serves each value head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.engine.cache import AttentionKV, DeltaNetState, HybridCache
from qwen35.engine.paged_kv import PagedAttentionKV
from qwen35.engine.quantized_kv import TypedAttentionKV, block_type, make_attention_kv
from qwen35.kernels.delta_rule import gated_delta_rule
from qwen35.kernels.quant_linear import ExpertGroup, LinearGroup
from qwen35.model import fused
from qwen35.model.config import FULL_ATTENTION, ModelConfig
from qwen35.model.fused import L2_NORM_EPS, fused_steps


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * scale over the last dimension, in fp32."""
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps)


def layer_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm as one fused call where one runs (torch composes it of five ops)."""
    steps = fused_steps(x)
    return steps.rms_norm(x, scale, eps) if steps is not None else rms_norm(x, scale, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual)), one fused call where one runs."""
    steps = fused_steps(x)
    if steps is not None:
        return steps.add_rms_norm(x, residual, scale, eps)
    x = x + residual
    return x, rms_norm(x, scale, eps)


def project_add_norm(projection, y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float):
    """add_rms_norm(x, projection(y), scale, eps): a mixer's output projection, the residual add and the
    next norm, one call where a fused form takes all three (a one-token step on a GPU)."""
    steps = fused_steps(x)
    fused = steps.project_add_norm(projection, y, x, scale, eps) if steps is not None else None
    return fused if fused is not None else add_rms_norm(x, projection(y), scale, eps)


def mlp_add_norm(mlp, h: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float):
    """add_rms_norm(x, mlp(h), scale, eps), the MLP's last product taking the add and norm where fused."""
    steps = fused_steps(x)
    fused = steps.mlp_add_norm(mlp, h, x, scale, eps) if steps is not None else None
    return fused if fused is not None else add_rms_norm(x, mlp(h), scale, eps)


class RotaryEmbedding:
    """Partial, interleaved M-RoPE: frequency j takes its position from stream j % 3 (T, H, W)."""

    def __init__(self, c: ModelConfig, device=None):
        half = c.rotary_dim // 2
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.rotary_dim, 2, dtype=torch.float32, device=device) / c.rotary_dim))
        stream = torch.zeros(half, dtype=torch.long)
        for axis in (1, 2):  # H and W own every third frequency, up to 3 * their section size
            stream[axis : min(3 * c.mrope_section[axis], half) : 3] = axis
        self.stream = stream

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, B, T] -> cos, sin [B, T, rotary_dim]."""
        if self.inv_freq.device != positions.device:  # moved once: a copy per step would stall a GPU
            self.inv_freq, self.stream = self.inv_freq.to(positions.device), self.stream.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq  # [3, B, T, half]
        index = self.stream.expand(*freqs.shape[1:])[None]
        freqs = freqs.gather(0, index)[0]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, d]: rotate-half RoPE on the first rotary_dim dims, the rest unchanged."""
    dim = cos.shape[-1]
    rotated, passed = x[..., :dim], x[..., dim:]
    first, second = rotated.chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, passed], dim=-1)


class Attention:
    """Gated full attention: per-head q/gate split, q/k norms, partial M-RoPE, GQA, sigmoid gate.

    Decoding, the steps between the matmuls are one fused call where one runs (model/fused.py);
    the lines after it are its plain reference (tests/test_attention_decode.py and
    tests/test_triton_attention.py pin them together)."""

    def __init__(self, c: ModelConfig, w: dict, prefix: str):
        self.c = c
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (w[f"{prefix}.{n}"] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.qkv_proj = LinearGroup(self.q_proj, self.k_proj, self.v_proj)
        self.q_norm, self.k_norm = w[f"{prefix}.q_norm"], w[f"{prefix}.k_norm"]

    @property
    def output_projection(self):
        return self.o_proj

    def __call__(self, x, kv: AttentionKV, starts, rope, mask):
        return self.o_proj(self.mix(x, kv, starts, rope, mask))

    def mix(self, x, kv: AttentionKV, starts, rope, mask):
        """The gated attention output, before the output projection."""
        q_gate, k, v = self.qkv_proj(x)
        if kv.token_by_token and x.shape[1] > 1:  # a speculative verification: as one-token steps would
            cos, sin = rope
            return torch.cat([
                self._attend(x[:, t : t + 1], q_gate[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], kv, starts + t,
                             (cos[:, t : t + 1], sin[:, t : t + 1]), mask[:, t : t + 1])
                for t in range(x.shape[1])
            ], dim=1)
        return self._attend(x, q_gate, k, v, kv, starts, rope, mask)

    def _attend(self, x, q_gate, k, v, kv: AttentionKV, starts, rope, mask):
        c = self.c
        batch, length, _ = x.shape
        steps = fused_steps(x) if length == 1 else None
        # A store in another form than the fused step writes takes the plain lines below: on the CPU, types
        # outside fused.CPU_BLOCK_KV_TYPES (every cache type is in it); elsewhere, all but one float type.
        if isinstance(kv, TypedAttentionKV) and not (
                {kv.type_k, kv.type_v} <= fused.CPU_BLOCK_KV_TYPES if steps is fused.CPU_STEPS
                else kv.fused_decode()):
            steps = None
        if steps is not None:
            kv.make_room(starts, 1)
            out = steps.attention_decode(
                kv, q_gate, k, v, self.q_norm, self.k_norm, *rope, starts,
                c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps, c.head_dim**-0.5,
            )
            return out
        q_gate = q_gate.view(batch, length, c.num_attention_heads, 2 * c.head_dim)
        q, gate = q_gate[..., : c.head_dim], q_gate[..., c.head_dim :]
        q = layer_rms_norm(q, self.q_norm, c.rms_norm_eps)
        k = layer_rms_norm(k.view(batch, length, c.num_key_value_heads, c.head_dim), self.k_norm, c.rms_norm_eps)
        v = v.view(batch, length, c.num_key_value_heads, c.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

        kv.write(starts, k, v)
        keys, values = kv.view(mask.shape[-1])
        if length == 1:
            out = _single_query_attention(q, keys, values, mask, c.head_dim**-0.5)
        else:
            out = _prompt_attention(q, keys, values, mask, c.head_dim**-0.5)
        return out * torch.sigmoid(gate.reshape(batch, length, -1))


def _prompt_attention(q, keys, values, mask, scale):
    """Attention of T prompt tokens, q [B, T, n_q, d] over keys/values [B, S, n_kv, d] -> [B, T, n_q * d].

    SDPA's fused kernels never hold the whole [T, S] score matrix per head. One row continuing its
    cache over half-precision K/V (a GPU in fast precision) is causal from the bottom-right corner,
    which the flash kernel takes without a mask, in bf16 like the prompt's other products; an explicit
    mask with grouped heads would make SDPA materialize the scores on a GPU. Otherwise: the mask, in fp32.
    """
    batch, length, n_q, _ = q.shape
    if batch == 1 and keys.dtype in (torch.bfloat16, torch.float16) and bool(mask[0, -1, -1]):
        from torch.nn.attention.bias import causal_lower_right

        group = n_q // keys.shape[2]
        keys, values = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (keys, values))
        out = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(1, 2), keys, values,
                                             attn_mask=causal_lower_right(length, keys.shape[2]), scale=scale)
        return out.transpose(1, 2).float().reshape(batch, length, -1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.float().transpose(1, 2), values.float().transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(batch, length, -1)


def _single_query_attention(q, keys, values, mask, scale):
    """Decode attention, q [B, 1, n_q, d] over keys/values [B, S, n_kv, d]: a few small matmuls.

    SDPA's fused kernel wakes every thread for this little work; plain ops stay on one.
    Query heads come in groups of n_q / n_kv consecutive heads per key/value head.
    """
    batch, _, n_q, d = q.shape
    n_kv = keys.shape[2]
    grouped = q.reshape(batch, n_kv, n_q // n_kv, d)
    scores = grouped @ keys.float().permute(0, 2, 3, 1) * scale  # [B, n_kv, group, S]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = scores.softmax(dim=-1) @ values.float().transpose(1, 2)  # [B, n_kv, group, d]
    return out.reshape(batch, 1, n_q * d)


class GatedDeltaNet:
    """Linear attention with the gated delta rule, a short causal conv and a gated output norm.

    `causal_conv`, `delta_rule_inputs` and `gated_norm` are the plain maths. Where fused forms
    run (model/fused.py), a decode step is one C++ call on the CPU or one Triton launch on a
    GPU, and prefill fuses its steps too; tests/test_delta_rule.py, test_deltanet_decode.py and
    test_triton_deltanet.py pin them to these methods.
    """

    def __init__(self, c: ModelConfig, w: dict, prefix: str):
        self.c = c
        self.in_proj_qkv, self.in_proj_z = w[f"{prefix}.in_proj_qkv"], w[f"{prefix}.in_proj_z"]
        self.in_proj_b, self.in_proj_a = w[f"{prefix}.in_proj_b"], w[f"{prefix}.in_proj_a"]
        self.in_proj = LinearGroup(self.in_proj_qkv, self.in_proj_a, self.in_proj_b, self.in_proj_z)
        self.out_proj = w[f"{prefix}.out_proj"]
        self.conv_weight = w[f"{prefix}.conv1d"]  # [conv_dim, kernel]
        self.dt_bias, self.decay_rate = w[f"{prefix}.dt_bias"], w[f"{prefix}.decay_rate"]
        self.norm = w[f"{prefix}.norm"]

    def causal_conv(self, projected: torch.Tensor, state: DeltaNetState) -> torch.Tensor:
        """Depthwise causal conv + SiLU over [B, T, C], continuing from the row's last kernel-1 inputs.

        The SiLU runs on the token-major contiguous layout, as in the C++ form: torch's SiLU and
        the l2 norms' sums that follow then see the same layout in both, and give the same bits.
        """
        window = torch.cat([state.conv.float(), projected.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
        state.store(conv=window[:, :, window.shape[-1] - (self.c.linear_conv_kernel - 1) :].to(state.conv.dtype).clone())
        # One shifted multiply-add per tap: far faster than a depthwise F.conv1d on CPU, and the
        # taps are summed in order (for one token too), as the C++ form sums them.
        length, kernel = projected.shape[1], self.conv_weight.shape[1]
        mixed = window[:, :, :length] * self.conv_weight[:, :1]
        for tap in range(1, kernel):
            mixed = mixed + window[:, :, tap : tap + length] * self.conv_weight[:, tap : tap + 1]
        return F.silu(mixed.transpose(1, 2).contiguous())

    def delta_rule_inputs(self, mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        """The conv output [B, T, conv_dim] and gate projections a, b [B, T, n_v] -> q, k, v, g, beta,
        head-major ([B, n_v, T, ...]) with key heads matched to value heads."""
        c = self.c
        batch, length, _ = mixed.shape
        n_k, n_v, d_k, d_v = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        q, k, v = mixed.split([c.linear_key_dim, c.linear_key_dim, c.linear_value_dim], dim=-1)
        q = _l2_normalize(q.reshape(batch, length, n_k, d_k)) * d_k**-0.5
        k = _l2_normalize(k.reshape(batch, length, n_k, d_k))
        v = v.reshape(batch, length, n_v, d_v)
        if n_v != n_k:
            if c.value_head_order == "grouped":  # value head j reads key head j // (n_v / n_k)
                q, k = q.repeat_interleave(n_v // n_k, dim=2), k.repeat_interleave(n_v // n_k, dim=2)
            else:  # tiled: value head j reads key head j % n_k
                q, k = q.repeat(1, 1, n_v // n_k, 1), k.repeat(1, 1, n_v // n_k, 1)
        beta = torch.sigmoid(b.float())
        g = self.decay_rate * F.softplus(a.float() + self.dt_bias)
        return _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(g), _heads_first(beta)

    def gated_norm(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The delta rule's output [B, n_v, T, d_v], per head RMS-normed and gated by silu(z), z [B, T, n_v * d_v]
        -> [B, T, n_v * d_v]."""
        batch, heads, length, dim = out.shape
        out = out.transpose(1, 2)  # [B, T, n_v, d_v]
        out = rms_norm(out, self.norm, self.c.rms_norm_eps) * F.silu(z.float().view(batch, length, heads, dim))
        return out.reshape(batch, length, heads * dim)

    @property
    def output_projection(self):
        return self.out_proj

    def __call__(self, x, state: DeltaNetState):
        return self.out_proj(self.mix(x, state))

    def mix(self, x, state: DeltaNetState):
        """The gated, normed delta-rule output, before the output projection."""
        projected, a, b, z = self.in_proj(x)
        if state.steps is None:
            return self._mix(x, projected, a, b, z, state)
        outputs = []  # a speculative verification: one-token steps, each state kept
        for t in range(x.shape[1]):
            one = slice(t, t + 1)
            outputs.append(self._mix(x[:, one], projected[:, one], a[:, one], b[:, one], z[:, one], state))
            state.keep_step()
        return torch.cat(outputs, dim=1)

    def _mix(self, x, projected, a, b, z, state: DeltaNetState):
        steps = fused_steps(x)
        if steps is not None:
            run = steps.deltanet_decode if x.shape[1] == 1 else steps.deltanet_prefill
            return run(self, projected, a, b, z, state)
        q, k, v, g, beta = self.delta_rule_inputs(self.causal_conv(projected, state), a, b)
        out, recurrent = gated_delta_rule(q, k, v, g, beta, state.recurrent)
        state.store(recurrent=recurrent)
        return self.gated_norm(out, z)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, ...] -> contiguous [B, H, T, ...], the delta rule's layout."""
    return x.transpose(1, 2).contiguous()


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_NORM_EPS)


class MLP:
    def __init__(self, w: dict, prefix: str):
        self.gate_proj, self.up_proj, self.down_proj = (w[f"{prefix}.{n}"] for n in ("gate_proj", "up_proj", "down_proj"))
        self.gate_up_proj = LinearGroup(self.gate_proj, self.up_proj)

    def __call__(self, x):
        steps = fused_steps(x)
        out = steps.mlp(self, x) if steps is not None else None
        if out is not None:
            return out
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE:
    """Softmax router, top-k renormalised, plus a sigmoid-gated shared expert.

    Where fused forms run (model/fused.py), everything after the router is one C++ call on the
    CPU (packed weights) or a few Triton launches on a GPU; `_routed`'s plain lines are their
    reference."""

    def __init__(self, c: ModelConfig, w: dict, prefix: str):
        self.top_k = c.num_experts_per_tok
        self.router = w[f"{prefix}.gate"]
        self.gates, self.ups, self.downs = (w[f"{prefix}.experts.{n}"] for n in ("gate", "up", "down"))
        self.gates_ups, self.downs_group = ExpertGroup(self.gates, self.ups), ExpertGroup(self.downs)
        self.shared = MLP(w, f"{prefix}.shared_expert") if f"{prefix}.shared_expert_gate" in w else None
        self.shared_gate = w.get(f"{prefix}.shared_expert_gate")
        self.shared_expert: int | None = None  # the shared expert's id, once stacked after the routed ones

    def fuse(self) -> None:
        """On a GPU: gate and up in one block tensor, and the shared expert, where its block types and
        shapes are the routed experts', stacked after them as expert E, so that a one-token step runs the
        routed and shared experts in the same two launches (model/fused.py)."""
        if self.shared is None:
            self.gates_ups.fuse()
            return
        mlp = self.shared
        gate_up, down = (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)
        if (self.gates_ups.can_stack(gate_up) and self.downs_group.can_stack(down)
                and self.gates_ups.fuse(shared=gate_up) and self.downs_group.fuse(shared=down)):
            self.shared_expert = self.gates.n_experts
            mlp.gate_up_proj.fuse(into=self.gates_ups.fused.blocks[self.shared_expert])
            return
        self.gates_ups.fuse()
        mlp.gate_up_proj.fuse()

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        experts_device = self.gates.blocks.device
        if experts_device != x.device:  # --n-cpu-moe: the routed experts stay in system RAM
            logits = self.router(x).to(experts_device)
            routed = self._routed(x.to(experts_device), logits, with_shared=False).to(x.device)
            return (routed + self._shared(x)).reshape(shape)
        return self._routed(x, None, with_shared=True).reshape(shape)

    def _routed(self, x, logits, with_shared: bool):
        """The experts' part; `logits` None: the router's product is still to be done (fused with the
        routing where a fused form takes it)."""
        steps = fused_steps(x)
        out = steps.moe(self, x, logits, with_shared) if steps is not None else None
        if out is not None:
            return out
        logits = self.router(x) if logits is None else logits
        shared = self.shared is not None and with_shared
        probs = logits.softmax(dim=-1)
        top_weights, top_experts = probs.topk(self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        gate, up = self.gates_ups(x, top_experts)
        hidden = F.silu(gate) * up  # [N, k, I]
        out = (self.downs(hidden, top_experts) * top_weights[..., None]).sum(dim=1)
        return out + self._shared(x) if shared else out

    def _shared(self, x):
        if self.shared is None:
            return torch.zeros_like(x)
        return self.shared(x) * torch.sigmoid(F.linear(x, self.shared_gate))


class DecoderLayer:
    def __init__(self, c: ModelConfig, w: dict, prefix: str, layer_type: str):
        self.is_attention = layer_type == FULL_ATTENTION
        self.eps = c.rms_norm_eps
        self.input_norm = w[f"{prefix}.input_layernorm"]
        self.device = self.input_norm.device  # all of the layer but, with --n-cpu-moe, its routed experts
        self.post_norm = w[f"{prefix}.post_attention_layernorm"]
        if self.is_attention:
            self.mixer = Attention(c, w, f"{prefix}.self_attn")
        else:
            self.mixer = GatedDeltaNet(c, w, f"{prefix}.linear_attn")
        self.mlp = SparseMoE(c, w, f"{prefix}.mlp") if c.is_moe else MLP(w, f"{prefix}.mlp")

    def __call__(self, x, h, layer_cache, starts, rope, mask, next_norm):
        """The residual stream x through this layer, given h = x normed by this layer's input norm.

        Returns the new x and x normed by `next_norm` (the next layer's input norm, or the final
        norm): each norm is then one call with the residual add before it.
        """
        if self.is_attention:
            mixed = self.mixer.mix(h, layer_cache, starts, rope, mask)
        else:
            mixed = self.mixer.mix(h, layer_cache)
        x, h = project_add_norm(self.mixer.output_projection, mixed, x, self.post_norm, self.eps)
        return mlp_add_norm(self.mlp, h, x, next_norm, self.eps)


class Qwen35Network(nn.Module):
    """The text model. `weights` maps the names of `weight_specs(config)` to tensors/modules."""

    def __init__(self, config: ModelConfig, weights: dict, mtp_weights: dict | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = weights["embed_tokens"]
        self.final_norm = weights["norm"]
        self.lm_head = weights["lm_head"]
        self.layers = [DecoderLayer(config, weights, f"layers.{i}", t) for i, t in enumerate(config.layer_types)]
        # Each layer ends with the next one's input norm (or the final norm), on its own device.
        following = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        self.next_norms = [norm.to(layer.device) for layer, norm in zip(self.layers, following)]
        self.rotary = RotaryEmbedding(config)
        # Held for speculative decoding later; plain decoding does not use it.
        self.mtp_weights = mtp_weights or {}
        # Registered so that `.modules()` (e.g. kernels' set_mode, .to(device)) reaches every weight module.
        every = {**weights, **self.mtp_weights}
        self.weight_modules = nn.ModuleDict(
            {name.replace(".", "__"): w for name, w in every.items() if isinstance(w, nn.Module)}
        )
        self._dense = [w for w in every.values() if isinstance(w, torch.Tensor)]

    def fuse_for_gpu(self) -> None:
        """Layers that read one input share one block tensor per block type (LinearGroup/ExpertGroup.fuse),
        on the GPU layers: fewer, larger launches per step there. The CPU's kernels group by themselves."""
        for layer in self.layers:
            if layer.device.type not in fused.GPU_DEVICE_TYPES:
                continue
            mixer, mlp = layer.mixer, layer.mlp
            (mixer.qkv_proj if layer.is_attention else mixer.in_proj).fuse()
            if not isinstance(mlp, SparseMoE):
                mlp.gate_up_proj.fuse()
            elif mlp.gates.blocks.device.type in fused.GPU_DEVICE_TYPES:
                mlp.fuse()
            elif mlp.shared is not None:  # --n-cpu-moe: the routed experts stay on the CPU
                mlp.shared.gate_up_proj.fuse()

    @property
    def input_device(self) -> torch.device:
        """Where token ids go in: the embedding's device, which is the first layer's."""
        return self.embed_tokens.blocks.device

    @property
    def devices(self) -> set[torch.device]:
        return {module.blocks.device for module in self.weight_modules.values()}

    def dense_tensors(self) -> list[torch.Tensor]:
        """The small weights kept as plain fp32 tensors (norms, conv, decay, gates)."""
        return list(self._dense)

    def make_cache(self, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                   gpu_kv_dtype: torch.dtype | None = None, cache_type_k: str = "f32",
                   cache_type_v: str = "f32") -> HybridCache:
        """Each layer's state on that layer's device; the lengths where the token ids go in.
        The keywords: `attention_store`'s."""
        c = self.config
        layers = []
        for layer_type, layer in zip(c.layer_types, self.layers):
            device = layer.device
            if layer_type == FULL_ATTENTION:
                layers.append(self.attention_store(device, batch_size, dtype, gpu_kv_dtype, cache_type_k, cache_type_v))
            else:
                layers.append(DeltaNetState(
                    torch.zeros(batch_size, c.linear_conv_dim, c.linear_conv_kernel - 1, dtype=dtype, device=device),
                    torch.zeros(batch_size, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                                dtype=torch.float32, device=device),
                ))
        zeros = torch.zeros(batch_size, dtype=torch.long, device=self.input_device)
        return HybridCache(layers, zeros, zeros.clone())

    def attention_store(self, device: torch.device, batch_size: int = 1, dtype: torch.dtype = torch.float32,
                        gpu_kv_dtype: torch.dtype | None = None, cache_type_k: str = "f32",
                        cache_type_v: str = "f32"):
        """The K/V store of a full-attention layer on `device` (the MTP layer's too).
        `gpu_kv_dtype`: the K/V storage of layers on a GPU (paged there), if not `dtype`.
        `cache_type_k`/`cache_type_v`: how a CPU layer keeps K and V when `dtype` is float32
        (engine/quantized_kv.py: f32, f16, bf16 or a GGUF block type such as q8_0); a GPU layer's pages
        keep a block type too (float types there: `gpu_kv_dtype`)."""
        c = self.config
        if device.type in fused.GPU_DEVICE_TYPES:  # pages: rows grow without moving K/V
            return PagedAttentionKV(batch_size, c.num_key_value_heads, c.head_dim, gpu_kv_dtype or dtype, device,
                                    type_k=block_type(cache_type_k), type_v=block_type(cache_type_v))
        if dtype == torch.float32:
            return make_attention_kv(batch_size, c.num_key_value_heads, c.head_dim, device, cache_type_k, cache_type_v)
        return AttentionKV(batch_size, c.num_key_value_heads, c.head_dim, dtype, device)

    def attention_inputs(self, cache: HybridCache, positions: torch.Tensor):
        """(starts, rope, mask) for T tokens at `positions` [3, B, T] appended to each row of `cache`."""
        length = positions.shape[-1]
        starts = cache.lengths
        rope = self.rotary.cos_sin(positions)
        # Row b's query t sees keys 0 .. starts[b] + t of its own row.
        span = cache.static_length if cache.static_length is not None else int(starts.max()) + length
        key_index = torch.arange(span, device=starts.device)
        query_end = starts[:, None] + torch.arange(length, device=starts.device)  # [B, T]
        mask = key_index[None, None, :] <= query_end[:, :, None]  # [B, T, S]
        return starts, rope, mask

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor | None = None,
                      embeddings: torch.Tensor | None = None):
        """input_ids [B, T] appended to each row of `cache`; returns the final-normed hidden states.

        `embeddings` [B, T, hidden], when given, replaces the token lookup (images put
        their vision features in place of their placeholder tokens this way).
        """
        batch, length = input_ids.shape
        if positions is None:
            positions = cache.default_positions(length)
        starts, rope, mask = self.attention_inputs(cache, positions)
        x = self.embed_tokens.rows(input_ids) if embeddings is None else embeddings.float()
        h = layer_rms_norm(x, self.layers[0].input_norm, self.config.rms_norm_eps)
        context = {x.device: (starts, rope, mask)}  # what each layer reads, on each device used
        for layer, layer_cache, next_norm in zip(self.layers, cache.layers, self.next_norms):
            if layer.device != x.device:  # a split model (-ngl): the hidden state moves on
                x, h = x.to(layer.device), h.to(layer.device)
            if layer.device not in context:
                context[layer.device] = (starts.to(layer.device), tuple(t.to(layer.device) for t in rope),
                                         mask.to(layer.device))
            x, h = layer(x, h, layer_cache, *context[layer.device], next_norm)
        cache.advance(length, positions)
        return h.to(self.lm_head.blocks.device)

    def forward(self, input_ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor | None = None,
                embeddings: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab], or with `last_only` [B, 1, vocab] for the last position alone
        (a prompt's prefill needs no more; the 248K-row lm_head then runs once, not T times)."""
        hidden = self.hidden_states(input_ids, cache, positions, embeddings)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden).float()
