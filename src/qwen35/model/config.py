"""The architecture numbers of a Qwen 3.5 text model, read from an HF config or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass

from qwen35.errors import FormatError

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
DEFAULT_MROPE_SECTION = (11, 11, 10)
# Qwen's own generation_config for the released checkpoints (GGUF files carry none).
QWEN35_GENERATION_DEFAULTS = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
# The sampling settings a checkpoint's generation_config.json may set over them.
GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty")
# Every decoder layer has at least this many tensors: a layer count the file could not
# hold is forged, and is refused before any per-layer table is built.
MIN_TENSORS_PER_LAYER = 8


def generation_defaults(generation_config: dict | None = None) -> dict:
    """The sampling settings a model runs with unless flags or a request say otherwise: Qwen's own,
    under what an HF checkpoint's generation_config.json sets (a GGUF file gives none)."""
    return {**QWEN35_GENERATION_DEFAULTS,
            **{key: value for key, value in (generation_config or {}).items() if key in GENERATION_KEYS}}


def check_layer_count(num_layers: int, tensor_count: int, where: str) -> None:
    if num_layers <= 0 or num_layers * MIN_TENSORS_PER_LAYER > tensor_count:
        raise FormatError(f"{where}: {num_layers} layers cannot fit in {tensor_count} tensors")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "qwen35" (dense) or "qwen35moe"
    hidden_size: int
    num_layers: int  # decoder layers of the main model (the MTP block excluded)
    vocab_size: int  # rows of the (padded) embedding: the width of the logits
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel: int
    rope_theta: float
    rotary_dim: int  # leading dims of each head that rotate (partial RoPE)
    mrope_section: tuple[int, int, int]
    intermediate_size: int = 0  # dense FFN width (0 for MoE models)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    mtp_num_layers: int = 0
    max_position_embeddings: int = 262144
    eos_token_ids: tuple[int, ...] = ()
    # How the weights order DeltaNet value heads: "grouped" (HF: the heads of one key
    # head are adjacent) or "tiled" (llama.cpp's converter: key heads repeat across).
    value_head_order: str = "grouped"

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise FormatError(f"{len(self.layer_types)} layer types for {self.num_layers} layers")
        unknown = set(self.layer_types) - {LINEAR_ATTENTION, FULL_ATTENTION}
        if unknown:
            raise FormatError(f"unknown layer type(s) {sorted(unknown)}")
        checks = [
            (self.hidden_size > 0 and self.num_layers > 0 and self.vocab_size > 0, "sizes must be positive"),
            (self.num_key_value_heads > 0 and self.num_attention_heads > 0
             and self.num_attention_heads % self.num_key_value_heads == 0,
             "query heads must be a positive multiple of KV heads"),
            (self.linear_num_key_heads > 0 and self.linear_num_value_heads > 0
             and self.linear_num_value_heads % self.linear_num_key_heads == 0,
             "DeltaNet value heads must be a positive multiple of its key heads"),
            (self.head_dim > 0 and self.linear_key_head_dim > 0 and self.linear_value_head_dim > 0
             and self.linear_conv_kernel > 1, "head sizes must be positive"),
            (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "bad rotary dimension"),
            (self.value_head_order in ("grouped", "tiled"), "bad value head order"),
            (not self.is_moe or 0 < self.num_experts_per_tok <= self.num_experts, "bad expert counts"),
            (self.is_moe or self.intermediate_size > 0, "a dense model needs an FFN width"),
        ]
        for ok, message in checks:
            if not ok:
                raise FormatError(f"unsupported model configuration: {message}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim


def _required(source: dict, key: str, where: str):
    if key not in source or source[key] is None:
        raise FormatError(f"{where} has no {key}")
    return source[key]


def config_from_hf(raw: dict, generation_config: dict | None = None, tensor_count: int | None = None,
                   where: str = "config.json") -> ModelConfig:
    """From config.json (either the multimodal wrapper with `text_config` or a text-only config)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("text_config", {}), dict):
        raise FormatError(f"{where}: not a model configuration")
    try:
        return _config_from_hf(raw, generation_config, tensor_count, where)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as error:
        raise FormatError(f"{where}: bad or missing value ({error})") from None


def _config_from_hf(raw: dict, generation_config, tensor_count, where: str) -> ModelConfig:
    text = raw.get("text_config") or raw
    model_type = text.get("model_type", raw.get("model_type", ""))
    if not isinstance(model_type, str) or not model_type.startswith("qwen3_5"):
        raise FormatError(f"{where}: model_type {model_type!r} is not a Qwen 3.5 model")
    is_moe = "moe" in model_type
    num_layers = int(_required(text, "num_hidden_layers", where))
    if tensor_count is not None:
        check_layer_count(num_layers, tensor_count, where)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 10000000.0)))
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]
    eos = (generation_config or {}).get("eos_token_id", text.get("eos_token_id", raw.get("eos_token_id")))
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return ModelConfig(
        architecture="qwen35moe" if is_moe else "qwen35",
        hidden_size=int(_required(text, "hidden_size", where)),
        num_layers=num_layers,
        vocab_size=int(_required(text, "vocab_size", where)),
        layer_types=tuple(layer_types),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        num_attention_heads=int(_required(text, "num_attention_heads", where)),
        num_key_value_heads=int(_required(text, "num_key_value_heads", where)),
        head_dim=head_dim,
        linear_num_key_heads=int(_required(text, "linear_num_key_heads", where)),
        linear_num_value_heads=int(_required(text, "linear_num_value_heads", where)),
        linear_key_head_dim=int(_required(text, "linear_key_head_dim", where)),
        linear_value_head_dim=int(_required(text, "linear_value_head_dim", where)),
        linear_conv_kernel=int(text.get("linear_conv_kernel_dim", 4)),
        rope_theta=rope_theta,
        rotary_dim=int(head_dim * partial),
        mrope_section=tuple(rope.get("mrope_section") or DEFAULT_MROPE_SECTION)[:3],
        intermediate_size=0 if is_moe else int(_required(text, "intermediate_size", where)),
        num_experts=int(_required(text, "num_experts", where)) if is_moe else 0,
        num_experts_per_tok=int(_required(text, "num_experts_per_tok", where)) if is_moe else 0,
        moe_intermediate_size=int(_required(text, "moe_intermediate_size", where)) if is_moe else 0,
        shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size", 0)) if is_moe else 0,
        tie_word_embeddings=bool(tie),
        mtp_num_layers=int(text.get("mtp_num_hidden_layers", 0) or 0),
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
        eos_token_ids=_id_tuple(eos),
        value_head_order="grouped",
    )


def _id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def config_from_gguf(metadata: dict, tensors: dict, path: str = "GGUF") -> ModelConfig:
    """From GGUF metadata as llama.cpp's converter writes it; `tensors` gives the vocab and tying."""
    try:
        return _config_from_gguf(metadata, tensors, path)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AttributeError) as error:
        raise FormatError(f"{path}: bad metadata value ({error})") from None


def _config_from_gguf(metadata: dict, tensors: dict, path: str) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in ("qwen35", "qwen35moe"):
        raise FormatError(f"{path}: architecture {arch!r} is not supported (qwen35 and qwen35moe are)")

    def value(key, default=None):
        found = metadata.get(f"{arch}.{key}", default)
        if found is None:
            raise FormatError(f"{path}: metadata {arch}.{key} is missing")
        return found

    mtp_layers = int(value("nextn_predict_layers", 0))
    block_count = int(value("block_count"))
    num_layers = block_count - mtp_layers
    if num_layers <= 0:
        raise FormatError(f"{path}: block_count {block_count} leaves no layers besides {mtp_layers} MTP layers")
    check_layer_count(num_layers, len(tensors), path)
    recurrent = metadata.get(f"{arch}.attention.recurrent_layers")
    if recurrent is not None and len(recurrent) >= num_layers:
        layer_types = tuple(LINEAR_ATTENTION if bool(r) else FULL_ATTENTION for r in list(recurrent)[:num_layers])
    else:
        interval = int(value("full_attention_interval", 4))
        layer_types = tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers))
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise FormatError(f"{path}: tensor token_embd.weight is missing")
    n_k = int(value("ssm.group_count"))
    n_v = int(value("ssm.time_step_rank"))
    state_size = int(value("ssm.state_size"))
    is_moe = arch == "qwen35moe"
    sections = [int(s) for s in value("rope.dimension_sections", list(DEFAULT_MROPE_SECTION))][:3]
    # Chat models end a turn with the end-of-turn token; some files name it apart from eos.
    eos = [metadata[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in metadata]
    eos = list(dict.fromkeys(int(token) for token in eos))
    return ModelConfig(
        architecture=arch,
        hidden_size=int(value("embedding_length")),
        num_layers=num_layers,
        vocab_size=int(embedding.shape[1]) if len(embedding.shape) == 2 else 0,
        layer_types=layer_types,
        rms_norm_eps=float(value("attention.layer_norm_rms_epsilon", 1e-6)),
        num_attention_heads=int(value("attention.head_count")),
        num_key_value_heads=int(value("attention.head_count_kv")),
        head_dim=int(value("attention.key_length")),
        linear_num_key_heads=n_k,
        linear_num_value_heads=n_v,
        linear_key_head_dim=state_size,
        linear_value_head_dim=int(value("ssm.inner_size")) // n_v if n_v else 0,
        linear_conv_kernel=int(value("ssm.conv_kernel")),
        rope_theta=float(value("rope.freq_base")),
        rotary_dim=int(value("rope.dimension_count")),
        mrope_section=tuple(sections + [0] * (3 - len(sections))),
        intermediate_size=0 if is_moe else int(value("feed_forward_length")),
        num_experts=int(value("expert_count")) if is_moe else 0,
        num_experts_per_tok=int(value("expert_used_count")) if is_moe else 0,
        moe_intermediate_size=int(value("expert_feed_forward_length")) if is_moe else 0,
        shared_expert_intermediate_size=int(value("expert_shared_feed_forward_length", 0)) if is_moe else 0,
        tie_word_embeddings="output.weight" not in tensors,
        mtp_num_layers=mtp_layers,
        max_position_embeddings=int(value("context_length", 262144)),
        eos_token_ids=_id_tuple(eos),
        value_head_order="tiled",
    )
