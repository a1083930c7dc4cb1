"""The dequantizers against gguf-py's reference numpy code (`gguf.quants`)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from qwen35.errors import FormatError
from qwen35.formats.gguf import GGUFModel
from qwen35.kernels.dequant import FP16_FIELD_OFFSETS, SUPPORTED_TYPES, dequantize

T = GGMLQuantizationType

QUANTIZABLE_BY_GGUF = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16)


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> np.ndarray:
    return gguf_quants.dequantize(np.asarray(raw), qtype).reshape(shape)


def assert_same(ours: torch.Tensor, expected: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == expected.shape
    np.testing.assert_array_equal(ours.numpy(), expected.astype(np.float32), strict=True)


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose fp16 scale fields hold finite values of mixed sign and size."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in FP16_FIELD_OFFSETS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 2, n_blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def fixture_files(fixtures):
    paths = sorted((fixtures / "tiny").glob("*.gguf"))
    if not paths:
        pytest.skip("no GGUF fixtures")
    return paths


def test_every_fixture_tensor_matches_gguf_py(fixtures):
    seen_types = set()
    for path in fixture_files(fixtures):
        with GGUFModel(path) as model:
            for name, info in model.tensors.items():
                raw = model.tensor_data(name)
                ours = dequantize(raw, info.type_id, info.torch_shape)
                expected = reference(raw, T(info.type_id), info.torch_shape)
                try:
                    assert_same(ours, expected)
                except AssertionError as error:
                    raise AssertionError(f"{path.name}: {name} ({info.type_name}): {error}") from None
                seen_types.add(T(info.type_id))
                del ours, raw
    # The fixtures are meant to cover every block type of the common llama-quantize mixes.
    assert {T.F32, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K, T.IQ4_XS, T.Q4_0} <= seen_types


@pytest.mark.parametrize("qtype", sorted(FP16_FIELD_OFFSETS), ids=lambda t: T(t).name)
def test_random_blocks_match_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    shape = (3, 5, 2 * block_size)
    raw = random_blocks(qtype, 3 * 5 * 2, rng)
    assert_same(dequantize(raw, qtype, shape), reference(raw, qtype, shape))
    assert_same(dequantize(torch.from_numpy(raw), qtype, shape), reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", QUANTIZABLE_BY_GGUF, ids=lambda t: T(t).name)
def test_gguf_quantized_floats_match_gguf_py(qtype):
    rng = np.random.default_rng(7)
    values = rng.standard_normal((16, 256)).astype(np.float32) * 3
    raw = gguf_quants.quantize(values, qtype).reshape(-1)
    ours = dequantize(raw, qtype, values.shape)
    assert_same(ours, reference(raw, qtype, values.shape))
    # And the round trip stays near the input, so the layout is not consistently wrong on both sides.
    assert float((ours - torch.from_numpy(values)).abs().max()) < 1.0


@pytest.mark.parametrize("qtype", (T.F32, T.F16, T.BF16), ids=lambda t: T(t).name)
def test_float_types_match_gguf_py(qtype):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    if qtype == T.BF16:
        raw = gguf_quants.quantize(values, qtype).reshape(-1)
    else:
        raw = values.astype(np.float16 if qtype == T.F16 else np.float32).view(np.uint8).reshape(-1)
    assert_same(dequantize(raw, qtype, values.shape), reference(raw, qtype, values.shape))


def test_readonly_memmap_view_is_used_without_warning_or_copy(tmp_path):
    values = np.arange(64, dtype=np.float32)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 32 + values.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=32)
    assert not mapped.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dequantize(mapped, T.F32, (8, 8))
    np.testing.assert_array_equal(ours.numpy(), values.reshape(8, 8))
    assert ours.data_ptr() == mapped.ctypes.data  # a view of the map, not a copy
    del ours, mapped


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: T(t).name)
def test_output_stays_on_the_input_device(qtype):
    # "meta" tensors refuse to mix with CPU ones, like CUDA tensors do.
    block_size, type_size = GGML_QUANT_SIZES[T(qtype)]
    raw = torch.empty(4 * type_size, dtype=torch.uint8, device="meta")
    out = dequantize(raw, qtype, (2, 2 * block_size))
    assert out.device.type == "meta" and out.shape == (2, 2 * block_size) and out.dtype == torch.float32


def test_supported_types_are_the_ones_promised():
    promised = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
    assert {T(t).name for t in SUPPORTED_TYPES} == promised


def test_unsupported_type_is_named():
    with pytest.raises(FormatError, match=r"IQ2_XXS is not supported \(supported: .*Q4_K"):
        dequantize(np.zeros(66, np.uint8), T.IQ2_XXS, (1, 256))
    with pytest.raises(FormatError, match="unknown type 9999"):
        dequantize(np.zeros(4, np.uint8), 9999, (1,))


def test_byte_count_must_match_shape():
    with pytest.raises(FormatError, match=r"Q4_K tensor of shape \[2, 256\] needs 288 bytes, got 144"):
        dequantize(np.zeros(144, np.uint8), T.Q4_K, (2, 256))
    with pytest.raises(FormatError, match="needs 16 bytes, got 17"):
        dequantize(np.zeros(17, np.uint8), T.F32, (2, 2))


def test_row_width_must_be_whole_blocks():
    with pytest.raises(FormatError, match="row width 100 .* Q8_0 block size 32"):
        dequantize(np.zeros(1000, np.uint8), T.Q8_0, (10, 100))


def test_input_must_be_bytes():
    with pytest.raises(FormatError, match="uint8"):
        dequantize(np.zeros(4, np.float32), T.F32, (4,))
    with pytest.raises(FormatError, match="uint8"):
        dequantize(torch.zeros(4), T.F32, (4,))
