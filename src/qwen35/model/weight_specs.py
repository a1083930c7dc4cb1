"""Every weight the text network takes, by canonical name and shape (PyTorch order): what a loader must
find in a file, whatever its format (formats/weights_gguf.py, weights_hf.py map their names onto these)."""

from __future__ import annotations

from dataclasses import dataclass

from qwen35.model.config import FULL_ATTENTION, ModelConfig


@dataclass(frozen=True)
class WeightSpec:
    shape: tuple[int, ...]  # PyTorch order ([out, in] for linear weights)
    kind: str  # "linear", "embedding", "tensor" (small, kept dense fp32), "experts" ([E, out, in])


def _attention_specs(c: ModelConfig, prefix: str) -> dict[str, WeightSpec]:
    q_width = c.num_attention_heads * c.head_dim
    kv_width = c.num_key_value_heads * c.head_dim
    return {
        f"{prefix}.q_proj": WeightSpec((2 * q_width, c.hidden_size), "linear"),
        f"{prefix}.k_proj": WeightSpec((kv_width, c.hidden_size), "linear"),
        f"{prefix}.v_proj": WeightSpec((kv_width, c.hidden_size), "linear"),
        f"{prefix}.o_proj": WeightSpec((c.hidden_size, q_width), "linear"),
        f"{prefix}.q_norm": WeightSpec((c.head_dim,), "tensor"),
        f"{prefix}.k_norm": WeightSpec((c.head_dim,), "tensor"),
    }


def _deltanet_specs(c: ModelConfig, prefix: str) -> dict[str, WeightSpec]:
    n_v = c.linear_num_value_heads
    return {
        f"{prefix}.in_proj_qkv": WeightSpec((c.linear_conv_dim, c.hidden_size), "linear"),
        f"{prefix}.in_proj_z": WeightSpec((c.linear_value_dim, c.hidden_size), "linear"),
        f"{prefix}.in_proj_b": WeightSpec((n_v, c.hidden_size), "linear"),
        f"{prefix}.in_proj_a": WeightSpec((n_v, c.hidden_size), "linear"),
        f"{prefix}.out_proj": WeightSpec((c.hidden_size, c.linear_value_dim), "linear"),
        f"{prefix}.conv1d": WeightSpec((c.linear_conv_dim, c.linear_conv_kernel), "tensor"),
        f"{prefix}.dt_bias": WeightSpec((n_v,), "tensor"),
        f"{prefix}.decay_rate": WeightSpec((n_v,), "tensor"),
        f"{prefix}.norm": WeightSpec((c.linear_value_head_dim,), "tensor"),
    }


def _mlp_specs(c: ModelConfig, prefix: str) -> dict[str, WeightSpec]:
    h = c.hidden_size
    if not c.is_moe:
        i = c.intermediate_size
        return {
            f"{prefix}.gate_proj": WeightSpec((i, h), "linear"),
            f"{prefix}.up_proj": WeightSpec((i, h), "linear"),
            f"{prefix}.down_proj": WeightSpec((h, i), "linear"),
        }
    e, i, s = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
    specs = {
        f"{prefix}.gate": WeightSpec((e, h), "linear"),
        f"{prefix}.experts.gate": WeightSpec((e, i, h), "experts"),
        f"{prefix}.experts.up": WeightSpec((e, i, h), "experts"),
        f"{prefix}.experts.down": WeightSpec((e, h, i), "experts"),
    }
    if s:
        specs.update({
            f"{prefix}.shared_expert.gate_proj": WeightSpec((s, h), "linear"),
            f"{prefix}.shared_expert.up_proj": WeightSpec((s, h), "linear"),
            f"{prefix}.shared_expert.down_proj": WeightSpec((h, s), "linear"),
            f"{prefix}.shared_expert_gate": WeightSpec((1, h), "tensor"),
        })
    return specs


def _layer_specs(c: ModelConfig, prefix: str, layer_type: str) -> dict[str, WeightSpec]:
    specs = {
        f"{prefix}.input_layernorm": WeightSpec((c.hidden_size,), "tensor"),
        f"{prefix}.post_attention_layernorm": WeightSpec((c.hidden_size,), "tensor"),
    }
    if layer_type == FULL_ATTENTION:
        specs.update(_attention_specs(c, f"{prefix}.self_attn"))
    else:
        specs.update(_deltanet_specs(c, f"{prefix}.linear_attn"))
    specs.update(_mlp_specs(c, f"{prefix}.mlp"))
    return specs


def weight_specs(c: ModelConfig) -> dict[str, WeightSpec]:
    """Every weight the main network needs, by canonical name."""
    specs = {
        "embed_tokens": WeightSpec((c.vocab_size, c.hidden_size), "embedding"),
        "norm": WeightSpec((c.hidden_size,), "tensor"),
        "lm_head": WeightSpec((c.vocab_size, c.hidden_size), "linear"),
    }
    for index, layer_type in enumerate(c.layer_types):
        specs.update(_layer_specs(c, f"layers.{index}", layer_type))
    return specs


def mtp_weight_specs(c: ModelConfig) -> dict[str, WeightSpec]:
    """The multi-token-prediction block's own weights (it shares embeddings and lm_head)."""
    h = c.hidden_size
    specs = {
        "mtp.fc": WeightSpec((h, 2 * h), "linear"),
        "mtp.pre_fc_norm_embedding": WeightSpec((h,), "tensor"),
        "mtp.pre_fc_norm_hidden": WeightSpec((h,), "tensor"),
        "mtp.norm": WeightSpec((h,), "tensor"),
    }
    for index in range(c.mtp_num_layers):
        specs.update(_layer_specs(c, f"mtp.layers.{index}", FULL_ATTENTION))
    return specs
