"""Compiling Triton kernels for an H100 (sm_90) with Triton's own compiler, no GPU needed.

The interpreter never runs a kernel's GPU-only branches (a loop to a loaded bound, bf16 tensor-core
products); these helpers compile them as the GPU would and report what the compiler made. The
compiling runs in a separate process without TRITON_INTERPRET, which otherwise swaps kernels for
interpreted ones when they are defined.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def compile_report(fn, constants: dict, pointer_types: dict, aligned: set) -> dict:
    """Compile `fn` with these constexprs (and "num_warps"): {"stack": spilled bytes, "mma": tensor-core ops}.
    Pointers are fp32 unless `pointer_types` says; ints in `aligned` are taken as multiples of 16, as
    Triton's launcher finds torch's strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = dict(constants)
    options = {"num_warps": constants.pop("num_warps")}
    if "enable_fp_fusion" in constants:
        options["enable_fp_fusion"] = constants.pop("enable_fp_fusion")
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in ("eps", "qk_scale") else "i32"
        if name.endswith("_ptr") or name in aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    return {"stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "mma": sorted(set(re.findall(r"mma\.sync\S*", kernel.asm["ptx"])))}


def run_compile_script(script: str) -> dict:
    """Run `script` (which prints one JSON line last) without the interpreter; skip where Triton's NVIDIA
    tools are missing."""
    triton = pytest.importorskip("triton")
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, tool)) for tool in ("ptxas", "cuobjdump")):
        pytest.skip("Triton's NVIDIA tools (ptxas, cuobjdump) are not installed")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    here = str(Path(__file__).resolve().parent)
    environment["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [environment.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_POINTER_TYPES = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "int32": "*i32", "int64": "*i64",
                  "uint8": "*u8", "int8": "*i8", "int16": "*i16", "bool": "*i1"}


# Constants the wrappers set only under the interpreter, and what they pass on a GPU instead.
GPU_CONSTANTS = {"DOT_IN_FP32": False, "INTERPRETED_CHUNKS": 0, "INTERPRETED_SPAN": 0}


def describe_launch(fn, args: tuple, kwargs: dict) -> dict:
    """One interpreted launch as what Triton's launcher would compile on a GPU: the kernel, its argument
    types, its constexprs (and ints equal to 1, which Triton specialises), which pointers and ints are
    multiples of 16, and the launch options."""
    import inspect

    import torch

    params = inspect.signature(fn).parameters
    values = {**dict(zip(params, args)), **{k: v for k, v in kwargs.items() if k in params}}
    launch = {"module": fn.__module__, "name": fn.__name__, "signature": {}, "constants": {}, "aligned": [],
              "options": {k: v for k, v in kwargs.items() if k not in params}}
    for name, parameter in params.items():
        value = values.get(name, parameter.default)
        if "constexpr" in str(parameter.annotation) or value is None or (type(value) is int and value == 1):
            launch["signature"][name] = "constexpr"
            launch["constants"][name] = GPU_CONSTANTS.get(name, value)
        elif isinstance(value, torch.Tensor):
            launch["signature"][name] = _POINTER_TYPES[str(value.dtype).removeprefix("torch.")]
            if value.data_ptr() % 16 == 0:
                launch["aligned"].append(name)
        elif isinstance(value, bool):
            launch["signature"][name] = "i1"
        elif isinstance(value, int):
            launch["signature"][name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                launch["aligned"].append(name)
        elif isinstance(value, float):
            launch["signature"][name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return launch


def record_launches(monkeypatch) -> dict:
    """Every distinct Triton launch made in the interpreter from now on, described by describe_launch."""
    import json

    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launch = describe_launch(self.fn, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


COMPILE_LAUNCHES = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = {}
variants = []
for index, launch in enumerate(json.load(open(sys.argv[1]))):
    variants.append((index, launch))
    if launch["constants"].get("USE_PDL") is False:  # and as a Hopper launches it with PDL on
        variants.append((index, {**launch, "constants": {**launch["constants"], "USE_PDL": True},
                                 "options": {**launch["options"], "launch_pdl": True}}))
for index, launch in variants:
    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    names = list(launch["signature"])
    options = {k: v for k, v in launch["options"].items()
               if k in ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl")}
    label = f"{index}: {launch['name']} {json.dumps(launch['constants'], sort_keys=True)} {options}"
    try:
        source = ASTSource(fn, launch["signature"],
                           constexprs={(names.index(k),): v for k, v in launch["constants"].items()},
                           attrs={(names.index(k),): [["tt.divisibility", 16]] for k in launch["aligned"]})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
        results[label] = {"stack": int(re.search(r"STACK:(\d+)", usage).group(1))}
        waits = "griddepcontrol.wait" in kernel.asm["ptx"]
        if waits != bool(launch["constants"].get("USE_PDL")) or waits != bool(kernel.metadata.launch_pdl):
            results[label]["pdl"] = f"waits {waits}, launched with PDL {kernel.metadata.launch_pdl}"
    except Exception as error:
        results[label] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
print(json.dumps(results))
"""


def compile_launches(launches: dict) -> dict:
    """Compile each recorded launch for an H100 (sm_90) in a separate process: label -> {"stack"} or {"error"}
    (and {"pdl"} where a kernel taking USE_PDL does not wait as launched). A launch with USE_PDL off is also
    compiled with it on, as a Hopper runs it under triton_pdl.ENABLED."""
    import json

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as listing:
        json.dump(list(launches.values()), listing)
    try:
        return run_compile_script(COMPILE_LAUNCHES.replace("sys.argv[1]", repr(listing.name)))
    finally:
        os.unlink(listing.name)
