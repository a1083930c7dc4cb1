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
    num_warps = constants.pop("num_warps")
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
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
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
