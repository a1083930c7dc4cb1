"""The K/V cache flags that `run`, `serve` and `bench` share: llama.cpp's -ctk/--cache-type-k and
-ctv/--cache-type-v.

Types: f32, f16, bf16, and the GGUF block types q8_0, q4_0, q4_1, q5_0, q5_1 (engine/quantized_kv.py).
Only the full-attention layers (one in four) keep K/V; the DeltaNet states are float32 whatever these say.

Not given, a layer keeps K/V as it always has here: float32 on the CPU (exact, the fixtures' numbers),
bf16 pages on a GPU in fast precision (float32 in reference precision). Given, the CPU keeps exactly the
type asked. A GPU keeps its K/V in pages of one float dtype: f16 and bf16 there are bf16 pages, f32 is
float32 pages, and the block types are refused (they run on the CPU only so far).
"""

from __future__ import annotations

from qwen35.errors import Qwen35Error

# engine/quantized_kv.py's CACHE_TYPES, named here too so that parsing the flags imports no torch.
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
FLOAT_TYPES = ("f32", "f16", "bf16")
FLAGS = {"cache_type_k": "-ctk", "cache_type_v": "-ctv"}


def add_cache_arguments(parser) -> None:
    types = ", ".join(CACHE_TYPES)
    parser.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE",
                        help=f"how K of the full-attention layers is kept: {types} (default: f32 on the CPU, "
                             "as before; bf16 pages on a GPU in fast precision); block types on the CPU only")
    parser.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE",
                        help="how V is kept: as -ctk (default: the same as -ctk's default)")


def check_cache_type(value: str | None, flag: str) -> str | None:
    """`value` lower-cased (None: not given), or a one-line error naming the flag."""
    if value is None:
        return None
    lowered = str(value).lower()
    if lowered not in CACHE_TYPES:
        raise Qwen35Error(f"{flag} {value}: not a K/V cache type (use one of {', '.join(CACHE_TYPES)})")
    return lowered


def check_cache_types(cache_type_k: str | None, cache_type_v: str | None, device=None) -> tuple:
    """The two types checked (lower-cased; None: not given), and refused where `device` is a GPU and a type
    is a block type: a GPU's paged K/V holds one float dtype."""
    checked = (check_cache_type(cache_type_k, "-ctk"), check_cache_type(cache_type_v, "-ctv"))
    if device is not None and str(device).startswith("cuda"):
        for flag, value in zip(FLAGS.values(), checked):
            if value is not None and value not in FLOAT_TYPES:
                raise Qwen35Error(f"{flag} {value}: a quantized K/V cache runs on the CPU only so far")
    return checked


def cache_options(args, device=None) -> dict:
    """load_model's K/V keywords for these flags (checked against `device`, before any model loads)."""
    cache_type_k, cache_type_v = check_cache_types(args.cache_type_k, args.cache_type_v, device)
    return {"cache_type_k": cache_type_k, "cache_type_v": cache_type_v}


def cpu_cache_types(cache_type_k: str | None, cache_type_v: str | None) -> tuple[str, str]:
    """How a CPU layer keeps K and V: the types asked, float32 where not given."""
    return cache_type_k or "f32", cache_type_v or "f32"


def gpu_pages_are_float32(cache_type_k: str | None, cache_type_v: str | None, fast: bool) -> bool:
    """Whether a GPU layer's pages hold float32 (else bf16): not given, as the precision keeps them
    (bf16 in fast, float32 in reference); given, float32 only where both ask f32."""
    if cache_type_k is None and cache_type_v is None:
        return not fast
    return (cache_type_k or "f32") == (cache_type_v or "f32") == "f32"
