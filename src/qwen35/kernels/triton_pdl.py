"""Programmatic dependent launch (PDL) for the decode step's kernels, on Hopper GPUs and later.

A one-token step of the 35B-A3B is about 250 short launches replayed from a CUDA graph, and between two
of them the GPU idles while the next grid is launched and its blocks scheduled. With PDL the next
kernel is launched while the current one drains; its blocks start, wait on the GPU (`griddepcontrol.wait`)
until the previous grid has finished and its writes are visible, and only then read anything. Every
kernel here waits before its first load, so the order of reads and writes is exactly that of plain
launches: what PDL hides is the launch gap, not any dependency. A kernel launched after a torch op
(cuBLAS, a copy) just starts when that op ends, as without PDL.

Off unless QWEN35_PDL=1 until benchmarks/gpu_bench.py has measured it on a card (it times batch-1 and
batch-8 decode both ways). The interpreter never runs the waiting branch; tests/sm90.py compiles it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("QWEN35_PDL", "0") == "1"


@functools.lru_cache(maxsize=None)
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_options(device: torch.device) -> dict:
    """The launch keywords of a decode kernel: its USE_PDL constexpr and Triton's `launch_pdl`, together."""
    use = ENABLED and device.type == "cuda" and _supports_pdl(device.index if device.index is not None
                                                              else torch.cuda.current_device())
    return {"USE_PDL": use, "launch_pdl": use}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """A decode kernel's first statement: under PDL, wait until the previous grid is done, then let the
    next kernel launch (its blocks will wait here in turn)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
