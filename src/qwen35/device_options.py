"""The device flags that `run`, `serve` and `bench` share, with llama.cpp's names and meanings.

--device auto (default) takes a CUDA GPU when torch sees one, else the CPU. On a GPU, the
whole model goes there when it fits; when it does not, the planner picks the split that
does (Ollama's automatic offload), in llama.cpp's own terms: -ngl N (the last N layers on
the GPU) or --n-cpu-moe N (the routed experts of the first N layers in system RAM), and
either flag given on the command line overrides the pick. Without a GPU, the two flags
are ignored with a note, as llama.cpp's CPU builds ignore -ngl.
"""

from __future__ import annotations

import sys

from qwen35.errors import Qwen35Error


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=None, dest="gpu_layers", metavar="N",
                        help="GPU: keep only the last N layers there (more than the layers: the output head too); "
                             "default: all that fit, as the planner splits")
    parser.add_argument("--n-cpu-moe", type=int, default=None, dest="cpu_moe_layers", metavar="N",
                        help="GPU: keep the routed experts of the first N layers in system RAM")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise Qwen35Error(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise Qwen35Error(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Qwen35Error(f"--device {name}: torch sees no CUDA GPU here")
    return device


def load_options(args, path, context: int = 32768, parallel: int = 1, command: str = "qwen35") -> dict:
    """load_model's device keywords for these flags."""
    from qwen35.model.placement import planned_split

    for flag, value in (("-ngl", args.gpu_layers), ("--n-cpu-moe", args.cpu_moe_layers)):
        if value is not None and value < 0:
            raise Qwen35Error(f"{flag} must not be negative, got {value}")
    device = resolve_device(args.device)
    if device.type == "cpu":
        if args.gpu_layers or args.cpu_moe_layers:
            print(f"{command}: -ngl/--n-cpu-moe ignored: the model runs on the CPU", file=sys.stderr, flush=True)
        return {"device": device}
    if args.gpu_layers is None and args.cpu_moe_layers is None:
        split = planned_split(path, device, context, parallel)
        if split.gpu_layers is not None or split.cpu_moe_layers:
            flag = f"-ngl {split.gpu_layers}" if split.gpu_layers is not None else f"--n-cpu-moe {split.cpu_moe_layers}"
            print(f"{command}: the model does not fit the GPU whole: running it split as {flag}",
                  file=sys.stderr, flush=True)
        return {"device": device, "gpu_layers": split.gpu_layers, "cpu_moe_layers": split.cpu_moe_layers}
    return {"device": device, "gpu_layers": args.gpu_layers, "cpu_moe_layers": args.cpu_moe_layers or 0}
