"""Real files as plan input: GGUF headers, or an HF folder's config.json and safetensors headers.

Only headers are read (GGUF metadata and tensor infos through GGUFModel, the JSON
header of each .safetensors file), never the weights, so a 200 GB model is planned
in milliseconds. Every number a header gives is range-checked before it is used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qwen35.errors import FormatError
from qwen35.formats.gguf import GGUFModel, split_paths
from qwen35.plan.catalog import MTP, TEXT, VISION, ModelSpec, VisionSpec
from qwen35.plan.mixes import FILE_TYPE_NAMES
from qwen35.plan.weights import Weights, WeightTensor

QWEN35_ARCHS = ("qwen35", "qwen35moe")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights: Weights
    origin: str  # "gguf" or "hf"
    files: list[str]
    mix: str | None  # the file's own mix name, when it says


def _int(value, what: str, path: str, low: int = 1, high: int = 1 << 20) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (hasattr(value, "item") and value.size == 1):
        raise FormatError(f"{path}: {what} is missing or not a number ({value!r})")
    number = int(value)
    if not low <= number <= high:
        raise FormatError(f"{path}: {what} = {number} is out of range [{low}, {high}]")
    return number


# --- GGUF --------------------------------------------------------------------------------


def load_gguf(paths: list[str]) -> LoadedModel:
    """A model from its GGUF file(s): any shard of a split model, plus an optional mmproj."""
    models: list[GGUFModel] = []
    seen: set[str] = set()
    try:
        for path in paths:
            first = str(split_paths(path)[0].resolve()) if os.path.exists(path) else path
            if first in seen:
                continue  # another shard of a model already read
            seen.add(first)
            models.append(GGUFModel(path))
        text = [m for m in models if m.metadata.get("general.architecture") != "clip"]
        vision = [m for m in models if m.metadata.get("general.architecture") == "clip"]
        if not text:
            raise FormatError(
                f"{paths[0]} is a vision projector (mmproj) only: give it together with the model's GGUF"
            )
        if len(text) > 1 or len(vision) > 1:
            raise FormatError("give one model (all its shards are found from any one) and at most one mmproj")
        model = text[0]
        arch = model.architecture
        if arch not in QWEN35_ARCHS:
            raise FormatError(f"{model.path}: architecture {arch!r} is not Qwen 3.5 (qwen35 or qwen35moe)")
        spec = _spec_from_gguf(model, vision[0] if vision else None)
        tensors = []
        for info in model.tensors.values():
            layer = _block_index(info.name)
            part = MTP if layer is not None and layer >= spec.n_layers else TEXT
            tensors.append(WeightTensor(info.name, info.shape, info.type_name, info.nbytes, part, layer))
        if vision:
            for info in vision[0].tensors.values():
                tensors.append(WeightTensor(info.name, info.shape, info.type_name, info.nbytes, VISION, None))
        mix = FILE_TYPE_NAMES.get(model.metadata.get("general.file_type"))
        files = [f.path for m in models for f in m.files]
        return LoadedModel(spec, Weights(tensors), "gguf", files, mix)
    finally:
        for m in models:
            m.close()


def _block_index(name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _spec_from_gguf(model: GGUFModel, mmproj: GGUFModel | None) -> ModelSpec:
    path, arch = model.path, model.architecture

    def value(key: str, default=None, low: int = 1, high: int = 1 << 20):
        raw = model.metadata.get(f"{arch}.{key}", default)
        if raw is None:
            raise FormatError(f"{path}: metadata {arch}.{key} is missing")
        return _int(raw, f"{arch}.{key}", path, low, high)

    block_count = value("block_count", high=4096)
    mtp_layers = value("nextn_predict_layers", 0, low=0, high=16)
    n_layers = block_count - mtp_layers
    if n_layers < 1:
        raise FormatError(f"{path}: block_count {block_count} leaves no text layers after {mtp_layers} MTP layers")
    n_v = value("ssm.time_step_rank")
    inner = value("ssm.inner_size")
    if inner % n_v:
        raise FormatError(f"{path}: ssm.inner_size {inner} is not a multiple of ssm.time_step_rank {n_v}")
    recurrent = model.metadata.get(f"{arch}.attention.recurrent_layers")
    if recurrent is not None and len(recurrent) >= n_layers:
        flags = tuple(not bool(r) for r in list(recurrent)[:n_layers])
    else:
        flags = None
    embd = model.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise FormatError(f"{path}: no 2-D token_embd.weight tensor")
    moe = arch == "qwen35moe"
    head_count_kv = model.metadata.get(f"{arch}.attention.head_count_kv")
    if head_count_kv is not None and hasattr(head_count_kv, "__len__"):
        head_count_kv = max(int(x) for x in head_count_kv)  # per-layer arrays: the attention layers' value
    spec = ModelSpec(
        name=Path(path).stem,
        label=str(model.metadata.get("general.name") or Path(path).stem),
        hidden=value("embedding_length", high=1 << 17),
        n_layers=n_layers,
        ffn=0 if moe else value("feed_forward_length", high=1 << 20),
        n_head=value("attention.head_count", high=4096),
        n_head_kv=_int(head_count_kv, f"{arch}.attention.head_count_kv", path, 1, 4096),
        linear_k_heads=value("ssm.group_count", high=4096),
        linear_v_heads=n_v,
        tied_embeddings="output.weight" not in model.tensors,
        head_dim=value("attention.key_length", high=4096),
        linear_k_dim=value("ssm.state_size", high=4096),
        linear_v_dim=inner // n_v,
        conv_kernel=value("ssm.conv_kernel", high=64),
        full_attention_interval=value("full_attention_interval", 4, high=4096),
        vocab=int(embd.shape[1]),
        n_experts=value("expert_count", high=65536) if moe else 0,
        n_experts_used=value("expert_used_count", high=65536) if moe else 0,
        expert_ffn=value("expert_feed_forward_length", high=1 << 20) if moe else 0,
        shared_ffn=value("expert_shared_feed_forward_length", 0, low=0, high=1 << 20) if moe else 0,
        mtp_layers=mtp_layers,
        vision=_vision_from_mmproj(mmproj) if mmproj else None,
        native_context=value("context_length", 262144, high=1 << 24),
        full_attention_flags=flags,
    )
    if spec.n_head % spec.n_head_kv:
        raise FormatError(f"{path}: head_count {spec.n_head} is not a multiple of head_count_kv {spec.n_head_kv}")
    if moe and not 0 < spec.n_experts_used <= spec.n_experts:
        raise FormatError(f"{path}: expert_used_count {spec.n_experts_used} of {spec.n_experts} experts")
    return spec


def _vision_from_mmproj(mmproj: GGUFModel) -> VisionSpec:
    meta, path = mmproj.metadata, mmproj.path
    position = mmproj.tensors.get("v.position_embd.weight")
    return VisionSpec(
        num_position_embeddings=position.shape[-1] if position is not None else 2304,
        depth=_int(meta.get("clip.vision.block_count"), "clip.vision.block_count", path, 1, 1024),
        hidden=_int(meta.get("clip.vision.embedding_length"), "clip.vision.embedding_length", path, 1, 1 << 16),
        ffn=_int(meta.get("clip.vision.feed_forward_length"), "clip.vision.feed_forward_length", path, 1, 1 << 18),
        heads=_int(meta.get("clip.vision.attention.head_count"), "clip.vision.attention.head_count", path, 1, 1024),
    )


# --- HF folder ---------------------------------------------------------------------------


def load_hf(folder: str) -> LoadedModel:
    """A model from an HF folder: config.json for the shape, safetensors headers for the bytes."""
    root = Path(folder)
    config_path = root / "config.json"
    if not root.is_dir():
        raise FormatError(f"{folder} is not a folder (--hf wants an HF checkpoint folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{folder}: no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{config_path}: unreadable config ({error})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{config_path}: not a JSON object")
    spec = spec_from_hf_config(config, str(config_path))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no .safetensors files")
    tensors = []
    for file in files:
        for name, dtype, shape, nbytes in read_safetensors_header(file):
            tensors.append(_hf_tensor(name, dtype, shape, nbytes, spec))
    return LoadedModel(spec, Weights(tensors), "hf", [str(f) for f in files], None)


def _hf_tensor(name: str, dtype: str, shape, nbytes: int, spec: ModelSpec) -> WeightTensor:
    layer_match = re.search(r"layers\.(\d+)\.", name)
    layer = int(layer_match.group(1)) if layer_match else None
    if name.startswith("mtp."):
        part = MTP
        layer = spec.n_layers + (layer or 0) if layer_match else None
    elif ".visual." in name or name.startswith("visual.") or "vision_tower" in name:
        part, layer = VISION, None
    else:
        part = TEXT
    return WeightTensor(name, tuple(reversed(shape)), dtype, nbytes, part, layer)


def read_safetensors_header(path: Path):
    """(name, dtype, shape, nbytes) of each tensor, from the header alone, bounds-checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
            length = int.from_bytes(head, "little")
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise FormatError(f"{path}: not a safetensors file (header length {length} for {size} bytes)")
            raw = f.read(length)
    except OSError as error:
        raise FormatError(f"cannot read {path}: {error.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - length
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            itemsize = SAFETENSORS_DTYPE_BYTES[dtype]
            count = 1
            for dim in shape:
                if not isinstance(dim, int) or dim < 0:
                    raise ValueError
                count *= dim
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name}: bad header entry") from None
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end <= data_size \
                or end - start != count * itemsize:
            raise FormatError(f"{path}: tensor {name}: data offsets do not match its shape or the file")
        out.append((name, dtype, tuple(shape), end - start))
    return out


def spec_from_hf_config(config: dict, path: str = "config.json") -> ModelSpec:
    """A ModelSpec from a Qwen3_5ForConditionalGeneration (text_config + vision_config) or *ForCausalLM config."""
    text = config.get("text_config", config)
    if not isinstance(text, dict):
        raise FormatError(f"{path}: text_config is not an object")
    model_type = str(text.get("model_type", config.get("model_type", "")))
    if not model_type.startswith("qwen3_5"):
        raise FormatError(f"{path}: model_type {model_type!r} is not Qwen 3.5 (qwen3_5, qwen3_5_moe)")

    def get(key: str, default=None, low: int = 1, high: int = 1 << 20) -> int:
        raw = text.get(key, default)
        if raw is None:
            raise FormatError(f"{path}: {key} is missing")
        return _int(raw, key, path, low, high)

    n_layers = get("num_hidden_layers", high=4096)
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        flags = tuple(kind == "full_attention" for kind in layer_types)
    else:
        flags = None
    n_experts = get("num_experts", 0, low=0, high=65536)
    vision_config = config.get("vision_config")
    vision = None
    if isinstance(vision_config, dict):
        vision = VisionSpec(
            depth=_int(vision_config.get("depth"), "vision_config.depth", path, 1, 1024),
            hidden=_int(vision_config.get("hidden_size"), "vision_config.hidden_size", path, 1, 1 << 16),
            ffn=_int(vision_config.get("intermediate_size"), "vision_config.intermediate_size", path, 1, 1 << 18),
            heads=_int(vision_config.get("num_heads"), "vision_config.num_heads", path, 1, 1024),
            patch_size=_int(vision_config.get("patch_size", 16), "vision_config.patch_size", path, 1, 1024),
            spatial_merge_size=_int(vision_config.get("spatial_merge_size", 2), "spatial_merge_size", path, 1, 64),
            num_position_embeddings=_int(vision_config.get("num_position_embeddings", 2304),
                                         "num_position_embeddings", path, 1, 1 << 20),
        )
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return ModelSpec(
        name=Path(path).parent.name or "hf",
        label=Path(path).parent.name or "hf model",
        hidden=get("hidden_size", high=1 << 17),
        n_layers=n_layers,
        ffn=0 if n_experts else get("intermediate_size"),
        n_head=get("num_attention_heads", high=4096),
        n_head_kv=get("num_key_value_heads", high=4096),
        linear_k_heads=get("linear_num_key_heads", high=4096),
        linear_v_heads=get("linear_num_value_heads", high=4096),
        tied_embeddings=bool(tied),
        head_dim=get("head_dim", 256, high=4096),
        linear_k_dim=get("linear_key_head_dim", 128, high=4096),
        linear_v_dim=get("linear_value_head_dim", 128, high=4096),
        conv_kernel=get("linear_conv_kernel_dim", 4, high=64),
        full_attention_interval=get("full_attention_interval", 4, high=4096),
        vocab=get("vocab_size", high=1 << 22),
        n_experts=n_experts,
        n_experts_used=get("num_experts_per_tok", 0, low=0, high=65536) if n_experts else 0,
        expert_ffn=get("moe_intermediate_size", 0, low=0) if n_experts else 0,
        shared_ffn=get("shared_expert_intermediate_size", 0, low=0) if n_experts else 0,
        mtp_layers=get("mtp_num_hidden_layers", 1, low=0, high=16),
        vision=vision,
        native_context=get("max_position_embeddings", 262144, high=1 << 24),
        full_attention_flags=flags,
    )
