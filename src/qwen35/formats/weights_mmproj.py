"""The vision tower's weights and settings, from an mmproj GGUF or from an HF checkpoint.

mmproj GGUF (llama.cpp's converter, projector type `qwen3vl_merger`, architecture
`clip`): the Conv3d patch embedding is split into its two temporal slices
`v.patch_embd.weight` and `v.patch_embd.weight.1` ([hidden, 3, 16, 16] each);
`v.position_embd.weight`, `v.blk.N.{ln1,ln2,attn_qkv,attn_out,ffn_up,ffn_down}`,
`v.post_ln` (the merger's LayerNorm), `mm.0` and `mm.2` (the merger's two linears).
No value is transformed otherwise. Metadata under `clip.vision.*`; the RoPE theta,
the temporal patch size and the processor's pixel limits are not stored and take
Qwen's values.

HF (`Qwen3_5*ForConditionalGeneration`): `model.visual.*` with the sizes in
config.json's `vision_config` and the processor settings in preprocessor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen35.chat.images import ImageSettings, settings_from_preprocessor_config
from qwen35.errors import FormatError
from qwen35.formats import weights_hf
from qwen35.kernels.dequant import check_supported, dequantize
from qwen35.kernels.quant_linear import QuantLinear
from qwen35.model.vision import VisionConfig, VisionTower, vision_weight_specs

PROJECTOR_TYPE = "qwen3vl_merger"
HF_PREFIX = "model.visual."
MAX_VISION_LAYERS = 1024
TENSORS_PER_LAYER = 12

# canonical name pattern -> (mmproj name, HF name after the prefix)
_BLOCK_NAMES = {
    "norm1": ("ln1", "norm1"),
    "norm2": ("ln2", "norm2"),
    "attn.qkv": ("attn_qkv", "attn.qkv"),
    "attn.proj": ("attn_out", "attn.proj"),
    "mlp.fc1": ("ffn_up", "mlp.linear_fc1"),
    "mlp.fc2": ("ffn_down", "mlp.linear_fc2"),
}
_TENSOR_NAMES = {
    "patch_embed.bias": ("v.patch_embd.bias", "patch_embed.proj.bias"),
    "pos_embed": ("v.position_embd.weight", "pos_embed.weight"),
}
_MODULE_NAMES = {
    "merger.norm": ("v.post_ln", "merger.norm"),
    "merger.fc1": ("mm.0", "merger.linear_fc1"),
    "merger.fc2": ("mm.2", "merger.linear_fc2"),
}
PATCH_EMBED_SLICES = ("v.patch_embd.weight", "v.patch_embd.weight.1")


def source_names(canonical: str) -> tuple[str, str]:
    """(mmproj name, HF name without prefix) of a canonical vision weight other than patch_embed."""
    if canonical in _TENSOR_NAMES:
        return _TENSOR_NAMES[canonical]
    base, suffix = canonical, ""
    for ending in (".weight", ".bias"):
        if canonical.endswith(ending):
            base, suffix = canonical[: -len(ending)], ending
    if base.startswith("blocks."):
        _, index, rest = base.split(".", 2)
        gguf_name, hf_name = _BLOCK_NAMES[rest]
        gguf_name, hf_name = f"v.blk.{index}.{gguf_name}", f"blocks.{index}.{hf_name}"
    else:
        gguf_name, hf_name = _MODULE_NAMES[base]
    suffix = suffix or ".weight"  # linear weights are named by their module
    return gguf_name + suffix, hf_name + suffix


# ------------------------------------------------------------------ GGUF


def vision_config_from_gguf(metadata: dict, tensors: dict, where: str) -> VisionConfig:
    if metadata.get("general.architecture") != "clip":
        raise FormatError(f"{where}: not a vision projector (general.architecture is "
                          f"{metadata.get('general.architecture')!r}, expected 'clip')")
    projector = metadata.get("clip.projector_type", metadata.get("clip.vision.projector_type"))
    if projector != PROJECTOR_TYPE:
        raise FormatError(f"{where}: projector type {projector!r} is not Qwen 3.5's ({PROJECTOR_TYPE!r})")
    if any(metadata.get("clip.vision.is_deepstack_layers") or []):
        raise FormatError(f"{where}: deepstack layers (Qwen3-VL) are not part of Qwen 3.5's vision tower")

    def value(key):
        if f"clip.vision.{key}" not in metadata:
            raise FormatError(f"{where}: metadata clip.vision.{key} is missing")
        return metadata[f"clip.vision.{key}"]

    position = tensors.get("v.position_embd.weight")
    if position is None:
        raise FormatError(f"{where}: tensor v.position_embd.weight is missing")
    try:
        layers = int(value("block_count"))
        if not 0 < layers <= MAX_VISION_LAYERS or layers * TENSORS_PER_LAYER > len(tensors):
            raise FormatError(f"{where}: {layers} vision layers cannot fit in {len(tensors)} tensors")
        return VisionConfig(
            hidden_size=int(value("embedding_length")),
            num_layers=layers,
            num_heads=int(value("attention.head_count")),
            intermediate_size=int(value("feed_forward_length")),
            out_hidden_size=int(value("projection_dim")),
            num_position_embeddings=int(position.torch_shape[0]),
            patch_size=int(value("patch_size")),
            merge_size=int(metadata.get("clip.vision.spatial_merge_size", 2)),
            layer_norm_eps=float(metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
        )
    except (TypeError, ValueError) as error:
        raise FormatError(f"{where}: bad vision metadata ({error})") from None


def image_settings_from_gguf(metadata: dict, config: VisionConfig, where: str) -> ImageSettings:
    try:
        mean = tuple(float(v) for v in metadata.get("clip.vision.image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in metadata.get("clip.vision.image_std", (0.5, 0.5, 0.5)))
        return ImageSettings(patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                             merge_size=config.merge_size, image_mean=mean, image_std=std)
    except (TypeError, ValueError) as error:
        raise FormatError(f"{where}: bad image mean/std ({error})") from None


def load_vision_gguf(path, device: torch.device | None = None):
    """(VisionTower, ImageSettings, the open GGUFModel keeping the memory map alive) from an mmproj file."""
    from qwen35.formats.gguf import GGUFModel

    path = Path(path)
    gguf = GGUFModel(path)
    try:
        config = vision_config_from_gguf(gguf.metadata, gguf.tensors, str(path))
        settings = image_settings_from_gguf(gguf.metadata, config, str(path))
        weights = {
            name: _gguf_weight(gguf, name, spec, config, str(path))
            for name, spec in vision_weight_specs(config).items()
        }
    except BaseException:
        gguf.close()
        raise
    return VisionTower(config, _on_device(weights, device)), settings, gguf


def _gguf_tensor(gguf, name: str, shape: tuple, where: str):
    info = gguf.tensors.get(name)
    if info is None:
        raise FormatError(f"{where}: tensor {name} is missing")
    try:
        check_supported(info.type_id)
    except FormatError as error:
        raise FormatError(f"{where}: tensor {name}: {error}") from None
    if tuple(info.torch_shape) != tuple(shape):
        raise FormatError(f"{where}: tensor {name} has shape {list(info.torch_shape)}, expected {list(shape)}")
    return gguf.tensor_data(name), info


def _gguf_weight(gguf, canonical: str, spec, config: VisionConfig, where: str):
    if canonical == "patch_embed":
        slice_shape = (config.hidden_size, config.in_channels, config.patch_size, config.patch_size)
        slices = []
        for name in PATCH_EMBED_SLICES:
            raw, info = _gguf_tensor(gguf, name, slice_shape, where)
            slices.append(dequantize(raw, info.type_id, slice_shape).float())
        # [hidden, C, T, p, p]: the Conv3d's own layout, which the processor's patches follow.
        return torch.stack(slices, dim=2).reshape(spec.shape).contiguous()
    name = source_names(canonical)[0]
    raw, info = _gguf_tensor(gguf, name, spec.shape, where)
    if spec.kind == "linear":
        return QuantLinear(raw, info.type_id, *spec.shape)
    return dequantize(raw, info.type_id, spec.shape).float().clone()


# ------------------------------------------------------------------ HF


def vision_config_from_hf(raw: dict, where: str) -> VisionConfig | None:
    """The vision tower's config from config.json, or None when it has no vision_config."""
    vision = raw.get("vision_config")
    if vision is None:
        return None
    if not isinstance(vision, dict):
        raise FormatError(f"{where}: vision_config is not an object")
    rope = vision.get("rope_parameters") or {}
    try:
        return VisionConfig(
            hidden_size=int(vision["hidden_size"]),
            num_layers=int(vision["depth"]),
            num_heads=int(vision["num_heads"]),
            intermediate_size=int(vision["intermediate_size"]),
            out_hidden_size=int(vision["out_hidden_size"]),
            num_position_embeddings=int(vision["num_position_embeddings"]),
            patch_size=int(vision.get("patch_size", 16)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            merge_size=int(vision.get("spatial_merge_size", 2)),
            in_channels=int(vision.get("in_channels", 3)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            hidden_act=str(vision.get("hidden_act", "gelu_pytorch_tanh")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: bad vision_config ({error!r})") from None


def image_settings_from_hf(path: Path, config: VisionConfig) -> ImageSettings:
    file = path / "preprocessor_config.json"
    if not file.exists():
        return ImageSettings(patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                             merge_size=config.merge_size)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{file}: not valid JSON ({error})") from None
    settings = settings_from_preprocessor_config(raw, str(file))
    if (settings.patch_size, settings.temporal_patch_size, settings.merge_size) != (
            config.patch_size, config.temporal_patch_size, config.merge_size):
        raise FormatError(f"{file}: patch, temporal or merge size disagrees with config.json's vision_config")
    return settings


def load_vision_hf(checkpoint: weights_hf.HFCheckpoint, matrix_dtype: torch.dtype | None,
                   device: torch.device | None = None):
    """(VisionTower, ImageSettings) from an HF checkpoint, or None when it holds no vision tower."""
    where = f"{checkpoint.path}/config.json"
    config = vision_config_from_hf(checkpoint.config, where)
    if config is None or not checkpoint.has(HF_PREFIX + "patch_embed.proj.weight"):
        return None
    settings = image_settings_from_hf(checkpoint.path, config)
    specs = vision_weight_specs(config)
    sources = {name: _hf_source(name, spec.shape, config) for name, spec in specs.items()}
    for source in sources.values():
        checkpoint.check(source)
    weights = {}
    for name, source in sources.items():
        if specs[name].kind == "linear":
            weights[name] = QuantLinear.from_dense(checkpoint.load(source, matrix_dtype))
        else:
            weights[name] = checkpoint.load(source, torch.float32)
    return VisionTower(config, _on_device(weights, device)), settings


def _hf_source(canonical: str, shape: tuple, config: VisionConfig) -> weights_hf.Source:
    if canonical == "patch_embed":
        conv_shape = (config.hidden_size, config.in_channels, config.temporal_patch_size,
                      config.patch_size, config.patch_size)
        return weights_hf.Source(HF_PREFIX + "patch_embed.proj.weight", conv_shape,
                                 lambda w: w.reshape(w.shape[0], -1))
    return weights_hf.Source(HF_PREFIX + source_names(canonical)[1], tuple(shape), None)


def _on_device(weights: dict, device: torch.device | None) -> dict:
    if device is None or device.type == "cpu":
        return weights
    return {name: w.to(device) for name, w in weights.items()}
