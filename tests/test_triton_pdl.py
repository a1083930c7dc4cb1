"""kernels/triton_pdl: programmatic dependent launch stays off where it cannot run, and a kernel compiled with
it waits for the previous grid before anything else (the PTX a Hopper runs, compiled here without a GPU).
That the model's decode kernels all take it, and compile with it, is checked in tests/test_fast_cuda.py;
that they decode the same with it on a GPU, in tests/test_cuda.py."""

import pytest
import torch

pytest.importorskip("triton")

from sm90 import run_compile_script  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen35.kernels import triton_pdl  # noqa: E402


@triton.jit
def add_one(x_ptr, USE_PDL: tl.constexpr):
    triton_pdl.wait_for_previous_kernel(USE_PDL)
    offsets = tl.arange(0, 16)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + 1)


def test_pdl_is_off_by_default_and_on_the_cpu(monkeypatch):
    assert triton_pdl.pdl_options(torch.device("cpu")) == {"USE_PDL": False, "launch_pdl": False}
    monkeypatch.setattr(triton_pdl, "ENABLED", True)
    assert triton_pdl.pdl_options(torch.device("cpu")) == {"USE_PDL": False, "launch_pdl": False}


COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from test_triton_pdl import add_one

report = {}
for use in (False, True):
    kernel = triton.compile(ASTSource(add_one, {"x_ptr": "*fp32", "USE_PDL": "constexpr"}, constexprs={(1,): use}),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, "launch_pdl": use})
    ptx = kernel.asm["ptx"]
    body = ptx[ptx.index("{", ptx.index(".entry")):]
    wait, load = body.find("griddepcontrol.wait"), body.find("ld.global")
    report[str(use)] = {"wait_first": 0 <= wait < load,
                        "waits": "griddepcontrol.wait" in ptx, "launches_next": "griddepcontrol.launch_dependents" in ptx,
                        "launch_pdl": kernel.metadata.launch_pdl}
print(json.dumps(report))
"""


def test_a_kernel_under_pdl_waits_before_its_first_load():
    report = run_compile_script(COMPILE)
    assert report["False"] == {"wait_first": False, "waits": False, "launches_next": False, "launch_pdl": False}
    assert report["True"] == {"wait_first": True, "waits": True, "launches_next": True, "launch_pdl": True}
