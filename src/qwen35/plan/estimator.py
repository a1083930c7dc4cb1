"""Memory, part by part: weights, KV cache, DeltaNet state, compute buffers, overhead.

Only the full-attention layers (one in four, plus the MTP layer when it is loaded)
keep K/V; the Gated DeltaNet layers keep a fixed state per sequence whatever the
context. Sizes follow llama.cpp's allocations: the KV cache is padded to 256 cells,
the recurrent conv and SSM states are F32, and the compute buffer holds the logits
of a whole micro-batch (n_vocab x n_ubatch x 4 bytes, large with a 248K vocabulary).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.errors import Qwen35Error
from qwen35.plan.catalog import MTP, TEXT, VISION, ModelSpec
from qwen35.plan.weights import Weights

GiB = 1024**3
MiB = 1024**2

CACHE_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0",
               "q5_1": "Q5_1", "f32": "F32"}
KV_PAD = 256  # llama.cpp rounds the KV cache size up to this many cells
MAX_CONTEXT = 1 << 20  # YaRN stretches the native 262,144 to about 1M; beyond is not a context
MAX_PARALLEL = 4096
VISION_PATCHES = 4096  # one 1024x1024 image, in 16-px patches
RUNTIME_OVERHEAD = {"cuda": 512 * MiB, "metal": 256 * MiB, "cpu": 256 * MiB}


@dataclass(frozen=True)
class Request:
    """What the person wants to run: context per sequence, slots, cache type, optional parts."""

    ctx: int = 32768
    parallel: int = 1
    cache_type: str = "f16"
    load_mtp: bool = False
    load_vision: bool = False
    n_ubatch: int = 512
    backend: str = "cuda"

    def validate(self, native_context: int | None = None) -> None:
        if self.ctx <= 0:
            raise Qwen35Error(f"context must be a positive number of tokens, not {self.ctx}")
        if self.ctx > MAX_CONTEXT:
            raise Qwen35Error(
                f"context {self.ctx:,} is beyond what Qwen 3.5 can attend to "
                f"({native_context or 262144:,} native, about 1M with YaRN): ask for {MAX_CONTEXT:,} or less"
            )
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise Qwen35Error(f"parallel sequences must be between 1 and {MAX_PARALLEL}, not {self.parallel}")
        if self.cache_type not in CACHE_TYPES:
            raise Qwen35Error(f"unknown cache type {self.cache_type!r}: use one of {', '.join(CACHE_TYPES)}")
        if not 1 <= self.n_ubatch <= 65536:
            raise Qwen35Error(f"micro-batch must be between 1 and 65536 tokens, not {self.n_ubatch}")


def cache_row_bytes(cache_type: str, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[CACHE_TYPES[cache_type]]]
    return -(-n_elements // block) * size


def kv_bytes_per_token(spec: ModelSpec, cache_type: str = "f16", with_mtp: bool = False) -> int:
    """K and V of every full-attention layer for one token (the MTP layer keeps its own)."""
    layers = len(spec.full_attention_layers) + (spec.mtp_layers if with_mtp else 0)
    return layers * 2 * spec.n_head_kv * cache_row_bytes(cache_type, spec.head_dim)


def recurrent_state_bytes(spec: ModelSpec, conv_bytes: int = 4, ssm_bytes: int = 4) -> int:
    """One sequence's DeltaNet state: conv columns (kernel-1) and the [n_v, d_k, d_v] matrix per layer.

    llama.cpp keeps both in F32 (the defaults); transformers keeps the conv state in the
    model dtype (conv_bytes=2) and the recurrent state in F32.
    """
    conv = spec.conv_dim * (spec.conv_kernel - 1) * conv_bytes
    ssm = spec.linear_v_heads * spec.linear_k_dim * spec.linear_v_dim * ssm_bytes
    return len(spec.linear_layers) * (conv + ssm)


def padded_context(ctx: int) -> int:
    return -(-ctx // KV_PAD) * KV_PAD


def compute_buffer_bytes(spec: ModelSpec, n_ubatch: int) -> int:
    """The largest intermediates of one micro-batch, apart from the logits."""
    widest = max(
        2 * spec.ffn,
        2 * spec.n_experts_used * spec.expert_ffn + 2 * spec.shared_ffn,
        2 * spec.n_head * spec.head_dim + 2 * spec.n_head_kv * spec.head_dim,
        spec.conv_dim + 2 * spec.linear_v_heads * spec.linear_v_dim,
    )
    activations = n_ubatch * 4 * (4 * spec.hidden + 2 * widest)
    # Chunked delta rule: per chunk of 64 and value head, a 64x64 decay/attention block and the state.
    chunks = -(-n_ubatch // 64)
    deltanet = chunks * spec.linear_v_heads * (64 * 64 + 3 * 64 * spec.linear_v_dim) * 4
    return activations + deltanet


def logits_bytes(spec: ModelSpec, n_ubatch: int) -> int:
    return spec.vocab * n_ubatch * 4


def vision_compute_bytes(spec: ModelSpec) -> int:
    if spec.vision is None:
        return 0
    v = spec.vision
    return VISION_PATCHES * 4 * (6 * v.hidden + 2 * v.ffn)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int  # the text model as loaded by default: no MTP layer, no vision tower
    mtp_bytes: int  # the MTP layer (in the file; in memory only when loaded)
    vision_bytes: int  # the vision projector (mmproj), counted in total_bytes only when loaded
    kv_cache_bytes: int
    recurrent_state_bytes: int
    compute_bytes: int
    logits_bytes: int
    overhead_bytes: int
    total_bytes: int
    kv_bytes_per_token: int  # at the default 16-bit cache, text layers
    kv_bytes_per_token_cache: int  # at the requested cache type (and with MTP when loaded)
    recurrent_state_bytes_per_sequence: int
    context: int
    parallel: int
    cache_type: str
    mtp_loaded: bool
    vision_loaded: bool

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_memory(spec: ModelSpec, weights: Weights, request: Request) -> MemoryEstimate:
    request.validate(spec.native_context)
    weights_bytes = weights.bytes(TEXT)
    mtp_bytes = weights.bytes(MTP)
    vision_bytes = weights.bytes(VISION)
    per_token = kv_bytes_per_token(spec, request.cache_type, with_mtp=request.load_mtp)
    kv = per_token * padded_context(request.ctx) * request.parallel
    state_one = recurrent_state_bytes(spec)
    state = state_one * request.parallel
    compute = compute_buffer_bytes(spec, request.n_ubatch)
    logits = logits_bytes(spec, request.n_ubatch)
    overhead = RUNTIME_OVERHEAD.get(request.backend, RUNTIME_OVERHEAD["cuda"])
    if request.load_vision:
        compute += vision_compute_bytes(spec)
    total = (
        weights_bytes
        + (mtp_bytes if request.load_mtp else 0)
        + (vision_bytes if request.load_vision else 0)
        + kv + state + compute + logits + overhead
    )
    return MemoryEstimate(
        weights_bytes=weights_bytes,
        mtp_bytes=mtp_bytes,
        vision_bytes=vision_bytes,
        kv_cache_bytes=kv,
        recurrent_state_bytes=state,
        compute_bytes=compute,
        logits_bytes=logits,
        overhead_bytes=overhead,
        total_bytes=total,
        kv_bytes_per_token=kv_bytes_per_token(spec, "f16"),
        kv_bytes_per_token_cache=per_token,
        recurrent_state_bytes_per_sequence=state_one,
        context=request.ctx,
        parallel=request.parallel,
        cache_type=request.cache_type,
        mtp_loaded=request.load_mtp,
        vision_loaded=request.load_vision,
    )
