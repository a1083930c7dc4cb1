"""Named quant mixes: which ggml type each tensor gets, as llama.cpp's quantizer decides.

A mix name (Q4_K_M, ...) is not one type. llama.cpp's `llama_tensor_get_type`
(src/llama-quant.cpp) starts from the mix's base type and raises some tensors
(the output head, attn_v / attn_qkv and ffn_down on "more bits" layers, ...),
leaves norms, convolutions and the router in F32, and falls back to a
32-wide block type when a row width is not a multiple of 256. We follow those
rules tensor by tensor, in the quantizer's own order (its counters depend on it),
and take block sizes only from gguf's GGML_QUANT_SIZES.

UD-Q4_K_XL is Unsloth's calibrated mix; its per-tensor choices are not a public
rule, so we model what they describe (attention and DeltaNet projections high,
expert gate/up low, expert down one step up) and say it is an approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from qwen35.errors import UnknownNameError

F32, F16, BF16 = T.F32, T.F16, T.BF16


@dataclass(frozen=True)
class Mix:
    name: str
    base: T  # llama_ftype_get_default_type
    note: str = ""


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix("BF16", BF16, "unquantized"),
        Mix("F16", F16, "unquantized"),
        Mix("Q8_0", T.Q8_0),
        Mix("Q6_K", T.Q6_K),
        Mix("Q5_K_M", T.Q5_K),
        Mix("Q5_K_S", T.Q5_K),
        Mix("Q4_K_M", T.Q4_K),
        Mix("UD-Q4_K_XL", T.Q4_K, "Unsloth dynamic mix, modelled (not a public rule)"),
        Mix("Q4_K_S", T.Q4_K),
        Mix("IQ4_XS", T.IQ4_XS),
        Mix("Q4_0", T.Q4_0),
        Mix("Q3_K_L", T.Q3_K),
        Mix("Q3_K_M", T.Q3_K),
        Mix("Q3_K_S", T.Q3_K),
        Mix("Q2_K", T.Q2_K),
    )
}

# llama.cpp's general.file_type numbers, to name the mix of a GGUF we read.
FILE_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 38: "MXFP4_MOE",
}

# The fallback when a row is not a multiple of the block: 256-wide k-quants -> 32-wide types.
_FALLBACK = {
    T.IQ4_XS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ2_XS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}


def find_mix(name: str) -> Mix:
    key = name.strip().upper().replace("-", "_")
    for mix in MIXES.values():
        if mix.name.replace("-", "_") == key:
            return mix
    if key in ("Q4", "Q4_K"):
        return MIXES["Q4_K_M"]
    if key in ("Q5", "Q5_K"):
        return MIXES["Q5_K_M"]
    if key in ("Q3", "Q3_K"):
        return MIXES["Q3_K_M"]
    if key in ("Q8", "Q6", "Q2"):
        return MIXES[{"Q8": "Q8_0", "Q6": "Q6_K", "Q2": "Q2_K"}[key]]
    if key in ("FP16",):
        return MIXES["F16"]
    import difflib

    close = difflib.get_close_matches(key, [m.name.replace("-", "_") for m in MIXES.values()], n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UnknownNameError(f"unknown quant {name!r}: {hint}known: {', '.join(MIXES)}")


def type_nbytes(ggml_type: T, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for dim in shape:
        n *= dim
    return n // block * size


def is_quantized(ggml_type: T) -> bool:
    return GGML_QUANT_SIZES[ggml_type][0] > 1


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization, for the names a Qwen 3.5 file has."""
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    excluded = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", ".position_embd", ".patch_embd")
    return not any(part in name for part in excluded)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, category in (
        ("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return category
    return "other"


def _layer_of(name: str) -> int:
    if not name.startswith("blk."):
        return -1
    index = name[4:name.find(".", 4)]
    return int(index) if index.isdigit() else -1


def quantizer_order(names) -> list[str]:
    """The order llama.cpp's loader keeps weights in: non-block tensors, then by block, by name."""
    return sorted(names, key=lambda n: (_layer_of(n), n))


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Quantizer:
    """The state llama_tensor_get_type keeps while walking a model's tensors."""

    def __init__(self, mix: Mix, names: list[str], n_layer_all: int, n_gqa: int, n_expert: int):
        self.mix = mix.name
        self.base = mix.base
        self.n_gqa = n_gqa
        self.n_expert = n_expert
        self.tied = "output.weight" not in names
        self.n_attention_wv = sum(_category(n) == "attn_v" for n in names)
        self.n_layer = n_layer_all
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def choose(self, name: str, shape: tuple[int, ...]) -> T:
        new_type = self.base
        if is_quantized(self.base):
            new_type = self._ud(name, shape) if self.mix == "UD-Q4_K_XL" else self._standard(name, shape)
            new_type = self._fallback(new_type, shape[0])
        return new_type

    def _standard(self, name: str, shape: tuple[int, ...]) -> T:
        mix, category, new_type = self.mix, _category(name), self.base
        if category == "output" or (self.tied and category == "token_embd"):
            if shape[0] % GGML_QUANT_SIZES[new_type][0]:
                return T.Q8_0
            return new_type if new_type == T.Q8_0 else T.Q6_K
        if category == "attn_v":
            i, n = self.i_attention_wv, self.n_attention_wv
            self.i_attention_wv += 1
            if mix == "Q2_K":
                return T.Q4_K if self.n_gqa >= 4 else T.Q3_K
            if mix == "Q3_K_M":
                return T.Q5_K if i < 2 else T.Q4_K
            if mix == "Q3_K_L":
                return T.Q5_K
            if mix == "IQ4_XS" and self.n_gqa >= 4:
                return T.Q5_K
            if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
                return T.Q6_K
            if mix == "Q4_K_S" and i < 4:
                return T.Q5_K
            return new_type
        if category == "ffn_down":
            i_layer = _layer_of(name) if self.n_expert > 1 else self.i_ffn_down
            self.i_ffn_down += 1
            n = self.n_layer
            if mix == "Q2_K":
                return T.Q3_K
            if mix == "Q3_K_M":
                return T.Q5_K if i_layer < n // 16 else T.Q4_K
            if mix == "Q3_K_L":
                return T.Q5_K
            if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(i_layer, n):
                return T.Q6_K
            if mix == "IQ4_XS" and i_layer < n // 8:
                return T.Q5_K  # without an importance matrix, as llama-quantize runs by default
            if mix == "Q4_K_S" and i_layer < n // 8:
                return T.Q5_K
            return new_type
        if category == "attn_output":
            return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(mix, new_type)
        return new_type

    def _ud(self, name: str, shape: tuple[int, ...]) -> T:
        """Our model of UD-Q4_K_XL, tuned on its published sizes (see the module docstring).

        Dense sizes: attention and DeltaNet projections one step up (Q5_K), ssm_out and
        ffn_down Q6_K/Q5_K. MoE sizes: everything outside the routed experts at Q8_0;
        routed down Q5_K and gate/up Q4_K, or IQ4_XS/Q4_K where the experts are big.
        """
        category = _category(name)
        if category == "output":
            return T.Q6_K
        if category == "token_embd":
            return T.Q6_K if self.tied else T.Q4_K
        projection = category in ("attn_v", "attn_k", "attn_q", "attn_output") or any(
            key in name for key in ("attn_gate", "ssm_out", "ssm_alpha", "ssm_beta", "nextn.eh_proj")
        )
        i_layer = _layer_of(name)
        if self.n_expert <= 1:
            if "ssm_alpha" in name or "ssm_beta" in name:
                return T.Q8_0
            if "ssm_out" in name:
                return T.Q6_K
            if projection:
                return T.Q5_K
            if category == "ffn_down":
                return T.Q6_K if _more_bits(i_layer, self.n_layer) else T.Q5_K
            return T.Q4_K
        if projection or "_shexp" in name:
            return T.Q8_0
        big_experts = shape[0] * shape[1] >= 3072 * 1024
        if category == "ffn_down":
            return T.Q4_K if big_experts else T.Q5_K
        return T.IQ4_XS if big_experts else T.Q4_K

    @staticmethod
    def _fallback(new_type: T, row_width: int) -> T:
        block = GGML_QUANT_SIZES[new_type][0]
        if row_width % block == 0:
            return new_type
        fallback = _FALLBACK.get(new_type, T.F16)
        return fallback if row_width % GGML_QUANT_SIZES[fallback][0] == 0 else T.F16


def assign_types(
    tensors, mix: Mix, *, n_layer_all: int, n_gqa: int, n_expert: int
) -> dict[str, T]:
    """name -> ggml type for a GGUF holding `tensors` (objects with .name and .shape), made with `mix`.

    `n_layer_all` is the file's block count (text blocks plus MTP blocks), as the
    quantizer sees it. Tensors that are never quantized keep F32, as the converter writes them.
    """
    by_name = {t.name: t for t in tensors}
    names = quantizer_order(by_name)
    quantizer = _Quantizer(mix, names, n_layer_all, n_gqa, n_expert)
    types = {}
    for name in names:
        shape = tuple(by_name[name].shape)
        if allows_quantization(name, shape):
            types[name] = quantizer.choose(name, shape)
        else:
            types[name] = F32
    return types
