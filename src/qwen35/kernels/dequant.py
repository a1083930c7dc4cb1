"""Reference dequantizers for ggml tensor types, vectorized over blocks in PyTorch.

Every type's block layout follows ggml (`ggml-common.h`) and gguf-py's numpy
dequantizers, and the arithmetic is done in the same fp32 order, so results are
bit-identical to `gguf.quants.dequantize`. These are the exact (reference) path;
fast kernels elsewhere must agree with them.

Input is the tensor's raw bytes (a uint8 tensor or numpy array, possibly a
read-only view of a memory-mapped file); output is float32 in PyTorch order
(the reverse of GGUF's shape, so the last dimension is the row width).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.errors import FormatError

QK_K = 256
T = GGMLQuantizationType

# Byte offsets of the fp16 scale fields in each block (ggml-common.h's block structs): where
# random blocks need finite values, for tests and benchmark weights.
FP16_FIELD_OFFSETS = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.IQ4_NL: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_XS: (0,),
}

# IQ4_NL / IQ4_XS map each 4-bit index through this non-uniform table (ggml's kvalues_iq4nl).
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


# ---------------------------------------------------------------- byte access


def as_byte_tensor(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A flat uint8 tensor over `raw`'s bytes, sharing memory (no copy) when it can.

    Read-only numpy arrays (views of a read-only memory map) are wrapped without a
    copy: this module never writes to its input, so PyTorch's warning about
    non-writable arrays is silenced for that one call only.
    """
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise FormatError(f"tensor bytes must be uint8, got {raw.dtype}")
        return raw.reshape(-1)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    if not isinstance(raw, np.ndarray):
        raise FormatError(f"tensor bytes must be a uint8 array, got {type(raw).__name__}")
    if raw.dtype != np.uint8:
        raise FormatError(f"tensor bytes must be uint8, got {raw.dtype}")
    if not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
    raw = raw.reshape(-1)
    if raw.flags.writeable:
        return torch.from_numpy(raw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(raw)


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 field at byte `offset` of each block, as float32 [n, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _split_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k]: all low nibbles, then all high nibbles."""
    return torch.stack((q & 0x0F, q >> 4), dim=-2)


def _bits(q: torch.Tensor, width: int) -> torch.Tensor:
    """[..., k] bytes -> [..., 8 // width, k]: field i holds bits [i*width, (i+1)*width)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=q.device).reshape(-1, 1)
    return (q.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _bit_per_element(q: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k]: bit j of the little-endian bitfield (byte j // 8, bit j % 8)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return ((q.unsqueeze(-1) >> shifts) & 1).reshape(q.shape[0], -1)


# ---------------------------------------------------------------- 32-element blocks


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    return blocks[:, 2:].view(torch.int8).to(torch.float32) * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _split_nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32)
    return d * (q.to(torch.int8) - 8).to(torch.float32)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _split_nibbles(blocks[:, 4:]).reshape(blocks.shape[0], 32)
    return d * q.to(torch.float32) + m


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    low = _split_nibbles(qs).reshape(qs.shape[0], 32)
    return low | (_bit_per_element(qh) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _five_bit(blocks[:, 2:6], blocks[:, 6:])
    return d * (q.to(torch.int8) - 16).to(torch.float32)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _five_bit(blocks[:, 4:8], blocks[:, 8:])
    return d * q.to(torch.float32) + m


def _iq4_lookup(indices: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=indices.device)
    return table[indices.to(torch.int64)]


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _split_nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32)
    return d * _iq4_lookup(q)


# ---------------------------------------------------------------- 256-element super-blocks


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    # Each 32-byte half holds 128 values: four 2-bit planes of 32.
    q = _bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k_scales(scales: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from bytes 0-7, high 2 from bytes 8-11."""
    n = scales.shape[0]
    low = _split_nibbles(scales[:, :8]).reshape(n, 16)
    high = _bits(scales[:, 8:12], 2).reshape(n, 16)
    return ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    dl = (d * _q3_k_scales(scales)).reshape(n, 16, 1)
    low = _bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    high = _bits(hmask, 1).reshape(n, 16, 16)
    # A set high bit means "no offset"; a clear one subtracts 4.
    q = (low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    n = scales.shape[0]
    packed = scales.reshape(n, 3, 4)
    d, m, md = packed[:, 0], packed[:, 1], packed[:, 2]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    minimum = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scale.to(torch.float32), minimum.to(torch.float32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    dl = (d * scale).reshape(n, 8, 1)
    ml = (dmin * minimum).reshape(n, 8, 1)
    q = _split_nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    dl = (d * scale).reshape(n, 8, 1)
    ml = (dmin * minimum).reshape(n, 8, 1)
    low = _split_nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _bits(blocks[:, 16:48], 1)  # [n, 8, 32]: sub-block i takes bit i of each byte
    q = (low | (high << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks, 208)
    dl = (d * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = _split_nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    high = _bits(blocks[:, 2:4], 2).transpose(1, 2).reshape(n, 8)  # bits 2i..2i+1 of a uint16
    low = _split_nibbles(blocks[:, 4:8]).transpose(1, 2).reshape(n, 8)  # nibble i of 4 bytes
    scale = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scale).reshape(n, 8, 1)
    q = _split_nibbles(blocks[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl * _iq4_lookup(q)).reshape(n, QK_K)


# ---------------------------------------------------------------- dispatch

_BLOCK_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.IQ4_NL: _iq4_nl,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
    T.IQ4_XS: _iq4_xs,
}
_FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in (*_FLOAT_DTYPES, *_BLOCK_DEQUANTIZERS))


def supported_names() -> str:
    return ", ".join(sorted(GGMLQuantizationType(t).name for t in SUPPORTED_TYPES))


def check_supported(type_id: int) -> None:
    if type_id not in SUPPORTED_TYPES:
        raise FormatError(f"tensor type {type_name(type_id)} is not supported (supported: {supported_names()})")


def block_geometry(type_id: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a supported type."""
    check_supported(type_id)
    return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]


def row_nbytes(type_id: int, row_width: int) -> int:
    """Bytes of one row of `row_width` elements; the width must be a whole number of blocks."""
    block_size, type_size = block_geometry(type_id)
    if row_width <= 0 or row_width % block_size:
        raise FormatError(
            f"row width {row_width} is not a positive multiple of the {type_name(type_id)} block size {block_size}"
        )
    return row_width // block_size * type_size


def dequantize(raw: torch.Tensor | np.ndarray, type_id: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes -> float32 tensor of `shape` (PyTorch order, row width last).

    F32 input that is suitably aligned comes back as a view of `raw` (no copy);
    callers must not write to it.
    """
    check_supported(type_id)
    shape = tuple(int(dim) for dim in shape)
    if any(dim < 0 for dim in shape):
        raise FormatError(f"bad tensor shape {shape}")
    data = as_byte_tensor(raw)
    row_width = shape[-1] if shape else 1
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    if n_elements == 0:
        expected = 0
    else:
        expected = n_elements // row_width * row_nbytes(type_id, row_width)
    if data.numel() != expected:
        raise FormatError(
            f"{type_name(type_id)} tensor of shape {list(shape)} needs {expected} bytes, got {data.numel()}"
        )
    if n_elements == 0:
        return torch.empty(shape, dtype=torch.float32, device=data.device)

    float_dtype = _FLOAT_DTYPES.get(type_id)
    if float_dtype is not None:
        itemsize = torch.empty((), dtype=float_dtype).element_size()
        if (data.data_ptr() % itemsize) != 0:
            data = data.clone()  # a misaligned view cannot be reinterpreted in place
        return data.view(float_dtype).to(torch.float32).reshape(shape)

    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    blocks = data.reshape(-1, type_size)
    return _BLOCK_DEQUANTIZERS[type_id](blocks).reshape(shape)
