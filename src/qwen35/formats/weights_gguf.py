"""GGUF Qwen 3.5 files (architectures qwen35, qwen35moe) mapped onto the network's canonical weights.

The names are those llama.cpp's converter writes. Its transforms, and how each is
undone or honoured here:
- norms stored as 1 + w: the network wants the multiplier, so they are used as is
  (`ssm_norm`, the DeltaNet output norm, was never shifted);
- `ssm_a` = -exp(A_log): exactly the network's `decay_rate`;
- `ssm_conv1d` squeezed to [conv_dim, kernel]: the network's shape already;
- value heads reordered from grouped to tiled order (V rows of `attn_qkv`, V
  channels of `ssm_conv1d`, `attn_gate`, `ssm_alpha`, `ssm_beta`, `ssm_a`, `ssm_dt`,
  columns of `ssm_out`): honoured in the maths (config.value_head_order = "tiled":
  value head j reads key head j % n_k), so no quantized block is ever permuted;
- `ffn_gate_inp_shexp` written as a vector [H]: read as the [1, H] gate;
- experts as separate `ffn_{gate,up,down}_exps` or fused `ffn_gate_up_exps`
  ([E, 2I, H], gate rows first): the fused one is split by rows.
The MTP block is block index `num_layers` (`nextn.*` plus an ordinary attention layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwen35.model.config import ModelConfig

LAYER_NAMES = {
    "input_layernorm": "attn_norm.weight",
    "post_attention_layernorm": "post_attention_norm.weight",
    "self_attn.q_proj": "attn_q.weight",
    "self_attn.k_proj": "attn_k.weight",
    "self_attn.v_proj": "attn_v.weight",
    "self_attn.o_proj": "attn_output.weight",
    "self_attn.q_norm": "attn_q_norm.weight",
    "self_attn.k_norm": "attn_k_norm.weight",
    "linear_attn.in_proj_qkv": "attn_qkv.weight",
    "linear_attn.in_proj_z": "attn_gate.weight",
    "linear_attn.in_proj_b": "ssm_beta.weight",
    "linear_attn.in_proj_a": "ssm_alpha.weight",
    "linear_attn.out_proj": "ssm_out.weight",
    "linear_attn.conv1d": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.decay_rate": "ssm_a",
    "linear_attn.norm": "ssm_norm.weight",
    "mlp.gate_proj": "ffn_gate.weight",
    "mlp.up_proj": "ffn_up.weight",
    "mlp.down_proj": "ffn_down.weight",
    "mlp.gate": "ffn_gate_inp.weight",
    "mlp.experts.gate": "ffn_gate_exps.weight",
    "mlp.experts.up": "ffn_up_exps.weight",
    "mlp.experts.down": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp.weight",
}
MTP_NAMES = {
    "mtp.fc": "nextn.eh_proj.weight",
    "mtp.pre_fc_norm_embedding": "nextn.enorm.weight",
    "mtp.pre_fc_norm_hidden": "nextn.hnorm.weight",
    "mtp.norm": "nextn.shared_head_norm.weight",
}
FUSED_GATE_UP = "ffn_gate_up_exps.weight"


@dataclass(frozen=True)
class Source:
    name: str
    shape: tuple[int, ...]  # the stored tensor's PyTorch-order shape
    rows: tuple[int, int] | None = None  # take rows [start, stop) of dim -2 (a fused tensor's half)
    reshape: tuple[int, ...] | None = None  # the stored tensor read with this shape instead


def source_for(canonical: str, shape: tuple[int, ...], config: ModelConfig, tensor_names) -> Source:
    """Where a canonical weight lives in a GGUF file; `tensor_names` tells fused from separate experts."""
    if canonical == "embed_tokens":
        return Source("token_embd.weight", shape)
    if canonical == "lm_head":
        return Source("token_embd.weight" if config.tie_word_embeddings else "output.weight", shape)
    if canonical == "norm":
        return Source("output_norm.weight", shape)
    if canonical in MTP_NAMES:
        return Source(f"blk.{config.num_layers}.{MTP_NAMES[canonical]}", shape)
    match = re.fullmatch(r"(?:layers\.(\d+)|mtp\.layers\.(\d+))\.(.+)", canonical)
    if match is None:
        raise AssertionError(f"no GGUF name for {canonical}")
    block = int(match[1]) if match[1] is not None else config.num_layers + int(match[2])
    part = match[3]
    name = f"blk.{block}.{LAYER_NAMES[part]}"
    if part in ("mlp.experts.gate", "mlp.experts.up") and name not in tensor_names:
        fused = f"blk.{block}.{FUSED_GATE_UP}"
        if fused in tensor_names:
            experts, width, hidden = shape
            rows = (0, width) if part == "mlp.experts.gate" else (width, 2 * width)
            return Source(fused, (experts, 2 * width, hidden), rows=rows)
    if part == "mlp.shared_expert_gate":
        return Source(name, (shape[1],), reshape=shape)
    return Source(name, shape)
