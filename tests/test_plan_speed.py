"""Speed, offload and hardware: against the published llama.cpp points in memory-and-speed.md."""

import os
import stat

import pytest

from qwen35.errors import Qwen35Error, UnknownNameError
from qwen35.plan import hardware as hw_module
from qwen35.plan.advisor import evaluate_catalog
from qwen35.plan.catalog import find_model
from qwen35.plan.estimator import GiB, Request
from qwen35.plan.hardware import build_hardware, detect_machine, find_device
from qwen35.plan.speed import headroom_bytes


def decode(model: str, gpu: str, quant: str = "Q4_K_M", ctx: int = 4096, **flags) -> float:
    hardware = build_hardware(gpu=gpu, detect=False, ram_gb=64, **flags)
    candidate = evaluate_catalog(find_model(model), quant, Request(ctx=ctx, backend=hardware.backend), hardware)
    assert candidate.fits
    return candidate.decode


# Published llama.cpp decode speeds, Q4_K_M (memory-and-speed.md).
@pytest.mark.parametrize("model, gpu, low, high", [
    ("35b-a3b", "3090", 111, 111),
    ("27b", "3090", 32, 34),
    ("27b", "4090", 48, 48),
    ("35b-a3b", "5090", 165, 223),
    ("27b", "5090", 50, 72),
])
def test_decode_matches_published_points(model, gpu, low, high):
    assert low * 0.85 <= decode(model, gpu) <= high * 1.15


def test_small_active_moe_is_far_below_its_bandwidth_bound():
    # "small-active MoE much lower (Qwen3.6-35B-A3B on 3090 ~0.20-0.25 of peak)": fixed per-layer costs dominate.
    hardware = build_hardware(gpu="3090", detect=False, ram_gb=64)
    candidate = evaluate_catalog(find_model("35b-a3b"), "Q4_K_M", Request(ctx=4096), hardware)
    achieved = candidate.speed.bytes_per_token * candidate.decode / (hardware.bandwidth_gbs * 1e9)
    assert 0.15 <= achieved <= 0.35


def test_context_read_slows_decode_only_when_it_is_long():
    hardware = build_hardware(gpu="4090", detect=False, ram_gb=64)
    short = evaluate_catalog(find_model("35b-a3b"), "Q4_K_M", Request(ctx=4096), hardware).speed
    long = evaluate_catalog(find_model("35b-a3b"), "Q4_K_M", Request(ctx=131072), hardware).speed
    assert short.decode_tok_s_at_context > 0.97 * short.decode_tok_s  # 80 MiB of K/V: noise
    assert long.decode_tok_s_at_context < 0.8 * long.decode_tok_s  # 2.5 GiB of K/V: more than the active weights


def test_dense_partial_offload_uses_ngl_and_fits_the_budget():
    hardware = build_hardware(gpu="4060 ti", detect=False, ram_gb=64)
    candidate = evaluate_catalog(find_model("27b"), "Q4_K_M", Request(ctx=32768), hardware)
    placement = candidate.placement
    assert placement.mode == "ngl" and 0 < placement.gpu_layers < 64
    assert placement.fast_bytes_used <= hardware.fast_bytes - headroom_bytes(hardware.fast_bytes)
    assert placement.flag == f"-ngl {placement.gpu_layers}"
    on_gpu = decode("27b", "3090", ctx=32768)
    assert candidate.decode < on_gpu  # the CPU part is slower


def test_moe_partial_offload_keeps_experts_of_the_first_layers_in_ram():
    hardware = build_hardware(gpu="3090", detect=False, ram_gb=128)
    candidate = evaluate_catalog(find_model("122b-a10b"), "Q4_K_M", Request(ctx=32768), hardware)
    placement = candidate.placement
    assert placement.mode == "n-cpu-moe" and 0 < placement.cpu_moe_layers <= 48
    assert placement.flag == f"-ngl 999 --n-cpu-moe {placement.cpu_moe_layers}"
    # One layer fewer on the CPU would not fit.
    experts = candidate.weights.expert_layer_bytes()
    budget = hardware.fast_bytes - headroom_bytes(hardware.fast_bytes)
    assert placement.fast_bytes_used <= budget < placement.fast_bytes_used + experts[placement.cpu_moe_layers - 1]
    assert 3 < candidate.decode < 40


def test_too_little_ram_for_the_offloaded_part_means_it_does_not_run():
    hardware = build_hardware(gpu="3090", detect=False, ram_gb=16)
    candidate = evaluate_catalog(find_model("397b-a17b"), "Q4_K_M", Request(ctx=4096), hardware)
    assert not candidate.runs and candidate.speed is None


# --- hardware --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("3090", "RTX 3090 24GB"), ("rtx 4090", "RTX 4090 24GB"), ("RTX 4060 Ti", "RTX 4060 Ti 16GB"),
    ("NVIDIA GeForce RTX 5090", "RTX 5090 32GB"), ("h100", "H100 80GB SXM"), ("H100 PCIe", "H100 80GB PCIe"),
    ("m4 max 128", "Apple M4 Max 128GB"), ("M2 Ultra 192GB", "Apple M2 Ultra 192GB"),
])
def test_gpu_names_are_forgiving(name, expected):
    assert find_device(name).name == expected


def test_apple_bandwidth_depends_on_the_binned_part():
    assert find_device("m4 max 36").bandwidth_gbs == 410
    assert find_device("m4 max 128").bandwidth_gbs == 546
    assert find_device("m3 max 36").bandwidth_gbs == 300


def test_unknown_gpu_suggests_close_names():
    with pytest.raises(UnknownNameError, match="3090"):
        find_device("3080")


def test_apple_gpu_gets_about_three_quarters_of_unified_memory():
    apple = build_hardware(gpu="m4 max 128", detect=False)
    assert apple.kind == "apple"
    assert 0.65 * 128 * GiB <= apple.fast_bytes <= 0.75 * 128 * GiB


def test_two_gpus_add_memory_not_bandwidth():
    one = build_hardware(gpu="3090", detect=False, ram_gb=64)
    two = build_hardware(gpu="3090", gpus=2, detect=False, ram_gb=64)
    assert one.fast_bytes < two.fast_bytes < 2 * one.fast_bytes
    assert two.bandwidth_gbs == one.bandwidth_gbs


@pytest.mark.parametrize("flags", [dict(vram_gb=0), dict(vram_gb=-4), dict(ram_gb=1e9), dict(gpu="3090", gpus=0)])
def test_absurd_hardware_flags_are_refused(flags):
    with pytest.raises(Qwen35Error):
        build_hardware(detect=False, **flags)


def _fake_command(folder, name, output):
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_detects_nvidia_gpus_with_nvidia_smi(tmp_path, monkeypatch):
    _fake_command(tmp_path, "nvidia-smi", "NVIDIA GeForce RTX 4090, 24564\nNVIDIA GeForce RTX 4090, 24564")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(hw_module.platform, "system", lambda: "Linux")
    found = detect_machine()
    assert found["gpu_name"] == "NVIDIA GeForce RTX 4090" and found["gpu_count"] == 2
    hardware = build_hardware(ram_gb=64)
    assert hardware.kind == "gpu" and hardware.gpu.name == "RTX 4090 24GB" and hardware.n_gpus == 2
    assert hardware.source == "detected"


def test_detects_an_apple_chip_with_sysctl(monkeypatch):
    answers = {"machdep.cpu.brand_string": "Apple M4 Max", "hw.memsize": str(128 * GiB)}
    monkeypatch.setattr(hw_module.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hw_module, "_run", lambda command: answers.get(command[-1]))
    hardware = build_hardware()
    assert hardware.kind == "apple" and hardware.bandwidth_gbs == 546
    assert hardware.ram_bytes == 128 * GiB


def test_without_a_gpu_the_plan_is_for_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(hw_module.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hw_module.os.path, "exists", lambda path: False)
    hardware = build_hardware()
    assert hardware.kind == "cpu" and hardware.ram_bytes > 0
    assert any("generic guess" in note for note in hardware.notes)


# --- forced splits (placement_for_flags), against gguf-py's own tensor sizes -------------------


def _gguf_py_layer_bytes(path) -> tuple[dict, dict, float]:
    """Per layer: expert bytes and all bytes of blk.<i>, and top-k / E, as gguf-py's reader gives them."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    share = reader.fields["qwen35moe.expert_used_count"].contents() / reader.fields["qwen35moe.expert_count"].contents()
    experts: dict[int, int] = {}
    layers: dict[int, int] = {}
    for tensor in reader.tensors:
        if tensor.name.startswith("blk."):
            index = int(tensor.name.split(".")[1])
            layers[index] = layers.get(index, 0) + int(tensor.n_bytes)
            if "_exps." in tensor.name:
                experts[index] = experts.get(index, 0) + int(tensor.n_bytes)
    return experts, layers, share


@pytest.mark.parametrize("n_cpu_moe", [1, 3, 4])
def test_n_cpu_moe_moves_the_first_layers_experts_top_k_share_to_the_ram_side(fixtures, n_cpu_moe):
    from qwen35.plan.estimator import estimate_memory
    from qwen35.plan.sources import load_gguf
    from qwen35.plan.speed import estimate_speed, placement_for_flags

    path = fixtures / "tiny" / "moe-Q4_K_M.gguf"
    loaded = load_gguf([str(path)])
    hardware = build_hardware(gpu="h100", detect=False, ram_gb=128)
    memory = estimate_memory(loaded.spec, loaded.weights, Request(ctx=4096))

    def speed(**flags):
        placement = placement_for_flags(loaded.spec, loaded.weights, memory, hardware, **flags)
        return placement, estimate_speed(loaded.spec, loaded.weights, memory, hardware, placement)

    whole_placement, whole = speed()
    split_placement, split = speed(cpu_moe_layers=n_cpu_moe)
    experts, _, share = _gguf_py_layer_bytes(path)
    moved_per_token = sum(experts[i] for i in range(n_cpu_moe)) * share
    assert split.ram_bytes_per_token - whole.ram_bytes_per_token == pytest.approx(moved_per_token, abs=2)
    assert whole.fast_bytes_per_token - split.fast_bytes_per_token == pytest.approx(moved_per_token, abs=2)
    moved = sum(experts[i] for i in range(n_cpu_moe))
    assert split_placement.ram_bytes_used - whole_placement.ram_bytes_used == moved
    assert split_placement.flag == f"-ngl 999 --n-cpu-moe {n_cpu_moe}"
    assert split.decode_tok_s < whole.decode_tok_s  # RAM is slower than HBM
    # With no flags the forced placement is the one the planner picks for a model that fits.
    from qwen35.plan.speed import place

    assert whole_placement == place(loaded.spec, loaded.weights, memory, hardware)


def test_ngl_moves_the_first_layers_and_the_output_head_to_the_ram_side(fixtures):
    from gguf import GGUFReader

    from qwen35.plan.estimator import estimate_memory
    from qwen35.plan.sources import load_gguf
    from qwen35.plan.speed import estimate_speed, placement_for_flags

    path = fixtures / "tiny" / "moe-Q4_K_M.gguf"
    loaded = load_gguf([str(path)])
    hardware = build_hardware(gpu="h100", detect=False, ram_gb=128)
    memory = estimate_memory(loaded.spec, loaded.weights, Request(ctx=4096))
    experts, layers, share = _gguf_py_layer_bytes(path)
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    head = sizes["output.weight"] + sizes["output_norm.weight"]
    whole = estimate_speed(loaded.spec, loaded.weights, memory, hardware,
                           placement_for_flags(loaded.spec, loaded.weights, memory, hardware, gpu_layers=5))
    placement = placement_for_flags(loaded.spec, loaded.weights, memory, hardware, gpu_layers=2)
    split = estimate_speed(loaded.spec, loaded.weights, memory, hardware, placement)
    # -ngl 2 of 4 layers: blk.0 and blk.1 (experts at top-k / E) and the output head are read from RAM.
    moved = sum(layers[i] - experts[i] + experts[i] * share for i in (0, 1)) + head
    assert split.ram_bytes_per_token - whole.ram_bytes_per_token == pytest.approx(moved, abs=2)
    assert (placement.mode, placement.gpu_layers, placement.output_on_gpu) == ("ngl", 2, False)
    assert placement.flag == "-ngl 2"
    assert split.decode_tok_s < whole.decode_tok_s


@pytest.mark.parametrize("flags", [{"gpu_layers": -1}, {"cpu_moe_layers": 1.5}, {"cpu_moe_layers": True}])
def test_forced_split_flags_must_be_whole_numbers(fixtures, flags):
    from qwen35.plan.estimator import estimate_memory
    from qwen35.plan.sources import load_gguf
    from qwen35.plan.speed import placement_for_flags

    loaded = load_gguf([str(fixtures / "tiny" / "moe-Q4_K_M.gguf")])
    memory = estimate_memory(loaded.spec, loaded.weights, Request(ctx=4096))
    with pytest.raises(Qwen35Error, match="whole number"):
        placement_for_flags(loaded.spec, loaded.weights, memory, build_hardware(gpu="h100", detect=False, ram_gb=64),
                            **flags)
