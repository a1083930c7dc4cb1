"""Fast CPU matmuls straight from GGUF blocks (AVX-512 VNNI / BF16).

Types: every quantized type of dequant.SUPPORTED_TYPES (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q2_K..Q6_K, IQ4_NL, IQ4_XS) and float weights: F16/BF16 (HF checkpoints) and F32 (a GGUF's
MoE router, HF float32 checkpoints).

Two kernels, both for any number of rows, both with x quantized to int8 per row (one
scale per weight block: 256 values for K-quants and IQ4_XS, 32 for the 32-value types) as
llama.cpp does, and the dot products as uint8 x int8 -> int32 (vpdpbusd). Error: that of
8-bit activations, like llama.cpp's own CPU path.
- Q4_K, Q6_K and Q8_0 weights (every tensor of the common Q4_K_M, Q6_K and Q8_0 files)
  are repacked once, when a layer enters "fast" mode (`pack`), into groups of 16 rows
  whose quants interleave (csrc/ggml_packed.cpp): one vpdpbusd then serves 16 rows, and
  one unpacked register serves up to four rows of x, which makes prefill a real int8 GEMM.
  Same bytes as the file, near enough (Q4_K +2.8%); the loader then releases the file's
  pages, so memory stays about one copy of the weights.
- Other types read the file's blocks directly (`gemv`, csrc/ggml_gemv.cpp); float
  weights are widened to fp32 and multiplied with x in fp32 (reference precision, other
  summation order). F32 weights take it too instead of torch's fp32 matmul: a decode row
  then streams the weight at full bandwidth (torch's matrix-vector product read a cold MoE
  router at a third of it) and rows stay batch-invariant.
Both are batch-invariant: a row's result is bit-identical whatever else shares its call
(other requests, other chunk sizes), since every (row of x, row of W) pair goes through
the same operations in the same order. MoE calls (`expert_matmul`) group slots by
expert in C++, again with each slot's result equal to a single-row call.

`tiled_bf16_matmul` (weights dequantized to bf16 tiles, bf16 matmul) is no longer used
by `matmul`; it stays as a measured alternative for the benchmarks.

The kernels live in csrc/: ggml_pack.cpp (the packing; its layout in packed_format.h),
ggml_packed.cpp (the packed GEMM, whose calls other kernels build through packed_call.h),
ggml_gemv.cpp (the row-major gemv), ggml_dequant.cpp, mlp_cpu.cpp (a dense MLP or an MoE
block after its router in one call), the DeltaNet steps in delta_rule_cpu.cpp,
delta_rule_chunked_cpu.cpp and deltanet_cpu.cpp, a whole DeltaNet decode step in
deltanet_decode.cpp, an attention decode step in attention_decode.cpp (K/V as floats or as
Q8_0/Q4_0 blocks, attention_kv_blocks.h), the layer norms in layer_ops.cpp; shared helpers in
ggml_blocks.h, vector_math.h and delta_rule_step.h. They are
built with OpenMP (at::parallel_for's threads),
compiled by torch.utils.cpp_extension at first use (about 30 s) and cached
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
On a CPU without AVX-512 VNNI+BF16 and GFNI, if the build fails, or with the environment
variable QWEN35_NO_FAST_KERNELS set, `available()` is False and `install()`
registers nothing, so QuantLinear keeps its reference path.

The plain reference for every kernel here is `dequant.dequantize` followed by an
fp32 matmul; tests/test_quant_linear.py pins them together.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from qwen35.kernels import quant_linear

log = logging.getLogger(__name__)

T = GGMLQuantizationType
_FAST = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
FAST_TYPES = frozenset(int(t) for t in (*_FAST, T.F32, T.F16, T.BF16))
PACKED_TYPES = frozenset(int(t) for t in (T.Q4_K, T.Q6_K, T.Q8_0))
# Weight bytes (as bf16) per prefill tile: half a core's L2, leaving room for x.
TILE_BYTES = 1 << 19

_EXTENSION = "qwen35_ggml_cpu"
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [
    _CSRC / name
    for name in ("ggml_gemv.cpp", "ggml_pack.cpp", "ggml_packed.cpp", "ggml_dequant.cpp", "delta_rule_cpu.cpp",
                 "delta_rule_chunked_cpu.cpp", "deltanet_cpu.cpp", "deltanet_decode.cpp", "attention_decode.cpp",
                 "mlp_cpu.cpp", "layer_ops.cpp")
]
_HEADERS = [
    _CSRC / name
    for name in ("ggml_blocks.h", "delta_rule_inputs.h", "delta_rule_step.h", "vector_math.h", "packed_call.h",
                 "packed_format.h", "attention_kv_blocks.h")
]
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "gfni")
_COMPILE_FLAGS = [
    "-O3",
    "-mavx2",
    "-mfma",
    "-mf16c",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mavx512bf16",
    "-mgfni",
    "-ffp-contract=off",  # keeps dequantize_f32 bit-equal to the reference
    # at::parallel_for's threads come from an OpenMP pragma in torch's headers: without this
    # it compiles to a plain loop on the calling thread. (The runtime is torch's own libgomp,
    # already loaded under the same soname.)
    "-fopenmp",
]


def cpu_supported() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return all(flag in flags for flag in _REQUIRED_CPU_FLAGS)


@functools.cache
def _ops():
    """Build (or load the cached build of) the extension; None when it cannot be used here."""
    if os.environ.get("QWEN35_NO_FAST_KERNELS") or not cpu_supported():
        return None
    from torch.utils import cpp_extension

    # torch rebuilds when a source or a flag changes, not a header: put the header's hash in a flag.
    header_hash = hashlib.sha256(b"".join(path.read_bytes() for path in _HEADERS)).hexdigest()[:16]
    build_dir = _build_directory()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "qwen35.flock", "w") as guard:
            # torch's own lock file outlives a build that was killed (Ctrl-C during the first
            # run) and then makes every later start wait forever. An flock dies with its
            # process: whoever holds it is the only builder, so a torch lock seen then is stale.
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            if not (build_dir / f"{_EXTENSION}.so").exists():
                print("qwen35: building the fast CPU kernels (once, about 30 s)...", file=sys.stderr, flush=True)
            cpp_extension.load(
                name=_EXTENSION,
                sources=[str(path) for path in _SOURCES],
                extra_cflags=[*_COMPILE_FLAGS, f"-DQWEN35_GGML_HEADERS={header_hash}"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # a missing compiler must not stop the engine
        log.warning("fast CPU kernels unavailable, using the reference path: %s", error)
        return None
    return torch.ops.qwen35_ggml


def _build_directory() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    version = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / version / _EXTENSION


def available() -> bool:
    return _ops() is not None


def _require():
    ops = _ops()
    if ops is None:
        raise RuntimeError("fast CPU kernels are not available on this machine")
    return ops


def gemv(blocks: torch.Tensor, type_id: int, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T with W given as blocks [N, row_bytes]; int8 activations. -> [M, N] float32."""
    return _require().gemv(blocks, int(type_id), x)


def dequantize_bf16(blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    """Blocks [N, row_bytes] -> bf16 [N, in_features] (each value rounded once from the exact fp32)."""
    return _require().dequantize_bf16(blocks, int(type_id), int(in_features))


def dequantize_f32(blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    """Blocks [N, row_bytes] -> fp32 [N, in_features], bit-equal to dequant.dequantize."""
    return _require().dequantize_f32(blocks, int(type_id), int(in_features))


def dequantize_rows(blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor | None:
    """`dequantize_f32` for QuantLinear.rows (the embedding lookup) where it applies, else None."""
    if blocks.device.type != "cpu" or int(type_id) not in FAST_TYPES:
        return None
    return dequantize_f32(blocks.contiguous(), type_id, in_features)


def tiled_bf16_matmul(blocks: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [M, K] @ W^T, dequantizing W to bf16 one tile of rows at a time. -> [M, N] float32.

    Each thread takes whole tiles (dequantize into its own buffer, then a single-threaded
    bf16 matmul), so a call synchronizes its threads once, not once per tile.
    """
    if type_id == T.BF16 and blocks.data_ptr() % 2 == 0:
        # Already bf16: one matmul, no tiles.
        return (x.to(torch.bfloat16) @ blocks.view(torch.bfloat16).t()).float()
    tile_rows = max(16, TILE_BYTES // (2 * in_features))
    return _require().tiled_matmul_bf16(blocks, int(type_id), x, tile_rows)


# Bytes per packed block of 16 rows (csrc/ggml_packed.cpp's layouts), and values per block.
_PACKED_BLOCK = {int(T.Q4_K): (2368, 256), int(T.Q6_K): (3360, 256), int(T.Q8_0): (544, 32)}
_ROWS_PER_SUPER_GROUP = 64
_arena: list = []  # [buffer, bytes used] while packing_arena is open


def packed_nbytes(type_id: int, shape: tuple[int, ...]) -> int:
    """Bytes `pack` makes of a weight of this PyTorch shape ([out, in] or [E, out, in]); 0 for
    types it leaves alone."""
    if int(type_id) not in PACKED_TYPES:
        return 0
    block_bytes, block_size = _PACKED_BLOCK[int(type_id)]
    *experts, out_features, in_features = shape
    super_groups = -(-out_features // _ROWS_PER_SUPER_GROUP)
    count = 1
    for e in experts:
        count *= e
    return count * super_groups * (in_features // block_size) * 4 * block_bytes


@contextlib.contextmanager
def packing_arena(nbytes: int):
    """While open, `pack` carves its outputs out of one 2 MiB-aligned buffer of `nbytes` with
    huge pages (one allocation for a model's packed weights; decode streams them with no TLB
    miss every 4 KiB). Outputs that do not fit get their own allocation."""
    if nbytes <= 0 or not available():
        yield
        return
    _arena[:] = [_require().huge_page_buffer(int(nbytes)), 0]
    try:
        yield
    finally:
        _arena.clear()


def pack(blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    """Blocks [out, row_bytes] or [E, out, row_bytes] of a PACKED_TYPES weight -> the packed
    layout ([E,] ceil(out / 64), blocks per row, 4, bytes per packed block of 16 rows) that
    packed_gemv reads. Other types (and weights off the CPU) stay as they are."""
    if int(type_id) not in PACKED_TYPES or blocks.device.type != "cpu":
        return blocks
    out = None
    if _arena:
        need = packed_nbytes(type_id, (*blocks.shape[:-1], in_features))
        buffer, used = _arena
        if used + need <= buffer.numel():
            out = buffer[used : used + need]
            _arena[1] = used + need
    return _require().pack_rows(blocks.contiguous(), int(type_id), int(in_features), out)


def packed_gemv(packed: torch.Tensor, type_id: int, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] @ W^T with W given by `pack`; int8 activations. -> [M, out_features] float32."""
    return _require().packed_gemv(packed, int(type_id), x, int(out_features))


def matmul(weights: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The "fast" QuantLinear kernel for any number of rows (batch-invariant); `weights` are
    what `pack` made of the blocks."""
    if weights.device.type != "cpu" or x.device.type != "cpu":
        return quant_linear.reference_matmul(weights, type_id, x, in_features)
    if int(type_id) in PACKED_TYPES:
        return packed_gemv(weights, type_id, x, out_features)
    return gemv(weights.contiguous(), type_id, x)


def group_matmul(
    weights: list[torch.Tensor], type_ids: list[int], x: torch.Tensor, in_features: int, out_features: list[int]
) -> torch.Tensor | None:
    """The "fast" LinearGroup kernel: several packed weights on one input in one call,
    outputs side by side; each column equals `matmul` of its own weight. Declines (None)
    unless every weight is a packed type on the CPU."""
    if x.device.type != "cpu" or any(int(t) not in PACKED_TYPES or w.device.type != "cpu" for w, t in zip(weights, type_ids)):
        return None
    return _require().packed_gemv_many(weights, [int(t) for t in type_ids], x, [int(n) for n in out_features])


def expert_group_matmul(
    weights: list[torch.Tensor], type_ids: list[int], x: torch.Tensor, expert_ids: torch.Tensor, in_features: int,
    out_features: list[int],
) -> torch.Tensor | None:
    """The "fast" ExpertGroup kernel: several packed expert weights (gate and up) on the same
    rows of x (as for expert_matmul) in one call, outputs side by side; each equals `expert_matmul` of its own weight.
    Declines (None) unless every weight is a packed type on the CPU."""
    if x.device.type != "cpu" or any(int(t) not in PACKED_TYPES or w.device.type != "cpu" for w, t in zip(weights, type_ids)):
        return None
    return _require().packed_expert_gemv_many(weights, [int(t) for t in type_ids], x, expert_ids,
                                              [int(n) for n in out_features])


def expert_matmul(
    weights: torch.Tensor, type_id: int, x: torch.Tensor, expert_ids: torch.Tensor, in_features: int,
    out_features: int,
) -> torch.Tensor | None:
    """The "fast" QuantExperts kernel: every (slot, expert) pair in one call, x [R, in] one row
    per slot or one per token shared by its S / R slots; each slot's result equals its row
    alone through `matmul`."""
    if weights.device.type != "cpu" or x.device.type != "cpu":
        return None
    if int(type_id) in PACKED_TYPES:
        return _require().packed_expert_gemv_many([weights], [int(type_id)], x, expert_ids, [int(out_features)])
    if x.shape[0] != expert_ids.numel():
        x = x.repeat_interleave(expert_ids.numel() // x.shape[0], dim=0)
    return _require().expert_gemv(weights.contiguous(), int(type_id), x, expert_ids)


def _all_packed(x: torch.Tensor, layers) -> bool:
    """Whether x is on the CPU and every layer is in "fast" mode with packed weights."""
    return x.device.type == "cpu" and all(
        layer.mode == "fast" and layer.type_id in PACKED_TYPES and layer.fast_weights is not None for layer in layers
    )


def dense_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor | None:
    """down(silu(gate x) * up x) in one call (csrc/mlp_cpu.cpp) for x [M, K] and QuantLinear
    layers; declines (None) unless every weight is packed for the fast kernels on the CPU."""
    layers = (gate, up, down)
    ops = _ops() if _all_packed(x, layers) else None
    if ops is None:
        return None
    return ops.dense_mlp(x, [layer.fast_weights for layer in layers], [layer.type_id for layer in layers], gate.out_features)


def sparse_moe(x: torch.Tensor, logits: torch.Tensor, top_k: int, experts, shared, shared_gate) -> torch.Tensor | None:
    """An MoE block after its router in one call (csrc/mlp_cpu.cpp): x [N, K], the router's
    logits [N, E], experts = (gate, up, down) QuantExperts, shared = (gate, up, down)
    QuantLinear or None, with shared_gate [1, K]. Declines (None) unless every weight is
    packed for the fast kernels on the CPU."""
    shared_layers = list(shared or ())
    ops = _ops() if _all_packed(x, [*experts, *shared_layers]) else None
    if ops is None:
        return None
    return ops.sparse_moe(
        x, logits, int(top_k), [e.fast_weights for e in experts], [e.type_id for e in experts], experts[0].out_features,
        [s.fast_weights for s in shared_layers], [s.type_id for s in shared_layers],
        shared_layers[0].out_features if shared_layers else 0, shared_gate if shared_layers else None,
    )


def recurrent_delta_rule(q, k, v, g, beta, state) -> tuple[torch.Tensor, torch.Tensor]:
    """delta_rule.recurrent_gated_delta_rule fused in C++ (one pass per head and token)."""
    return _require().recurrent_delta_rule(q, k, v, g, beta, state)


def install() -> bool:
    """Register `matmul` and `expert_matmul` (with `pack` preparing the weights) as the "fast"
    mode kernels of QuantLinear and QuantExperts for FAST_TYPES.

    Returns False (and registers nothing) where the kernels cannot run.
    """
    if not available():
        return False
    quant_linear.register_fast_dequantizer(dequantize_rows)
    quant_linear.register_fast_group_kernel(group_matmul)
    quant_linear.register_fast_expert_group_kernel(expert_group_matmul)
    for type_id in FAST_TYPES:
        quant_linear.register_fast_kernel(type_id, matmul, prepare=pack if type_id in PACKED_TYPES else None)
        quant_linear.register_fast_expert_kernel(type_id, expert_matmul)
    return True
