"""The "last program to arrive" pattern, shared by the GPU kernels that fold a second step into
their launch (split-K sums, attention's split merge, the MoE router's top-k, the DeltaNet conv
state's shift, the MoE's combining and the residual add with the next norm).

A decode step on a GPU is bound by how many kernels it launches as much as by its bytes, so a
step that needs every program's results (a sum over splits, a softmax over all experts) is done
by whichever program finishes last instead of by another launch:

    results stored by this program
    if last_to_arrive(counter, expected):      # bar.sync, then one thread: atom.acq_rel.gpu
        ... read the others' results (with cache_modifier=".cg": from L2, never a stale L1 line)
        reset_count(counter)                   # back to 0 for the next call and graph replay

The barrier orders every thread's stores before the count (release is cumulative over it), the
atomic's result reaches every thread of the program (so the branch is the same for all), and its
acquire orders the last program's loads after the others' stores. Nothing spins, so no program
waits for another to be scheduled. Counts live in `arrival_counters(device, n)`: one zeroed int32
buffer per device, allocated once (CUDA graphs keep pointing at it); each kernel leaves the
counts it used at 0. Under Triton's interpreter the programs run one after another, so the last
in grid order is the one that arrives last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ARRIVAL_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # kept alive: CUDA graphs captured earlier may still point at them


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counts on `device` (at least 4096, allocated once)."""
    counters = _ARRIVAL_COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[device] = counters
    return counters


@triton.jit
def last_to_arrive(counter_ptr, expected):
    """Counts this program in; true for the program that makes the count `expected` (the last)."""
    tl.debug_barrier()  # all of this program's stores before its count
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == expected - 1


@triton.jit
def reset_count(counter_ptr):
    tl.atomic_xchg(counter_ptr, 0)
