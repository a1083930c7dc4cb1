"""Where each weight of the network lives: all on one device, or split between a GPU and
system RAM the way llama.cpp's flags split it.

- `gpu_layers` (llama.cpp's `-ngl N`): the last N text layers go to the GPU, the others
  stay on the CPU; N above the layer count puts the output head (final norm, lm_head)
  on the GPU too. The token embedding sits with the first layer (it is only looked up).
- `cpu_moe_layers` (`--n-cpu-moe N`): the routed experts of the first N layers stay on
  the CPU, everything else on the GPU. For a MoE model that does not fit, this keeps far
  more of each token's reads on the GPU than a layer split (the experts are most of the
  bytes and only k of E are read per token).

The planner (plan/speed.py `place`) picks these numbers for a model and a card; the
network (model/qwen35.py) moves the hidden state between devices at the boundaries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from qwen35.errors import Qwen35Error
from qwen35.kernels.quant_linear import QuantLinear

CPU = torch.device("cpu")
_LAYER_WEIGHT = re.compile(r"(?:mtp\.)?layers\.(\d+)\.(.*)")


@dataclass(frozen=True)
class Split:
    device: torch.device
    gpu_layers: int | None = None
    cpu_moe_layers: int = 0

    def __post_init__(self):
        for name, value in (("gpu_layers", self.gpu_layers), ("cpu_moe_layers", self.cpu_moe_layers)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise Qwen35Error(f"{name} must be a whole number >= 0, got {value!r}")
        if self.device.type == "cpu" and (self.gpu_layers is not None or self.cpu_moe_layers):
            raise Qwen35Error("-ngl and --n-cpu-moe split a model between a GPU and the CPU: they need a GPU device")

    def layer_device(self, config, index: int) -> torch.device:
        if self.gpu_layers is None:
            return self.device
        return self.device if index >= config.num_layers - self.gpu_layers else CPU

    def expert_device(self, config, index: int) -> torch.device:
        return CPU if index < self.cpu_moe_layers else self.layer_device(config, index)

    def output_device(self, config) -> torch.device:
        if self.gpu_layers is None or self.gpu_layers > config.num_layers:
            return self.device
        return CPU

    def device_types(self, config) -> set[str]:
        layers = range(config.num_layers)
        devices = {self.layer_device(config, i) for i in layers} | {self.output_device(config)}
        if config.is_moe:
            devices |= {self.expert_device(config, i) for i in layers}
        return {d.type for d in devices}

    def device_of(self, config, name: str) -> torch.device:
        """The device of the weight with canonical name `name` (model/weight_specs.py)."""
        layer = _LAYER_WEIGHT.fullmatch(name)
        if name.startswith("mtp.") or name in ("norm", "lm_head"):
            # The MTP block reads the final hidden state and the lm_head: it sits with them.
            return self.output_device(config)
        if layer is None:  # embed_tokens
            return self.layer_device(config, 0)
        index, rest = int(layer.group(1)), layer.group(2)
        if rest.startswith("mlp.experts."):
            return self.expert_device(config, index)
        return self.layer_device(config, index)

    def place(self, config, weights: dict, mtp: dict, release=None, progress=None) -> tuple[dict, dict]:
        """The weights moved to their devices. A module shared by two names that land on two devices
        (a tied embedding and lm_head) gets a copy on the second. `release(tensor)` is called with the
        file bytes a module leaves behind on the CPU (to drop the map's pages: they are not read again);
        `progress(done, total)` with the bytes moved to a GPU so far. A GPU too small is a Qwen35Error."""
        try:
            return self._place(config, weights, mtp, release, progress)
        except torch.OutOfMemoryError:
            free, total = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else (0, 0)
            raise Qwen35Error(
                f"the model does not fit the GPU's memory ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free): "
                "keep part of it in RAM with -ngl N or --n-cpu-moe N (`qwen35 plan` shows a split that fits)"
            ) from None

    def _place(self, config, weights: dict, mtp: dict, release, progress) -> tuple[dict, dict]:
        placed_on: dict[int, torch.device] = {}
        moving = [w for group in (weights, mtp) for name, w in group.items()
                  if isinstance(w, nn.Module) and self.device_of(config, name).type != "cpu"]
        total, done = sum(w.blocks.nbytes for w in {id(w): w for w in moving}.values()), 0
        result = []
        for group in (weights, mtp):
            moved = {}
            for name, weight in group.items():
                device = self.device_of(config, name)
                if not isinstance(weight, nn.Module):
                    moved[name] = weight.to(device)
                    continue
                first = id(weight) not in placed_on
                if placed_on.setdefault(id(weight), device) != device:
                    moved[name] = _copy_linear(weight, device)
                    continue
                file_bytes = weight.blocks
                moved[name] = weight.to(device)  # a module moves in place
                if first and device.type != "cpu":
                    if release is not None:
                        release(file_bytes)
                    done += file_bytes.nbytes
                    if progress is not None:
                        progress(done, total)
            result.append(moved)
        return result[0], result[1]


def _copy_linear(module: QuantLinear, device: torch.device) -> QuantLinear:
    if not isinstance(module, QuantLinear):
        raise Qwen35Error("only a tied embedding and output can sit on two devices")
    return QuantLinear(module.blocks.to(device), module.type_id, module.out_features, module.in_features)


def planned_split(path, device: torch.device, context: int = 32768, parallel: int = 1, hardware=None) -> Split:
    """The split the planner picks for this file on this machine's GPU (Ollama's automatic offload):
    everything on the GPU when it fits with headroom, else --n-cpu-moe for MoE models, else -ngl.
    Only headers are read. `hardware`: a plan.hardware.Hardware (default: this machine's)."""
    from qwen35.plan.advisor import evaluate
    from qwen35.plan.estimator import Request
    from qwen35.plan.hardware import build_hardware
    from qwen35.plan.sources import load_gguf, load_hf

    if device.type != "cuda":
        return Split(device)
    path = str(path)
    loaded = load_hf(path) if os.path.isdir(path) else load_gguf([path])
    hardware = hardware if hardware is not None else build_hardware()
    placement = evaluate(loaded.spec, loaded.weights, loaded.mix, Request(ctx=context, parallel=parallel),
                         hardware).placement
    if placement is not None and placement.mode == "none":
        raise Qwen35Error(f"{path} does not fit this machine's GPU and RAM together")
    return split_for(placement, device)


def split_for(placement, device: torch.device) -> Split:
    """The Split that carries out a planner's Placement (plan/speed.py) on `device`."""
    if placement is None or placement.mode in ("full", "unified", "none"):
        return Split(device)
    if placement.mode == "n-cpu-moe":
        return Split(device, cpu_moe_layers=placement.cpu_moe_layers)
    return Split(device, gpu_layers=placement.gpu_layers + (1 if placement.output_on_gpu else 0))
