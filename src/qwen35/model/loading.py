"""load_model: a GGUF file (or the first shard of a split one) or an HF directory -> Model.

Every weight the network needs (`weight_specs`) is looked up through the source
format's declared name map (formats/weights_gguf.py, formats/weights_hf.py), and
its presence, type and shape are checked against the config before any tensor
data is touched. GGUF weights stay in their block format, as views of the memory
map; only small vectors (norms, conv, decay) are dequantized at load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen35.cache_options import check_cache_types
from qwen35.errors import FormatError
from qwen35.formats import weights_gguf, weights_hf, weights_mmproj
from qwen35.kernels.dequant import check_supported, dequantize
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear, set_mode
from qwen35.model.api import Model
from qwen35.model.config import config_from_gguf, config_from_hf, generation_defaults
from qwen35.model.placement import Split
from qwen35.model.qwen35 import Qwen35Network
from qwen35.model.weight_specs import WeightSpec, mtp_weight_specs, weight_specs

PRECISIONS = ("reference", "fast")
MAX_EXPERTS = 1 << 16
IMAGE_PAD = "<|image_pad|>"


def load_model(path, device="cpu", precision: str = "fast", mmproj=None, progress=None,
               gpu_layers: int | None = None, cpu_moe_layers: int = 0, cache_type_k: str | None = None,
               cache_type_v: str | None = None) -> Model:
    """`mmproj`: a vision projector GGUF that gives the model image input (an HF
    checkpoint with a vision tower has it already). `progress(done, total)` is called
    with weight bytes as the layers are made ready (the fast kernels' packing is the
    long part of a load).

    On a GPU `device`, the model splits as llama.cpp's flags split it (model/placement.py):
    `gpu_layers` (-ngl) keeps only the last N layers on the GPU (N > layers: the output head
    too), `cpu_moe_layers` (--n-cpu-moe) keeps the routed experts of the first N layers in
    system RAM. By default everything goes to `device`.

    `cache_type_k`/`cache_type_v` (-ctk/-ctv, cache_options.py): how the full-attention layers keep
    K and V (f32, f16, bf16, q8_0, q4_0, ...); None keeps them as before (float32 on the CPU)."""
    if precision not in PRECISIONS:
        raise FormatError(f"unknown precision {precision!r} (choose reference or fast)")
    path = Path(path)
    device = torch.device(device)
    cache_types = check_cache_types(cache_type_k, cache_type_v)
    split = Split(device, gpu_layers, cpu_moe_layers)
    if path.is_dir():
        model = _load_hf(path, precision, split, vision=mmproj is None, progress=progress)
    elif path.suffix == ".gguf" or path.is_file():
        model = _load_gguf(path, precision, split, progress=progress)
    else:
        raise FormatError(f"no such model file or directory: {path}")
    if mmproj is not None:
        tower, settings, source = weights_mmproj.load_vision_gguf(mmproj, model.device)
        _attach_vision(model, tower, settings, precision, source)
    model.cache_type_k, model.cache_type_v = cache_types
    return model


def _attach_vision(model: Model, tower, settings, precision: str, source=None) -> None:
    if tower.config.out_hidden_size != model.config.hidden_size:
        raise FormatError(f"the vision tower outputs width {tower.config.out_hidden_size}, "
                          f"the text model's hidden size is {model.config.hidden_size}: they do not belong together")
    set_mode(tower, "reference" if precision == "reference" else "fast")
    model.vision, model.image_settings, model._vision_source = tower, settings, source


def _set_mode_releasing_file_pages(network, mode: str, source, progress=None) -> None:
    """set_mode, one weight at a time: where the fast kernels copy a weight into their own
    layout, the file map's pages under it are dropped right away (they are not read again,
    embedding rows fault back in), so memory peaks at about one copy of the weights."""
    from qwen35.kernels import fast_cpu

    release = getattr(source, "release_tensor_pages", None)
    # The MTP layer's weights are made ready when speculative decoding first uses them (model/mtp.py):
    # until then they are views of the file, and take no memory (the planner counts them apart, too).
    mtp = {id(m) for m in network.mtp_weights.values()}
    modules = [m for m in network.modules() if isinstance(m, (QuantLinear, QuantExperts)) and id(m) not in mtp]
    total, done = sum(m.blocks.nbytes for m in modules), 0
    packed = sum(fast_cpu.packed_nbytes(m.type_id, _shape(m)) for m in modules
                 if m.device_type == "cpu") if mode == "fast" else 0
    with fast_cpu.packing_arena(packed):
        for module in modules:
            module.mode = mode
            if release is not None and module.fast_weights is not None:
                release(module.blocks)
            done += module.blocks.nbytes
            if progress is not None:
                progress(done, total)


def _shape(module) -> tuple[int, ...]:
    if isinstance(module, QuantExperts):
        return (module.n_experts, module.out_features, module.in_features)
    return (module.out_features, module.in_features)


def _check_expert_count(config, path) -> None:
    # Per-expert name tables are built from this number before any tensor is checked.
    if config.num_experts > MAX_EXPERTS:
        raise FormatError(f"{path}: {config.num_experts} experts is more than this loader accepts ({MAX_EXPERTS})")


def _build(config, weights: dict, mtp: dict, precision: str, split: Split, generation_defaults, source,
           progress=None):
    # Moving weights to a GPU reads the file once; its pages are dropped behind (not read again).
    weights, mtp = split.place(config, weights, mtp, release=getattr(source, "release_tensor_pages", None),
                               progress=progress)
    network = Qwen35Network(config, weights, mtp)
    if precision == "fast":
        # Registers the kernels of each device used (the C++ ones are built once, then cached);
        # without them "fast" keeps the reference path, which is exact but slow.
        if "cpu" in split.device_types(config):
            from qwen35.kernels import fast_cpu

            fast_cpu.install()
        if "cuda" in split.device_types(config):
            from qwen35.kernels import fast_cuda

            fast_cuda.install()
    # (The progress shown is the move to the GPU, or the CPU kernels' packing where the CPU holds layers.)
    packing_progress = progress if "cpu" in split.device_types(config) else None
    _set_mode_releasing_file_pages(network, "reference" if precision == "reference" else "fast", source,
                                   packing_progress)
    if precision == "fast":
        network.fuse_for_gpu()
    model = Model(network, config, generation_defaults, precision, source=source)
    model.device = network.input_device
    return model


# ------------------------------------------------------------------ GGUF


def _load_gguf(path: Path, precision: str, split: Split, progress=None) -> Model:
    from qwen35.formats.gguf import GGUFModel

    gguf = GGUFModel(path)
    try:
        config = config_from_gguf(gguf.metadata, gguf.tensors, str(path))
        _check_expert_count(config, path)
        names = set(gguf.tensors)
        weights = _gguf_weights(gguf, config, weight_specs(config), names, str(path))
        mtp_specs = mtp_weight_specs(config)
        mtp_present = any(
            weights_gguf.source_for(name, spec.shape, config, names).name in names for name, spec in mtp_specs.items()
        )
        mtp = _gguf_weights(gguf, config, mtp_specs, names, str(path)) if mtp_present else {}
    except BaseException:
        gguf.close()
        raise
    model = _build(config, weights, mtp, precision, split, generation_defaults(), gguf, progress)
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and IMAGE_PAD in tokens:
        model.image_token_id = tokens.index(IMAGE_PAD)
    return model


def _gguf_weights(gguf, config, specs: dict[str, WeightSpec], names, path: str) -> dict:
    sources = {}
    for canonical, spec in specs.items():
        source = weights_gguf.source_for(canonical, spec.shape, config, names)
        info = gguf.tensors.get(source.name)
        if info is None:
            raise FormatError(f"{path}: tensor {source.name} is missing")
        try:
            check_supported(info.type_id)
        except FormatError as error:
            raise FormatError(f"{path}: tensor {source.name}: {error}") from None
        if info.torch_shape != source.shape:
            raise FormatError(
                f"{path}: tensor {source.name} has shape {list(info.torch_shape)}, expected {list(source.shape)}"
            )
        sources[canonical] = (source, info, spec)

    built: dict[str, object] = {}
    by_source: dict[str, object] = {}
    for canonical, (source, info, spec) in sources.items():
        raw = gguf.tensor_data(source.name)
        if spec.kind in ("linear", "embedding"):
            # A tied output and embedding share one module (and one set of bytes).
            if source.name not in by_source:
                by_source[source.name] = QuantLinear(raw, info.type_id, *spec.shape)
            built[canonical] = by_source[source.name]
        elif spec.kind == "experts":
            if source.rows is not None:
                start, stop = source.rows
                raw = _rows_of(raw, info, start, stop)
            built[canonical] = QuantExperts(raw, info.type_id, *spec.shape)
        else:
            tensor = dequantize(raw, info.type_id, source.shape).clone()
            built[canonical] = tensor.reshape(spec.shape)
    return built


def _rows_of(raw, info, start: int, stop: int):
    """Rows [start, stop) of each expert of a fused [E, rows, width] block tensor (a copy of those bytes)."""
    experts, rows, _ = info.torch_shape
    return raw.reshape(experts, rows, -1)[:, start:stop].copy()


# ------------------------------------------------------------------ HF


def _load_hf(path: Path, precision: str, split: Split, vision: bool = True, progress=None) -> Model:
    checkpoint = weights_hf.HFCheckpoint(path)
    config = config_from_hf(
        checkpoint.config, checkpoint.generation_config, len(checkpoint.names()), f"{path}/config.json"
    )
    _check_expert_count(config, path)
    # Reference precision holds fp32 copies (bf16/f16 -> fp32 is exact); fast keeps the
    # checkpoint's dtype, half the memory, with the same values reaching the fp32 arithmetic.
    matrix_dtype = torch.float32 if precision == "reference" else None
    weights = _hf_weights(checkpoint, config, weight_specs(config), matrix_dtype)
    mtp_specs = mtp_weight_specs(config)
    mtp_present = any(name.startswith("mtp.") for name in checkpoint.names())
    mtp = _hf_weights(checkpoint, config, mtp_specs, matrix_dtype) if mtp_present and mtp_specs else {}
    defaults = generation_defaults(checkpoint.generation_config)
    model = _build(config, weights, mtp, precision, split, defaults, checkpoint, progress)
    image_token_id = checkpoint.config.get("image_token_id")
    if isinstance(image_token_id, int) and 0 <= image_token_id < config.vocab_size:
        model.image_token_id = image_token_id
    loaded = weights_mmproj.load_vision_hf(checkpoint, matrix_dtype, model.device) if vision else None
    if loaded is not None:
        _attach_vision(model, *loaded, precision)
    return model


def _hf_weights(checkpoint, config, specs: dict[str, WeightSpec], matrix_dtype: torch.dtype | None) -> dict:
    sources = {}
    for canonical, spec in specs.items():
        source = weights_hf.source_for(
            canonical, spec.shape, checkpoint.prefix, config.tie_word_embeddings, has=checkpoint.has
        )
        checkpoint.check(source)
        sources[canonical] = source

    built: dict[str, object] = {}
    by_source: dict[tuple, object] = {}
    for canonical, source in sources.items():
        spec = specs[canonical]
        tensor = checkpoint.load(source, torch.float32 if spec.kind == "tensor" else matrix_dtype)
        if spec.kind in ("linear", "embedding"):
            if source.name not in by_source:
                by_source[source.name] = QuantLinear.from_dense(tensor)
            built[canonical] = by_source[source.name]
        elif spec.kind == "experts":
            built[canonical] = QuantExperts.from_dense(tensor)
        else:
            built[canonical] = tensor
    return built
