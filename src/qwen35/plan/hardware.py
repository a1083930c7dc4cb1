"""The machine a plan is for: a built-in table, forgiving names, flags, and detection.

Bandwidths are the vendors' peak figures (memory-and-speed.md); prefill throughput
uses dense FP16 tensor TFLOPS. A `Hardware` is what the planner needs: fast memory
(VRAM, or the GPU's share of unified memory, or RAM for a CPU-only machine), its
bandwidth, the system RAM behind it for partial offload, and a speed class whose
efficiency and per-layer cost `speed.py` calibrates.
"""

from __future__ import annotations

import difflib
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, replace

from qwen35.errors import Qwen35Error, UnknownNameError

GiB = 1024**3


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "gpu", "apple" or "cpu"
    memory_gib: float  # VRAM per GPU, unified memory, or (cpu) nothing: RAM is asked apart
    bandwidth_gbs: float
    tflops: float  # dense FP16 tensor throughput
    speed_class: str  # ampere, ada, blackwell, hopper, apple, cpu
    aliases: tuple[str, ...] = ()


GPUS: tuple[Device, ...] = (
    Device("RTX 3060 12GB", "gpu", 12, 360, 51, "ampere", ("3060",)),
    Device("RTX 4060 Ti 16GB", "gpu", 16, 288, 88, "ada", ("4060 ti", "4060ti")),
    Device("RTX 3090 24GB", "gpu", 24, 936, 71, "ampere", ("3090",)),
    Device("RTX 3090 Ti 24GB", "gpu", 24, 1008, 80, "ampere", ("3090 ti", "3090ti")),
    Device("RTX 4090 24GB", "gpu", 24, 1008, 165, "ada", ("4090",)),
    Device("RTX 5090 32GB", "gpu", 32, 1792, 210, "blackwell", ("5090",)),
    Device("RTX 6000 Ada 48GB", "gpu", 48, 960, 182, "ada", ("6000 ada", "rtx 6000")),
    Device("L40S 48GB", "gpu", 48, 864, 181, "ada", ("l40s",)),
    Device("A100 80GB SXM", "gpu", 80, 2039, 312, "ampere", ("a100", "a100 sxm")),
    Device("A100 80GB PCIe", "gpu", 80, 1935, 312, "ampere", ("a100 pcie",)),
    Device("H100 80GB SXM", "gpu", 80, 3350, 989, "hopper", ("h100", "h100 sxm")),
    Device("H100 80GB PCIe", "gpu", 80, 2000, 756, "hopper", ("h100 pcie",)),
    Device("H200 141GB", "gpu", 141, 4800, 989, "hopper", ("h200",)),
)

# Apple chips: (name, largest memory, {memory options: bandwidth}) -- binned parts are slower.
_APPLE = (
    ("M2 Max", 13.6, {32: 400, 64: 400, 96: 400}),
    ("M2 Ultra", 27.2, {64: 800, 128: 800, 192: 800}),
    ("M3 Max", 14.2, {36: 300, 48: 400, 64: 400, 96: 400, 128: 400}),
    ("M4 Max", 17.0, {36: 410, 48: 546, 64: 546, 128: 546}),
    ("M3 Ultra", 28.4, {96: 819, 256: 819, 512: 819}),
)

# CPUs by memory type (dual channel desktop); RAM size is asked apart.
CPU_MEMORY = {
    "ddr4-2666": 42.7,
    "ddr4-3200": 51.2,
    "ddr5-4800": 76.8,
    "ddr5-5600": 89.6,
    "ddr5-6400": 102.4,
}
CPU_TFLOPS = 1.0  # a desktop CPU's vector FP throughput, roughly
DEFAULT_CPU_MEMORY = "ddr4-3200"
EXTRA_GPU_BYTES = 768 * 1024**2  # CUDA context and compute buffer of each GPU after the first


@dataclass(frozen=True)
class Hardware:
    """The machine: `fast_bytes` is where the whole model should live; `ram_bytes` backs offload."""

    description: str
    kind: str  # "gpu", "apple", "cpu"
    gpu: Device | None
    n_gpus: int
    fast_bytes: int  # usable VRAM over all GPUs, GPU share of unified memory, or usable RAM
    bandwidth_gbs: float  # of the fast memory
    tflops: float
    speed_class: str
    ram_bytes: int  # system RAM (0 when unknown)
    cpu_bandwidth_gbs: float
    cpu_memory: str
    source: str  # "flags", "detected" or "table"
    notes: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        return {"gpu": "cuda", "apple": "metal"}.get(self.kind, "cpu")


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("geforce", "").replace("nvidia", "").replace("rtx", ""))


def _apple_lookup(text: str) -> Device | None:
    words = text.lower()
    for name, tflops, options in _APPLE:
        if _key(name) in _key(words):
            rest = re.sub(r"m\d+\s*(max|ultra)", " ", words)
            sizes = [int(n) for n in re.findall(r"\d+", rest)]
            memory = sizes[0] if sizes else max(options)
            known = sorted(options)
            pick = min(known, key=lambda m: (m < memory, abs(m - memory)))
            bandwidth = options[pick]
            return Device(f"Apple {name} {memory}GB", "apple", memory, bandwidth, tflops, "apple")
    return None


def _all_names() -> list[str]:
    return [a for d in GPUS for a in d.aliases] + [f"{name.lower()} {max(o)}" for name, _, o in _APPLE]


def find_device(text: str) -> Device:
    """A GPU or Apple chip by a forgiving name: '3090', 'rtx 4090', 'RTX 4060 Ti', 'm4 max 128'."""
    if not text or not text.strip():
        raise UnknownNameError("empty GPU name")
    apple = _apple_lookup(text)
    if apple:
        return apple
    key = _key(text)
    candidates = []
    for device in GPUS:
        keys = [_key(device.name)] + [_key(a) for a in device.aliases]
        if key in keys:
            return device
        if len(key) >= 3 and any(k.startswith(key) or key.startswith(k) for k in keys):
            candidates.append(device)
    # '3090' names the plain 3090 over the 3090 Ti; 'a100' the SXM part: the first listed wins.
    exact_alias = [d for d in candidates if key in [_key(a) for a in d.aliases]]
    if exact_alias:
        return exact_alias[0]
    if candidates:
        best = min(candidates, key=lambda d: abs(len(_key(d.aliases[0])) - len(key)))
        return best
    close = difflib.get_close_matches(text.lower().replace("rtx ", ""), _all_names(), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    known = ", ".join(d.aliases[0] for d in GPUS) + ", m2/m3/m4 max or ultra with memory size"
    raise UnknownNameError(f"unknown GPU {text!r}: {hint}known: {known} (or give --vram GB)")


def apple_gpu_share(memory_gib: float) -> float:
    """macOS lets the GPU wire about 2/3 of unified memory up to 36 GB, about 3/4 above."""
    return 0.75 if memory_gib > 36 else 0.67


def usable_ram(ram_bytes: int) -> int:
    """RAM a CPU-only run can take: leave the OS and other programs a tenth and 2 GiB."""
    return max(0, int(ram_bytes * 0.9) - 2 * GiB)


def _check_size(value: float | None, what: str, limit: float) -> None:
    if value is not None and not (0 < value <= limit):
        raise Qwen35Error(f"{what} must be a positive number of GB up to {limit:g}, not {value:g}")


def build_hardware(
    gpu: str | None = None,
    vram_gb: float | None = None,
    ram_gb: float | None = None,
    gpus: int | None = None,
    ram_type: str | None = None,
    detect: bool = True,
) -> Hardware:
    """Hardware from the flags; what they leave out is detected on this machine."""
    _check_size(vram_gb, "--vram", 4096)
    _check_size(ram_gb, "--ram", 65536)
    if gpus is not None and not 1 <= gpus <= 64:
        raise Qwen35Error(f"--gpus must be between 1 and 64, not {gpus}")
    if gpus is not None and gpu is None and vram_gb is None and not detect:
        raise Qwen35Error("--gpus needs --gpu NAME or --vram GB to say which GPUs")
    cpu_memory = (ram_type or DEFAULT_CPU_MEMORY).lower()
    if cpu_memory not in CPU_MEMORY:
        close = difflib.get_close_matches(cpu_memory, list(CPU_MEMORY), n=2, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UnknownNameError(f"unknown RAM type {ram_type!r}: {hint}known: {', '.join(CPU_MEMORY)}")
    notes = []
    if ram_type is None:
        notes.append(f"system RAM bandwidth is a generic guess ({cpu_memory}, dual channel, "
                     f"{CPU_MEMORY[cpu_memory]:g} GB/s): give --ram-type to change it")
    detected = detect_machine() if detect and (gpu is None and vram_gb is None or ram_gb is None) else {}
    ram_bytes = int(ram_gb * GiB) if ram_gb is not None else detected.get("ram_bytes", 0)
    base = dict(ram_bytes=ram_bytes, cpu_bandwidth_gbs=CPU_MEMORY[cpu_memory], cpu_memory=cpu_memory)

    device = find_device(gpu) if gpu else None
    source = "flags"
    if device is None and vram_gb is None and detected.get("gpu_name"):
        source = "detected"
        try:
            device = find_device(detected["gpu_name"])
        except UnknownNameError:
            device = None
            notes.append(f"GPU {detected['gpu_name']!r} is not in the table: bandwidth guessed")
        vram_gb = detected.get("gpu_memory_gib")
        gpus = gpus or detected.get("gpu_count", 1)
    if device is None and vram_gb is None and detected.get("apple_chip"):
        source = "detected"
        device = _apple_lookup(f"{detected['apple_chip']} {round(ram_bytes / GiB)}")
    if device is not None and device.kind == "apple":
        memory = ram_gb if ram_gb is not None else device.memory_gib
        share = apple_gpu_share(memory)
        return Hardware(
            description=f"{device.name} ({share:.0%} of unified memory for the GPU)", kind="apple", gpu=device,
            n_gpus=1, fast_bytes=int(memory * GiB * share), bandwidth_gbs=device.bandwidth_gbs, tflops=device.tflops,
            speed_class="apple", source=source, notes=tuple(n for n in notes if "RAM bandwidth" not in n),
            **{**base, "ram_bytes": int(memory * GiB)},
        )
    if device is not None or vram_gb is not None:
        n = gpus or 1
        if device is None:
            # Only a size: assume a mid-range card of the era with that much memory.
            device = Device(f"GPU {vram_gb:g}GB", "gpu", vram_gb, 900 if vram_gb >= 20 else 400, 70, "ampere")
            notes.append("no GPU model given: bandwidth assumed "
                         f"{device.bandwidth_gbs:g} GB/s (give --gpu NAME for a better speed estimate)")
        per_gpu = vram_gb if vram_gb is not None else device.memory_gib
        device = replace(device, memory_gib=per_gpu)
        label = f"{n}x {device.name}" if n > 1 else device.name
        # llama.cpp splits layers across GPUs and runs them one after another: bandwidth and
        # FLOPS per token stay those of one card, and every extra card needs its own context and buffers.
        fast = int(per_gpu * GiB * n - (n - 1) * EXTRA_GPU_BYTES)
        return Hardware(
            description=label, kind="gpu", gpu=device, n_gpus=n, fast_bytes=fast,
            bandwidth_gbs=device.bandwidth_gbs, tflops=device.tflops, speed_class=device.speed_class,
            source=source, notes=tuple(notes), **base,
        )
    if gpus is not None:
        raise Qwen35Error("--gpus given but no GPU found: add --gpu NAME or --vram GB")
    if not ram_bytes:
        raise Qwen35Error("no hardware given and none detected: pass --gpu NAME, --vram GB or --ram GB")
    notes.append("no GPU found: the plan is for the CPU and system RAM")
    return Hardware(
        description=f"CPU only, {ram_bytes / GiB:.0f} GiB RAM ({cpu_memory})", kind="cpu", gpu=None, n_gpus=0,
        fast_bytes=usable_ram(ram_bytes), bandwidth_gbs=CPU_MEMORY[cpu_memory], tflops=CPU_TFLOPS,
        speed_class="cpu", source="detected" if ram_gb is None else "flags", notes=tuple(notes), **base,
    )


def detect_machine() -> dict:
    """What this machine has: NVIDIA GPUs (nvidia-smi, else torch if a driver is present), RAM, Apple chip."""
    found: dict = {}
    try:
        import psutil

        found["ram_bytes"] = int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or refusing: RAM unknown is fine
        pass
    if platform.system() == "Darwin":
        chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        memsize = _run(["sysctl", "-n", "hw.memsize"])
        if chip and "Apple" in chip:
            found["apple_chip"] = chip.replace("Apple", "").strip()
        if memsize and memsize.isdigit():
            found["ram_bytes"] = int(memsize)
        return found
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
        rows = [line.split(",") for line in (out or "").splitlines() if "," in line]
        if rows:
            try:
                found["gpu_name"] = rows[0][0].strip()
                found["gpu_memory_gib"] = float(rows[0][1]) / 1024
                found["gpu_count"] = len(rows)
            except ValueError:
                found.pop("gpu_name", None)
    elif os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia"):
        found.update(_torch_gpus())
    return found


def _torch_gpus() -> dict:
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        props = torch.cuda.get_device_properties(0)
        return {"gpu_name": props.name, "gpu_memory_gib": props.total_memory / GiB,
                "gpu_count": torch.cuda.device_count()}
    except Exception:  # a broken driver must not stop a plan
        return {}


def _run(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=3, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
