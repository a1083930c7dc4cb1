"""The K/V cache flags that `run`, `serve` and `bench` share: llama.cpp's -ctk/--cache-type-k and
-ctv/--cache-type-v.

Types: f32, f16, bf16, and the GGUF block types q8_0, q4_0, q4_1, q5_0, q5_1 (engine/quantized_kv.py).
Only the full-attention layers (one in four) keep K/V; the DeltaNet states are float32 whatever these say.

The commands default to f16, as llama.cpp does: half the memory of float32, and on the fixtures no
greedy token moved. `load_model` without these keywords keeps K/V as it always has (float32 on the CPU,
the numbers every logits test compares; bf16 pages on a GPU in fast precision, float32 in reference).
The CPU keeps exactly the type asked. A GPU keeps its K/V in pages (engine/paged_kv.py): f16 and bf16 there
are bf16 pages, f32 is float32 pages (a float type for one of K and V and not the other: both as these say,
f32 only where both ask it), and the block types are pages of GGUF blocks as on the CPU.
"""

from __future__ import annotations

from qwen35.errors import Qwen35Error

# engine/quantized_kv.py's CACHE_TYPES, named here too so that parsing the flags imports no torch.
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK_TYPES = tuple(cache_type for cache_type in CACHE_TYPES if cache_type not in FLOAT_TYPES)
FLAGS = {"cache_type_k": "-ctk", "cache_type_v": "-ctv"}
DEFAULT_CACHE_TYPE = "f16"  # llama.cpp's


def add_cache_arguments(parser) -> None:
    types = ", ".join(CACHE_TYPES)
    parser.add_argument("-ctk", "--cache-type-k", default=DEFAULT_CACHE_TYPE, metavar="TYPE",
                        help=f"how the full-attention layers keep K: {types} (default {DEFAULT_CACHE_TYPE}; "
                             "f32 is exact; on a GPU f16/bf16 are bf16 pages)")
    parser.add_argument("-ctv", "--cache-type-v", default=DEFAULT_CACHE_TYPE, metavar="TYPE",
                        help=f"how they keep V: as -ctk (default {DEFAULT_CACHE_TYPE})")


def check_cache_type(value: str | None, flag: str) -> str | None:
    """`value` lower-cased (None: not given), or a one-line error naming the flag."""
    if value is None:
        return None
    lowered = str(value).lower()
    if lowered not in CACHE_TYPES:
        raise Qwen35Error(f"{flag} {value}: not a K/V cache type (use one of {', '.join(CACHE_TYPES)})")
    return lowered


def check_cache_types(cache_type_k: str | None, cache_type_v: str | None) -> tuple:
    """The two types checked (lower-cased; None: not given)."""
    return check_cache_type(cache_type_k, "-ctk"), check_cache_type(cache_type_v, "-ctv")


def cache_options(args) -> dict:
    """load_model's K/V keywords for these flags (checked before any model loads)."""
    cache_type_k, cache_type_v = check_cache_types(args.cache_type_k, args.cache_type_v)
    return {"cache_type_k": cache_type_k, "cache_type_v": cache_type_v}


def cpu_cache_types(cache_type_k: str | None, cache_type_v: str | None) -> tuple[str, str]:
    """How a CPU layer keeps K and V: the types asked, float32 where not given."""
    return cache_type_k or "f32", cache_type_v or "f32"


def gpu_pages_are_float32(cache_type_k: str | None, cache_type_v: str | None, fast: bool) -> bool:
    """Whether a GPU layer's float pages hold float32 (else bf16). Not given, or only block types given
    (whose float dtype is what prompts read them as), as the precision keeps them (bf16 in fast, float32 in
    reference); else float32 only where the float types given (one not given counting as f32) are f32."""
    floats = [cache_type or "f32" for cache_type in (cache_type_k, cache_type_v) if cache_type not in BLOCK_TYPES]
    if (cache_type_k is None and cache_type_v is None) or not floats:
        return not fast
    return all(cache_type == "f32" for cache_type in floats)
