"""Splitting a model between a GPU and the CPU the way llama.cpp's -ngl and --n-cpu-moe do
(model/placement.py). Where each weight goes is checked here; tests/test_cuda.py runs split
models on a GPU against the fixtures' logits."""

import json

import pytest
import torch

from qwen35.errors import Qwen35Error
from qwen35.model.config import config_from_gguf
from qwen35.model.placement import Split, split_for
from qwen35.plan.speed import Placement

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module")
def configs(fixtures):
    from qwen35.formats.gguf import GGUFModel

    out = {}
    for name in ("dense", "moe"):
        with GGUFModel(fixtures / "tiny" / f"{name}-Q4_K_M.gguf") as gguf:
            out[name] = config_from_gguf(gguf.metadata, gguf.tensors, name)
    return out


def test_ngl_puts_the_last_layers_on_the_gpu_as_llamacpp_does(configs):
    config = configs["dense"]  # 8 layers
    split = Split(CUDA, gpu_layers=3)
    assert [split.device_of(config, f"layers.{i}.input_layernorm") for i in range(8)] == [CPU] * 5 + [CUDA] * 3
    assert split.device_of(config, "embed_tokens") == CPU  # looked up on the CPU, like llama.cpp's token_embd
    assert split.device_of(config, "lm_head") == split.device_of(config, "norm") == CPU
    # One more than the layers: the output head goes to the GPU too (llama.cpp's -ngl layers+1).
    whole = Split(CUDA, gpu_layers=9)
    assert whole.device_of(config, "lm_head") == whole.device_of(config, "embed_tokens") == CUDA
    assert Split(CUDA, gpu_layers=0).device_types(config) == {"cpu"}


def test_n_cpu_moe_keeps_only_the_first_layers_routed_experts_on_the_cpu(configs):
    config = configs["moe"]  # 4 layers
    split = Split(CUDA, cpu_moe_layers=2)
    for i in range(4):
        expected = CPU if i < 2 else CUDA
        assert split.device_of(config, f"layers.{i}.mlp.experts.gate") == expected
        assert split.device_of(config, f"layers.{i}.mlp.shared_expert.up_proj") == CUDA
        assert split.device_of(config, f"layers.{i}.mlp.gate") == CUDA  # the router
    assert split.device_of(config, "lm_head") == CUDA
    assert split.device_types(config) == {"cpu", "cuda"}


def test_bad_splits_are_refused():
    with pytest.raises(Qwen35Error, match="need a GPU"):
        Split(CPU, gpu_layers=3)
    with pytest.raises(Qwen35Error, match="whole number"):
        Split(CUDA, cpu_moe_layers=-1)


def test_the_planners_placement_becomes_the_same_flags():
    ngl = Placement("ngl", gpu_layers=30, cpu_moe_layers=0, output_on_gpu=False, fast_bytes_used=0, ram_bytes_used=0)
    assert split_for(ngl, CUDA) == Split(CUDA, gpu_layers=30)
    assert ngl.flag == "-ngl 30"
    head = Placement("ngl", 64, 0, True, 0, 0)
    assert split_for(head, CUDA).gpu_layers == 65 and head.flag == "-ngl 65"
    moe = Placement("n-cpu-moe", 40, 12, True, 0, 0)
    assert split_for(moe, CUDA) == Split(CUDA, cpu_moe_layers=12) and moe.flag.endswith("--n-cpu-moe 12")
    assert split_for(Placement("full", 40, 0, True, 0, 0), CUDA) == Split(CUDA)


def test_a_cpu_model_loads_as_before(fixtures):
    import qwen35

    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf", precision="reference")
    assert model.network.devices == {CPU} and model.device == CPU
    ids = json.loads((fixtures / "ref" / "moe.json").read_text())["sequences"]["text"]["ids"][:8]
    assert model.logits(ids).shape == (8, model.config.vocab_size)


def test_device_flags_without_a_gpu(fixtures, capsys):
    import argparse

    from qwen35.device_options import add_device_arguments, load_options, resolve_device

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    model = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    if not torch.cuda.is_available():
        args = parser.parse_args(["-ngl", "99"])  # the habit of llama.cpp users: ignored on the CPU, with a note
        assert load_options(args, model) == {"device": CPU}
        assert "ignored" in capsys.readouterr().err
        with pytest.raises(Qwen35Error, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(Qwen35Error, match="only cpu and cuda"):
        resolve_device("meta")
    with pytest.raises(Qwen35Error, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(Qwen35Error, match="negative"):
        load_options(parser.parse_args(["--n-cpu-moe", "-2"]), model)


def test_a_gpu_too_small_is_one_clear_error(configs, monkeypatch):
    """Weights that do not fit: a Qwen35Error naming the flags that split the model, not a CUDA traceback."""
    from torch import nn

    from qwen35.kernels.quant_linear import QuantLinear

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(nn.Module, "to", out_of_memory)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 << 30, 24 << 30))
    weights = {"embed_tokens": QuantLinear.from_dense(torch.zeros(4, 8))}
    with pytest.raises(Qwen35Error, match=r"does not fit the GPU's memory \(2.0 of 24.0 GiB free\).*-ngl"):
        Split(CUDA).place(configs["dense"], weights, {})
