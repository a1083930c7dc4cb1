"""Speed: decode from bytes read per token, prefill from FLOPs; and where the layers go.

Decode reads, per token, every weight that takes part (routed experts only k of E),
the K/V of the context so far and the DeltaNet state (read and written). Time is
those bytes over bandwidth x efficiency plus a fixed cost per layer, which is what
makes small-active MoE models slower than their bytes say: many small kernels per
layer (router, top-k, gathers, the DeltaNet steps). Efficiency and per-layer costs
are calibrated per hardware class on the published llama.cpp points in
memory-and-speed.md (see SPEED_CLASSES). Prefill is FLOPs over peak x utilisation.

When a model does not fit in VRAM, llama.cpp keeps part of it in system RAM:
`-ngl N` puts the last N layers (and, at N = layers + 1, the output head) on the
GPU; `--n-cpu-moe N` keeps the routed experts of the first N layers on the CPU and
everything else on the GPU. `place` finds the split that fits and `decode` prices it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen35.errors import Qwen35Error
from qwen35.plan.catalog import TEXT, ModelSpec
from qwen35.plan.estimator import GiB, MemoryEstimate, cache_row_bytes, padded_context
from qwen35.plan.hardware import Hardware, usable_ram
from qwen35.plan.weights import Weights


@dataclass(frozen=True)
class SpeedClass:
    efficiency: float  # achieved / peak bandwidth on streaming weight reads
    layer_us: float  # fixed cost per layer per token (launches, syncs), dense layer
    moe_layer_us: float  # extra fixed cost per MoE layer (router, top-k, expert gathers)
    prefill_utilisation: float  # of peak FP16 FLOPS, dense; MoE gets half


# Calibrated on memory-and-speed.md's published points (Q4_K_M, tg at short context):
# 3090: 27B 32-34, 35B-A3B 111; 4090: 27B 48; 5090: 27B 50-72, 35B-A3B 165-223.
# Apple and CPU use the efficiencies seen in published llama.cpp runs (0.52, 0.6-0.7).
SPEED_CLASSES = {
    "ampere": SpeedClass(0.63, 54.0, 87.0, 0.5),
    "ada": SpeedClass(0.79, 15.0, 70.0, 0.35),
    "blackwell": SpeedClass(0.72, 50.0, 45.0, 0.35),
    "hopper": SpeedClass(0.70, 30.0, 60.0, 0.35),
    "apple": SpeedClass(0.52, 30.0, 150.0, 0.5),
    "cpu": SpeedClass(0.65, 30.0, 60.0, 0.5),
}
CPU_CLASS = SPEED_CLASSES["cpu"]


def headroom_bytes(fast_bytes: int) -> int:
    """Memory left free on purpose: fragmentation, the desktop, a browser."""
    return max(GiB // 2, fast_bytes // 20)


@dataclass(frozen=True)
class Placement:
    """Which weights live in fast memory. Layers not listed are read from system RAM."""

    mode: str  # "full" (all on the GPU), "unified" (CPU/Apple: one memory), "ngl" (dense layers split), "n-cpu-moe" (experts of the first N layers on CPU), "none"
    gpu_layers: int  # text layers whose non-expert weights are in fast memory
    cpu_moe_layers: int  # first N layers whose routed experts stay in RAM
    output_on_gpu: bool
    fast_bytes_used: int
    ram_bytes_used: int

    @property
    def whole(self) -> bool:
        """Everything in the fast memory (the GPU's, or the one memory of a CPU/Apple machine)."""
        return self.mode in ("full", "unified")

    @property
    def flag(self) -> str:
        if self.mode == "ngl":
            return f"-ngl {self.gpu_layers + (1 if self.output_on_gpu else 0)}"
        if self.mode == "n-cpu-moe":
            return f"-ngl 999 --n-cpu-moe {self.cpu_moe_layers}"
        if self.mode == "full":
            return "-ngl 999"
        return ""


def _layer_state_bytes(spec: ModelSpec, memory: MemoryEstimate, layer: int) -> int:
    """KV or recurrent state one layer holds for the request."""
    if spec.is_full_attention(layer):
        per_token = 2 * spec.n_head_kv * cache_row_bytes(memory.cache_type, spec.head_dim)
        return per_token * padded_context(memory.context) * memory.parallel
    n_linear = max(1, len(spec.linear_layers))
    return memory.recurrent_state_bytes // n_linear


def _fixed_gpu_bytes(memory: MemoryEstimate) -> int:
    """With experts or layers moved out, the GPU keeps: overhead, buffers, MTP/vision if loaded."""
    fixed = memory.compute_bytes + memory.logits_bytes + memory.overhead_bytes
    fixed += memory.mtp_bytes if memory.mtp_loaded else 0
    return fixed + (memory.vision_bytes if memory.vision_loaded else 0)


def place(spec: ModelSpec, weights: Weights, memory: MemoryEstimate, hardware: Hardware) -> Placement:
    """The split that fits: everything in fast memory if it can, else llama.cpp's offload flags."""
    budget = hardware.fast_bytes - headroom_bytes(hardware.fast_bytes)
    outside = weights.outside_layers(TEXT)
    # llama.cpp keeps the token embedding in system RAM on GPUs (it is only looked up).
    embedding = outside.get("token_embd.weight", 0) if hardware.kind == "gpu" else 0
    total = memory.total_bytes
    if total - embedding <= budget:
        # On a CPU or Apple machine there is nothing to offload: no flag to give.
        mode = "full" if hardware.kind == "gpu" else "unified"
        return Placement(mode, spec.n_layers, 0, True, total - embedding, embedding)
    if hardware.kind != "gpu" or not hardware.ram_bytes:
        return Placement("none", 0, 0, False, total, 0)
    ram_budget = usable_ram(hardware.ram_bytes)
    layer_bytes = weights.layer_bytes(TEXT)
    expert_bytes = weights.expert_layer_bytes(TEXT)
    fixed_gpu = _fixed_gpu_bytes(memory)
    if spec.is_moe:
        on_gpu = total - embedding
        moved = embedding
        for n in range(0, spec.n_layers + 1):
            if n:
                on_gpu -= expert_bytes.get(n - 1, 0)
                moved += expert_bytes.get(n - 1, 0)
            if on_gpu <= budget:
                if moved > ram_budget:
                    break
                return Placement("n-cpu-moe", spec.n_layers, n, True, on_gpu, moved)
    # Dense split (or MoE whose non-expert part alone is too big): last N layers on the GPU.
    output = sum(v for k, v in outside.items() if k != "token_embd.weight")
    per_layer = [layer_bytes.get(i, 0) + _layer_state_bytes(spec, memory, i) for i in range(spec.n_layers)]
    all_weights_and_state = sum(per_layer) + sum(outside.values())
    for n_gpu in range(spec.n_layers, -1, -1):
        gpu_layers = per_layer[spec.n_layers - n_gpu:] if n_gpu else []
        for with_output in (True, False) if n_gpu == spec.n_layers else (False,):
            used = fixed_gpu + sum(gpu_layers) + (output if with_output else 0)
            in_ram = all_weights_and_state - sum(gpu_layers) - (output if with_output else 0)
            if used <= budget and in_ram <= ram_budget:
                return Placement("ngl", n_gpu, 0, with_output, used, in_ram)
    return Placement("none", 0, 0, False, total, 0)


def placement_for_flags(spec: ModelSpec, weights: Weights, memory: MemoryEstimate, hardware: Hardware,
                        gpu_layers: int | None = None, cpu_moe_layers: int = 0) -> Placement:
    """The Placement that llama.cpp's flags force (as model/placement.py Split applies them), fit or not,
    with its memory counted as `place` counts it: `gpu_layers` is -ngl N (the last N layers on the
    GPU; N above the layer count, the output head too; None: everything), `cpu_moe_layers` is
    --n-cpu-moe N. For holding a measured split against the planner's estimate of the same split."""
    for name, value in (("gpu_layers", gpu_layers), ("cpu_moe_layers", cpu_moe_layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise Qwen35Error(f"{name} must be a whole number >= 0, got {value!r}")
    n_layers = spec.n_layers
    if gpu_layers is not None and gpu_layers > n_layers:
        gpu_layers = None  # every layer and the output head: the same as no -ngl
    n_cpu_moe = min(cpu_moe_layers, n_layers) if spec.is_moe else 0
    n_gpu = n_layers if gpu_layers is None else gpu_layers
    outside = weights.outside_layers(TEXT)
    embedding = outside.get("token_embd.weight", 0) if hardware.kind == "gpu" else 0
    experts = weights.expert_layer_bytes(TEXT)
    moved_experts = sum(experts.get(i, 0) for i in range(n_cpu_moe) if i >= n_layers - n_gpu)
    if gpu_layers is None:
        # place's --n-cpu-moe accounting: everything but the embedding and those experts on the GPU.
        on_gpu = memory.total_bytes - embedding - moved_experts
        whole = "full" if hardware.kind == "gpu" else "unified"
        return Placement("n-cpu-moe" if n_cpu_moe else whole, n_layers, n_cpu_moe, True,
                         on_gpu, embedding + moved_experts)
    # place's -ngl accounting: the GPU holds its layers' weights and state, and the fixed buffers.
    fixed_gpu = _fixed_gpu_bytes(memory)
    layer_bytes = weights.layer_bytes(TEXT)
    per_layer = [layer_bytes.get(i, 0) + _layer_state_bytes(spec, memory, i) for i in range(n_layers)]
    used = fixed_gpu + sum(per_layer[n_layers - n_gpu:]) - moved_experts
    in_ram = sum(per_layer) + sum(outside.values()) - used + fixed_gpu
    return Placement("ngl", n_gpu, n_cpu_moe, False, used, in_ram)


@dataclass(frozen=True)
class SpeedEstimate:
    decode_tok_s: float  # at an empty context, as llama-bench's tg
    decode_tok_s_at_context: float  # with the requested context already filled
    prefill_tok_s: float
    bytes_per_token: int  # at an empty context
    fast_bytes_per_token: int
    ram_bytes_per_token: int


def _per_token_reads(spec: ModelSpec, weights: Weights, placement: Placement):
    """Bytes read per decoded token from fast memory and from RAM (weights only)."""
    share = spec.n_experts_used / spec.n_experts if spec.is_moe else 1.0
    fast = ram = 0.0
    first_gpu_layer = spec.n_layers - placement.gpu_layers
    for t in weights.tensors:
        if t.part != TEXT:
            continue
        if t.name == "token_embd.weight":
            ram += t.nbytes / spec.vocab  # one row, from the CPU copy llama.cpp keeps
            continue
        read = t.nbytes * (share if t.is_expert else 1.0)
        if t.layer is None:
            on_gpu = placement.output_on_gpu
        elif t.is_expert and t.layer < placement.cpu_moe_layers:
            on_gpu = False
        else:
            on_gpu = t.layer >= first_gpu_layer
        if on_gpu:
            fast += read
        else:
            ram += read
    return fast, ram


def estimate_speed(
    spec: ModelSpec, weights: Weights, memory: MemoryEstimate, hardware: Hardware, placement: Placement
) -> SpeedEstimate | None:
    if placement.mode == "none":
        return None
    klass = SPEED_CLASSES[hardware.speed_class]
    fast_weights, ram_weights = _per_token_reads(spec, weights, placement)
    # A CPU-only machine's "fast memory" is its RAM.
    fast_bw = hardware.bandwidth_gbs * 1e9 * klass.efficiency
    ram_bw = hardware.cpu_bandwidth_gbs * 1e9 * CPU_CLASS.efficiency
    state_rw = 2 * memory.recurrent_state_bytes_per_sequence
    gpu_fraction = placement.gpu_layers / spec.n_layers if spec.n_layers else 1.0
    n_moe = spec.n_layers if spec.is_moe else 0
    fixed = (spec.n_layers * klass.layer_us + n_moe * klass.moe_layer_us) * 1e-6
    cpu_layers = max(spec.n_layers - placement.gpu_layers, placement.cpu_moe_layers)
    fixed += cpu_layers * CPU_CLASS.layer_us * 1e-6

    def seconds(depth: int) -> float:
        kv = memory.kv_bytes_per_token_cache * depth
        state_and_kv = state_rw + kv
        fast = fast_weights + state_and_kv * gpu_fraction
        ram = ram_weights + state_and_kv * (1 - gpu_fraction)
        return fast / fast_bw + ram / ram_bw + fixed

    # Prefill: 2 FLOPs per active weight per token, plus attention over half the prompt on average.
    active_params = _active_matmul_params(spec)
    attention = 4 * spec.n_head * spec.head_dim * len(spec.full_attention_layers) * (memory.context / 2)
    deltanet = 4 * spec.linear_v_heads * spec.linear_k_dim * spec.linear_v_dim * len(spec.linear_layers)
    flops_per_token = 2 * active_params + attention + deltanet
    utilisation = klass.prefill_utilisation * (0.5 if spec.is_moe else 1.0)
    prefill = hardware.tflops * 1e12 * utilisation / flops_per_token
    if not placement.whole:
        # Weights in RAM cross PCIe (about 25 GB/s) once per 512-token micro-batch.
        ram_weight_bytes = placement.ram_bytes_used
        prefill = 1 / (1 / prefill + ram_weight_bytes / 25e9 / 512)
    return SpeedEstimate(
        decode_tok_s=1 / seconds(0),
        decode_tok_s_at_context=1 / seconds(memory.context),
        prefill_tok_s=prefill,
        bytes_per_token=int(fast_weights + ram_weights + state_rw),
        fast_bytes_per_token=int(fast_weights),
        ram_bytes_per_token=int(ram_weights),
    )


def _active_matmul_params(spec: ModelSpec) -> float:
    from qwen35.plan.catalog import parameter_counts

    counts = parameter_counts(spec)
    return counts["active"] - spec.hidden * spec.vocab  # the embedding lookup is not a matmul


ASSUMPTIONS = (
    "decode time per token = bytes read / (bandwidth x efficiency) + layers x fixed cost per layer",
    "bytes read: all weights that take part (MoE: routed experts at top-k / E), K/V of the context, "
    "DeltaNet state read and written",
    "efficiency and per-layer cost per hardware class, calibrated on published llama.cpp points "
    "(RTX 3090/4090/5090, Q4_K_M); Apple 0.52 and CPU 0.65 efficiency from published runs",
    "prefill = peak FP16 TFLOPS x utilisation / FLOPs per token (2 x active params + attention); "
    "a rough guide, +-50%",
    "decode at an empty context unless said otherwise (as llama-bench's tg128)",
)
