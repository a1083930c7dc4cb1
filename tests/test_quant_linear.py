"""QuantLinear / QuantExperts against fp32 matmuls with gguf-py-dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from qwen35.errors import FormatError, Qwen35Error
from qwen35.formats.gguf import GGUFModel
from qwen35.kernels import quant_linear
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear, set_mode
from test_dequant import random_blocks  # random blocks with finite fp16 scales

T = GGMLQuantizationType


def gguf_weight(raw: np.ndarray, type_id: int, torch_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(np.asarray(raw), T(type_id)).reshape(torch_shape).copy())


def assert_close_fp32(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    # Same fp32 weights and inputs; only the matmul's summation order may differ.
    scale = float(expected.abs().max()) + 1e-30
    assert float((ours - expected).abs().max()) <= 1e-5 * scale


@pytest.fixture(scope="module")
def dense_q4_k_m(fixtures):
    with GGUFModel(fixtures / "tiny" / "dense-Q4_K_M.gguf") as model:
        yield model


@pytest.fixture(scope="module")
def moe_q4_k_m(fixtures):
    with GGUFModel(fixtures / "tiny" / "moe-Q4_K_M.gguf") as model:
        yield model


def matrices(model: GGUFModel, types: set[int]) -> list[str]:
    return [name for name, info in model.tensors.items() if len(info.shape) == 2 and info.type_id in types]


def test_forward_matches_gguf_py_weights_on_fixture_tensors(fixtures):
    rng = torch.Generator().manual_seed(0)
    covered = set()
    for file_name in ("dense-Q4_K_M.gguf", "dense-Q2_K.gguf", "dense-IQ4_XS.gguf", "dense-Q4_0.gguf",
                      "dense-Q8_0.gguf", "dense-Q3_K_M.gguf"):
        with GGUFModel(fixtures / "tiny" / file_name) as model:
            for info in model.tensors.values():
                if len(info.shape) != 2 or info.type_id in covered:
                    continue
                covered.add(info.type_id)
                out_features, in_features = info.torch_shape
                raw = model.tensor_data(info.name)
                layer = QuantLinear(raw, info.type_id, out_features, in_features)
                weight = gguf_weight(raw, info.type_id, info.torch_shape)
                x = torch.randn(2, 3, in_features, generator=rng)
                assert_close_fp32(layer(x), x @ weight.t())
                assert torch.equal(layer.dequantized(), weight)
    assert {T.F32, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K, T.IQ4_XS, T.Q4_0} <= covered


def test_layer_shares_the_file_bytes(dense_q4_k_m):
    name = matrices(dense_q4_k_m, {T.Q4_K})[0]
    info = dense_q4_k_m.tensors[name]
    raw = dense_q4_k_m.tensor_data(name)
    layer = QuantLinear(raw, info.type_id, *info.torch_shape)
    assert layer.blocks.data_ptr() == raw.ctypes.data
    assert layer.blocks.numel() == info.nbytes
    assert not any(True for _ in layer.parameters())  # nothing trainable, nothing fp32 kept


def test_slabs_give_the_same_result(dense_q4_k_m, monkeypatch):
    name = "token_embd.weight"
    info = dense_q4_k_m.tensors[name]
    layer = QuantLinear(dense_q4_k_m.tensor_data(name), info.type_id, *info.torch_shape)
    x = torch.randn(5, info.torch_shape[1])
    whole = layer(x)
    monkeypatch.setattr(quant_linear, "SLAB_ELEMENTS", 1000 * info.torch_shape[1])  # 1000 rows, ragged end
    sliced = layer(x)
    expected = x @ gguf_weight(dense_q4_k_m.tensor_data(name), info.type_id, info.torch_shape).t()
    assert_close_fp32(whole, expected)
    assert_close_fp32(sliced, expected)


def test_rows_is_an_embedding_lookup(dense_q4_k_m):
    info = dense_q4_k_m.tensors["token_embd.weight"]
    raw = dense_q4_k_m.tensor_data("token_embd.weight")
    layer = QuantLinear(raw, info.type_id, *info.torch_shape)
    ids = torch.tensor([[0, 17, 4159], [3, 3, 100]])
    expected = gguf_weight(raw, info.type_id, info.torch_shape)[ids]
    assert torch.equal(layer.rows(ids), expected)
    with pytest.raises(Qwen35Error, match="out of range"):
        layer.rows(torch.tensor([info.torch_shape[0]]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_from_dense_keeps_dtype_and_computes_in_fp32(dtype):
    weight = torch.randn(48, 64).to(dtype)
    layer = QuantLinear.from_dense(weight)
    assert layer.blocks.numel() == weight.numel() * weight.element_size()  # stored as given
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.float32
    assert_close_fp32(out, x.float() @ weight.float().t())
    assert torch.equal(layer.dequantized(), weight.float())


def test_experts_match_per_expert_gguf_py_weights(moe_q4_k_m):
    rng = torch.Generator().manual_seed(1)
    for kind in ("gate", "up", "down"):
        name = f"blk.0.ffn_{kind}_exps.weight"
        info = moe_q4_k_m.tensors[name]
        n_experts, out_features, in_features = info.torch_shape
        raw = moe_q4_k_m.tensor_data(name)
        experts = QuantExperts(raw, info.type_id, n_experts, out_features, in_features)
        weights = gguf_weight(raw, info.type_id, info.torch_shape)
        assert torch.equal(experts.dequantized_expert(5), weights[5])

        ids = torch.randint(0, n_experts, (6, 4), generator=rng)
        ids[0, 0] = n_experts - 1
        shared_x = torch.randn(6, in_features, generator=rng)
        expected = torch.stack([torch.stack([weights[e] @ shared_x[t] for e in ids[t].tolist()])
                                for t in range(6)])
        assert_close_fp32(experts(shared_x, ids), expected)

        slot_x = torch.randn(6, 4, in_features, generator=rng)
        expected = torch.stack([torch.stack([weights[ids[t, s]] @ slot_x[t, s] for s in range(4)])
                                for t in range(6)])
        assert_close_fp32(experts(slot_x, ids), expected)

        flat_ids = ids.reshape(-1)
        assert_close_fp32(experts(slot_x.reshape(-1, in_features), flat_ids), expected.reshape(-1, out_features))


def test_experts_dequantize_each_used_expert_once(moe_q4_k_m, monkeypatch):
    info = moe_q4_k_m.tensors["blk.1.ffn_up_exps.weight"]
    experts = QuantExperts(moe_q4_k_m.tensor_data(info.name), info.type_id, *info.torch_shape)
    calls = []
    original = experts.dequantized_expert
    monkeypatch.setattr(experts, "dequantized_expert", lambda e: calls.append(e) or original(e))
    ids = torch.tensor([[3, 7, 3, 1], [7, 3, 1, 9]])
    experts(torch.randn(2, info.torch_shape[2]), ids)
    assert sorted(calls) == [1, 3, 7, 9]


def test_experts_from_dense_hf_layout():
    weight = torch.randn(4, 24, 32).to(torch.bfloat16)
    experts = QuantExperts.from_dense(weight)
    x = torch.randn(3, 32)
    ids = torch.tensor([[0, 3], [2, 3], [1, 1]])
    expected = torch.stack([torch.stack([weight[e].float() @ x[t] for e in ids[t].tolist()]) for t in range(3)])
    assert_close_fp32(experts(x, ids), expected)


def test_fast_mode_uses_registered_kernel_and_falls_back(monkeypatch):
    weight = torch.randn(8, 32)
    layer = QuantLinear.from_dense(weight)
    x = torch.randn(2, 32)
    set_mode(torch.nn.Sequential(layer), "fast")
    assert layer.mode == "fast"
    assert_close_fp32(layer(x), x @ weight.t())  # no F32 kernel registered: reference path
    monkeypatch.setattr(quant_linear, "_FAST_KERNELS", {})
    quant_linear.register_fast_kernel(T.F32, lambda weights, type_id, x, in_features, out_features: torch.zeros(x.shape[0], 8))
    assert torch.equal(layer(x), torch.zeros(2, 8))
    with pytest.raises(Qwen35Error, match="unknown kernel mode"):
        set_mode(layer, "turbo")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(FormatError, match="needs 288 bytes, got 144"):
        QuantLinear(np.zeros(144, np.uint8), T.Q4_K, 2, 256)
    with pytest.raises(FormatError, match="IQ2_XXS is not supported"):
        QuantLinear(np.zeros(66, np.uint8), T.IQ2_XXS, 1, 256)
    with pytest.raises(FormatError, match="row width 100"):
        QuantExperts(np.zeros(3400, np.uint8), T.Q8_0, 1, 10, 100)
    with pytest.raises(Qwen35Error, match="dtype torch.float64"):
        QuantLinear.from_dense(torch.zeros(2, 2, dtype=torch.float64))
    experts = QuantExperts.from_dense(torch.zeros(2, 4, 8))
    with pytest.raises(Qwen35Error, match="expert id out of range"):
        experts(torch.zeros(1, 8), torch.tensor([2]))
    with pytest.raises(ValueError, match="does not fit"):
        experts(torch.zeros(3, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="in_features"):
        QuantLinear.from_dense(torch.zeros(2, 4))(torch.zeros(1, 5))


# ---------------------------------------------------------------- fast CPU kernels vs the reference

FAST_TYPE_FILES = {
    T.Q4_K: "dense-Q4_K_M.gguf",
    T.Q6_K: "dense-Q4_K_M.gguf",
    T.Q8_0: "dense-Q8_0.gguf",
    T.Q5_K: "dense-Q3_K_M.gguf",
    T.Q4_0: "dense-Q4_0.gguf",
    T.IQ4_XS: "dense-IQ4_XS.gguf",
    T.Q3_K: "dense-Q3_K_M.gguf",
    T.Q2_K: "dense-Q2_K.gguf",
}
GGUF_QUANTIZED_TYPES = (T.Q4_1, T.Q5_0, T.Q5_1)  # not in the fixtures: gguf-py quantizes them
FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


@pytest.fixture(scope="module")
def fast_cpu():
    from qwen35.kernels import fast_cpu

    if not fast_cpu.available():
        pytest.skip("fast CPU kernels unavailable: they need AVX-512 VNNI + BF16, a C++ compiler, no QWEN35_NO_FAST_KERNELS")
    return fast_cpu


def fast_type_weights(fixtures):
    """(type, blocks [out, row_bytes], gguf-py fp32 weight): the largest fixture matrix of each
    fast block type; random matrices quantized by gguf-py for the legacy types, random IQ4_NL
    blocks; random F16/BF16 matrices (as HF checkpoints hold) of a ragged width."""
    for type_id, file_name in FAST_TYPE_FILES.items():
        with GGUFModel(fixtures / "tiny" / file_name) as model:
            name = max(matrices(model, {type_id}), key=lambda n: model.tensors[n].nbytes)
            info = model.tensors[name]
            raw = model.tensor_data(name)
            layer = QuantLinear(raw, type_id, *info.torch_shape)
            yield type_id, layer.blocks, gguf_weight(raw, type_id, info.torch_shape)
    # 480 wide: an odd number of 32-value blocks (the kernels pair blocks up).
    values = np.random.default_rng(6).standard_normal((48, 480)).astype(np.float32)
    for type_id in GGUF_QUANTIZED_TYPES:
        raw = gguf_quants.quantize(values, type_id).reshape(-1)
        yield type_id, torch.from_numpy(raw).reshape(48, -1), gguf_weight(raw, type_id, (48, 480))
    raw = random_blocks(T.IQ4_NL, 48 * 512 // 32, np.random.default_rng(7))
    yield T.IQ4_NL, torch.from_numpy(raw).reshape(48, -1), gguf_weight(raw, T.IQ4_NL, (48, 512))
    for type_id, dtype in FLOAT_TYPES.items():
        layer = QuantLinear.from_dense(torch.randn(40, 300, generator=torch.Generator().manual_seed(5)).to(dtype))
        yield type_id, layer.blocks, gguf_weight(layer.blocks.numpy(), type_id, (40, 300))


def int8_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded the way the gemv kernel quantizes it (llama.cpp's Q8_K/Q8_0 scheme), back in fp32."""
    blocks = x.reshape(x.shape[0], -1, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).norm() / expected.norm())


def test_fast_dequantize_matches_gguf_py(fixtures, fast_cpu):
    covered = set()
    for type_id, blocks, weight in fast_type_weights(fixtures):
        covered.add(int(type_id))
        in_features = weight.shape[1]
        assert torch.equal(fast_cpu.dequantize_f32(blocks, type_id, in_features), weight), T(type_id).name
        assert torch.equal(fast_cpu.dequantize_bf16(blocks, type_id, in_features), weight.bfloat16()), T(type_id).name
    assert covered == fast_cpu.FAST_TYPES  # every fast kernel is pinned to the reference here


def test_fast_dequantize_random_blocks_match_gguf_py(fast_cpu):
    rng = np.random.default_rng(11)
    for type_id in (*FAST_TYPE_FILES, *GGUF_QUANTIZED_TYPES, T.IQ4_NL):
        raw = random_blocks(type_id, 8 * 1024 // GGML_QUANT_SIZES[type_id][0], rng)
        blocks = torch.from_numpy(raw).reshape(8, -1)
        weight = gguf_weight(raw, type_id, (8, 1024))
        assert torch.equal(fast_cpu.dequantize_f32(blocks, type_id, 1024), weight), T(type_id).name


def test_gemv_is_the_reference_with_int8_activations(fixtures, fast_cpu):
    # Tolerance: the kernel is exact integer arithmetic on 8-bit activations, so against
    # the same activations rounded in fp32 only summation order differs (1e-5); against
    # the exact fp32 reference it carries the 8-bit activation error (about 1%).
    # F16/BF16 weights keep x in fp32: only summation order differs.
    rng = torch.Generator().manual_seed(2)
    for type_id, blocks, weight in fast_type_weights(fixtures):
        x = torch.randn(3, weight.shape[1], generator=rng)
        ours = fast_cpu.gemv(blocks, type_id, x)
        if type_id in FLOAT_TYPES:
            assert relative_error(ours, x @ weight.t()) < 1e-5, T(type_id).name
            continue
        block_size = GGML_QUANT_SIZES[T(type_id)][0]  # activations share one scale per weight block
        rounded_x = int8_activations(x, block_size)
        assert relative_error(ours, rounded_x @ weight.t()) < 1e-5, T(type_id).name
        assert relative_error(ours, x @ weight.t()) < 1.5e-2, T(type_id).name


def test_tiled_bf16_matmul_agrees_with_reference(fixtures, fast_cpu, monkeypatch):
    # bf16 rounding of x, the weights and the output: about 0.3% relative; allow 1%.
    monkeypatch.setattr(fast_cpu, "TILE_BYTES", 64 * 1024)  # several tiles, a ragged last one
    rng = torch.Generator().manual_seed(3)
    for type_id, blocks, weight in fast_type_weights(fixtures):
        x = torch.randn(9, weight.shape[1], generator=rng)
        ours = fast_cpu.tiled_bf16_matmul(blocks, type_id, x, weight.shape[1])
        assert ours.dtype == torch.float32
        assert relative_error(ours, x @ weight.t()) < 1e-2, T(type_id).name


def kernel_weights(fast_cpu, blocks, type_id, in_features):
    """The weights in the form `matmul` takes for this type (packed or the blocks)."""
    return fast_cpu.pack(blocks, type_id, in_features)


def test_packed_matmul_is_the_reference_with_int8_activations(fixtures, fast_cpu):
    # The row-group packed kernels (Q4_K, Q6_K, Q8_0): exact integer sums on 8-bit activations,
    # so against the same rounded activations only the float summation order differs. Also
    # a row count that is not a multiple of the 16-row groups (a padded last group).
    rng = torch.Generator().manual_seed(12)
    covered = set()
    for type_id, blocks, weight in fast_type_weights(fixtures):
        if type_id not in fast_cpu.PACKED_TYPES:
            continue
        covered.add(int(type_id))
        for rows in (blocks.shape[0], 37):
            packed = fast_cpu.pack(blocks[:rows], type_id, weight.shape[1])
            assert packed.shape[-4] == -(-rows // 64) and packed.shape[-2] == 4
            x = torch.randn(5, weight.shape[1], generator=rng)
            ours = fast_cpu.matmul(packed, type_id, x, weight.shape[1], rows)
            rounded_x = int8_activations(x, GGML_QUANT_SIZES[T(type_id)][0])
            assert relative_error(ours, rounded_x @ weight[:rows].t()) < 1e-5, T(type_id).name
            assert relative_error(ours, x @ weight[:rows].t()) < 1.5e-2, T(type_id).name
    assert covered == fast_cpu.PACKED_TYPES


def test_fast_matmul_rows_are_batch_invariant(fixtures, fast_cpu):
    # A row's result must not depend on which rows share its call (server batching, prefill
    # chunk sizes, prefix-cache restores): M rows at once equal each row alone, bit for bit.
    rng = torch.Generator().manual_seed(8)
    for type_id, blocks, weight in fast_type_weights(fixtures):
        in_features, out_features = weight.shape[1], weight.shape[0]
        weights = kernel_weights(fast_cpu, blocks, type_id, in_features)
        x = torch.randn(100, in_features, generator=rng)
        alone = torch.cat([fast_cpu.matmul(weights, type_id, x[i : i + 1], in_features, out_features) for i in range(100)])
        for rows in (1, 2, 3, 17, 100):
            assert torch.equal(fast_cpu.matmul(weights, type_id, x[:rows], in_features, out_features), alone[:rows]), (
                T(type_id).name,
                rows,
            )


def test_group_matmul_equals_each_matmul(fixtures, fast_cpu):
    # Layers that share an input in one call (mixed types: two block sizes of x, padded
    # groups): each output column block equals that layer's own matmul, bit for bit.
    packed = [(type_id, blocks[:rows], weight.shape[1])
              for type_id, blocks, weight in fast_type_weights(fixtures) if type_id in fast_cpu.PACKED_TYPES
              for rows in (blocks.shape[0], 21)]
    width = min(k for _, _, k in packed)
    layers = [(type_id, fast_cpu.pack(blocks[:, : blocks.shape[1] * width // k], type_id, width), blocks.shape[0])
              for type_id, blocks, k in packed]
    rng = torch.Generator().manual_seed(13)
    for rows in (1, 2, 9):
        x = torch.randn(rows, width, generator=rng)
        together = fast_cpu.group_matmul([w for _, w, _ in layers], [t for t, _, _ in layers], x, width,
                                         [n for _, _, n in layers])
        expected = torch.cat([fast_cpu.matmul(w, t, x, width, n) for t, w, n in layers], dim=1)
        assert torch.equal(together, expected), rows


def test_linear_group_gives_each_layers_output(fixtures, fast_cpu, monkeypatch):
    monkeypatch.setattr(quant_linear, "_FAST_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_GROUP_KERNEL", {})
    with GGUFModel(fixtures / "tiny" / "dense-Q4_K_M.gguf") as model:
        names = ("blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.3.attn_v.weight")  # Q4_K and Q6_K
        layers = [QuantLinear(model.tensor_data(n), model.tensors[n].type_id, *model.tensors[n].torch_shape) for n in names]
        group = quant_linear.LinearGroup(*layers)
        x = torch.randn(2, 3, layers[0].in_features)
        reference = [layer(x) for layer in layers]  # nothing registered: the reference path
        assert all(torch.equal(a, b) for a, b in zip(group(x), reference))
        assert fast_cpu.install()
        set_mode(torch.nn.ModuleList(layers), "fast")
        fast = group(x)
        assert [out.shape for out in fast] == [out.shape for out in reference]
        for ours, alone, expected in zip(fast, (layer(x) for layer in layers), reference):
            assert torch.equal(ours, alone)
            assert relative_error(ours, expected) < 1.5e-2


def test_expert_matmul_is_matmul_per_slot(moe_q4_k_m, fast_cpu):
    for name in ("blk.1.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight"):
        info = moe_q4_k_m.tensors[name]
        experts = QuantExperts(moe_q4_k_m.tensor_data(info.name), info.type_id, *info.torch_shape)
        n_experts, out_features, in_features = info.torch_shape
        weights = kernel_weights(fast_cpu, experts.blocks, info.type_id, in_features)
        # Decode-sized (5 slots) and prefill-sized (70 slots, many per expert) calls.
        for ids in (torch.tensor([3, 15, 3, 0, 7]), torch.randint(0, n_experts, (70,))):
            x = torch.randn(ids.numel(), in_features)
            fused = fast_cpu.expert_matmul(weights, info.type_id, x, ids, in_features, out_features)
            for slot, expert in enumerate(ids.tolist()):
                alone = fast_cpu.matmul(weights[expert], info.type_id, x[slot : slot + 1], in_features, out_features)[0]
                assert torch.equal(fused[slot], alone)


def test_fast_mode_layers_agree_with_reference(moe_q4_k_m, fast_cpu, monkeypatch):
    monkeypatch.setattr(quant_linear, "_FAST_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_EXPERT_KERNELS", {})
    assert fast_cpu.install()
    rng = torch.Generator().manual_seed(4)
    info = moe_q4_k_m.tensors["blk.0.ffn_down_exps.weight"]
    experts = QuantExperts(moe_q4_k_m.tensor_data(info.name), info.type_id, *info.torch_shape)
    # A decode-sized call, then many slots: 20 rows per expert.
    for ids in (torch.tensor([[1, 4], [4, 9], [0, 1]]), torch.tensor([[2, 5]] * 20)):
        x = torch.randn(*ids.shape, info.torch_shape[2], generator=rng)
        set_mode(experts, "reference")
        expected = experts(x, ids)
        set_mode(experts, "fast")
        assert relative_error(experts(x, ids), expected) < 1.5e-2
    info = moe_q4_k_m.tensors["output.weight"]
    layer = QuantLinear(moe_q4_k_m.tensor_data(info.name), info.type_id, *info.torch_shape)
    for rows in (1, 16):
        x = torch.randn(rows, info.torch_shape[1], generator=rng)
        set_mode(layer, "reference")
        expected = layer(x)
        set_mode(layer, "fast")
        assert relative_error(layer(x), expected) < 1.5e-2


def test_fast_experts_prefill_rows_equal_their_decode(moe_q4_k_m, fast_cpu, monkeypatch):
    # A prefill call (many tokens, several per expert) gives each token exactly what a
    # decode call with that token alone gives.
    monkeypatch.setattr(quant_linear, "_FAST_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_EXPERT_KERNELS", {})
    assert fast_cpu.install()
    info = moe_q4_k_m.tensors["blk.0.ffn_up_exps.weight"]
    experts = QuantExperts(moe_q4_k_m.tensor_data(info.name), info.type_id, *info.torch_shape)
    set_mode(experts, "fast")
    rng = torch.Generator().manual_seed(9)
    ids = torch.randint(0, info.torch_shape[0], (40, 2), generator=rng)
    x = torch.randn(40, info.torch_shape[2], generator=rng)
    together = experts(x, ids)
    for token in range(40):
        assert torch.equal(together[token], experts(x[token : token + 1], ids[token : token + 1])[0])


def test_expert_group_gives_each_experts_output(moe_q4_k_m, fast_cpu, monkeypatch):
    monkeypatch.setattr(quant_linear, "_FAST_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_EXPERT_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_EXPERT_GROUP_KERNEL", {})
    members = []
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"):
        info = moe_q4_k_m.tensors[name]
        members.append(QuantExperts(moe_q4_k_m.tensor_data(name), info.type_id, *info.torch_shape))
    group = quant_linear.ExpertGroup(*members)
    rng = torch.Generator().manual_seed(14)
    n_experts = members[0].n_experts
    for tokens in (1, 30):  # decode, and a prefill with several tokens per expert
        x = torch.randn(tokens, members[0].in_features, generator=rng)
        ids = torch.stack([torch.randperm(n_experts, generator=rng)[:2] for _ in range(tokens)])
        set_mode(torch.nn.ModuleList(members), "reference")
        reference = group(x, ids)  # reference mode: one member after another, exact
        assert all(torch.equal(a, m(x, ids)) for a, m in zip(reference, members))
        assert fast_cpu.install()
        set_mode(torch.nn.ModuleList(members), "fast")
        together = group(x, ids)
        for ours, member, expected in zip(together, members, reference):
            assert ours.shape == expected.shape
            assert torch.equal(ours, member(x, ids))
            assert relative_error(ours, expected) < 1.5e-2


def test_fast_matmul_does_not_depend_on_the_thread_count(fixtures, fast_cpu):
    # Threads split the weight rows, never a dot product: any thread count gives the same bits.
    rng = torch.Generator().manual_seed(15)
    before = torch.get_num_threads()
    try:
        for type_id, blocks, weight in fast_type_weights(fixtures):
            in_features, out_features = weight.shape[1], weight.shape[0]
            weights = kernel_weights(fast_cpu, blocks, type_id, in_features)
            x = torch.randn(7, in_features, generator=rng)
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(fast_cpu.matmul(weights, type_id, x, in_features, out_features))
            assert all(torch.equal(results[0], other) for other in results[1:]), T(type_id).name
    finally:
        torch.set_num_threads(before)


def test_packing_arena_gives_the_same_packed_weights(fixtures, fast_cpu):
    # The load packs every weight into one huge-page buffer: same bytes as packing alone, and
    # packed_nbytes (which sizes that buffer) agrees with what pack makes.
    weights = [(t, b, w.shape[1]) for t, b, w in fast_type_weights(fixtures) if t in fast_cpu.PACKED_TYPES]
    alone = [fast_cpu.pack(b, t, k) for t, b, k in weights]
    sizes = [fast_cpu.packed_nbytes(t, (b.shape[0], k)) for t, b, k in weights]
    assert sizes == [p.numel() for p in alone]
    with fast_cpu.packing_arena(sum(sizes) - 1):  # the last one does not fit: its own allocation
        together = [fast_cpu.pack(b, t, k) for t, b, k in weights]
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert together[0].untyped_storage().data_ptr() == together[1].untyped_storage().data_ptr()
    assert together[-1].untyped_storage().data_ptr() != together[0].untyped_storage().data_ptr()


def test_fast_mode_rows_are_the_reference_rows(fixtures, fast_cpu):
    # The embedding lookup in "fast" mode dequantizes in C++: bit-equal to gguf-py's values.
    index = torch.tensor([[3, 0], [7, 3]])
    for type_id, blocks, weight in fast_type_weights(fixtures):
        layer = QuantLinear(blocks, type_id, weight.shape[0], weight.shape[1])
        set_mode(layer, "fast")
        assert torch.equal(layer.rows(index), weight[index]), T(type_id).name


def test_fused_groups_give_the_same_products():
    """LinearGroup/ExpertGroup.fuse: runs of one block type share one block tensor (the GPU reads
    a run in one launch); the products are those of the separate layers, and no weight is copied twice."""
    from qwen35.kernels.quant_linear import ExpertGroup, LinearGroup, QuantExperts

    generator = torch.Generator().manual_seed(5)
    dense = [torch.randn(rows, 64, generator=generator) for rows in (8, 16, 24)]
    layers = [QuantLinear.from_dense(w) for w in dense[:2]] + [QuantLinear.from_dense(dense[2].bfloat16())]
    group = LinearGroup(*layers)
    x = torch.randn(3, 64, generator=generator)
    before = [out.clone() for out in group(x)]
    group.fuse()
    assert [len(sizes) for _, sizes in group.fused] == [2, 1]  # the F32 pair, then the BF16 one
    assert layers[1].blocks.untyped_storage().data_ptr() == layers[0].blocks.untyped_storage().data_ptr()
    for got, expected in zip(group(x), before):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)

    experts = [QuantExperts.from_dense(torch.randn(4, rows, 64, generator=generator)) for rows in (8, 8)]
    expert_group = ExpertGroup(*experts)
    ids = torch.tensor([[0, 3], [2, 2], [1, 0]])
    before = [out.clone() for out in expert_group(x, ids)]
    expert_group.fuse()
    assert expert_group.fused is not None
    for got, expected in zip(expert_group(x, ids), before):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_expert_group_stacks_a_shared_expert_only_of_the_same_type_and_shape():
    """ExpertGroup.fuse(shared=...): the shared layers become expert E of one block stack (their blocks
    views of it, no copy kept), and the stack's expert E computes what the shared layers did."""
    import numpy as np

    from qwen35.kernels.quant_linear import ExpertGroup, QuantExperts, QuantLinear

    rng = np.random.default_rng(0)
    gates = QuantExperts.from_dense(torch.from_numpy(rng.standard_normal((3, 8, 32)).astype(np.float32)))
    ups = QuantExperts.from_dense(torch.from_numpy(rng.standard_normal((3, 8, 32)).astype(np.float32)))
    shared_gate, shared_up = (QuantLinear.from_dense(torch.from_numpy(rng.standard_normal((8, 32)).astype(np.float32)))
                              for _ in range(2))
    x = torch.from_numpy(rng.standard_normal((1, 32)).astype(np.float32))
    expected = torch.cat([shared_gate(x), shared_up(x)], dim=-1)
    odd = QuantLinear.from_dense(torch.zeros(8, 32, dtype=torch.bfloat16))
    group = ExpertGroup(gates, ups)
    assert not group.can_stack((shared_gate, odd)) and not group.fuse(shared=(shared_gate, odd))
    assert group.fused is None  # nothing changed
    assert group.fuse(shared=(shared_gate, shared_up)) and group.fused.n_experts == 4
    assert shared_gate.blocks.data_ptr() == group.fused.blocks[3].data_ptr()  # a view: no second copy
    torch.testing.assert_close(group.joined(x, torch.tensor([[3]]))[0, 0], expected[0])
