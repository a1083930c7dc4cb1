"""The "last program to arrive" pattern of kernels/triton_arrivals.py, on its own: many programs per
count, launched back to back without waiting. On a GPU the programs of a group run at once on many
processors, so a missing barrier, a count seen before the stores it follows, or a count left behind
shows up as a wrong sum; in the interpreter (CPU), the same kernel checks the bookkeeping."""

import pytest
import torch

from conftest import triton_devices

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from qwen35.kernels.triton_arrivals import arrival_counters, last_to_arrive, reset_count  # noqa: E402

DEVICE = triton_devices()[0]


@triton.jit
def _sum_of_parts_kernel(x_ptr, partial_ptr, out_ptr, counter_ptr, PARTS: tl.constexpr, WIDTH: tl.constexpr):
    # Program (group, part) sums its slice of x[group] into partial[group, part, :]; the last part of
    # the group to arrive adds the group's partials in order and writes out[group, :].
    group, part = tl.program_id(0), tl.program_id(1)
    columns = tl.arange(0, WIDTH)
    piece = tl.load(x_ptr + (group * PARTS + part) * WIDTH * 4 + tl.arange(0, 4)[:, None] * WIDTH + columns[None, :])
    tl.store(partial_ptr + (group * PARTS + part) * WIDTH + columns, tl.sum(piece, axis=0))
    counter = counter_ptr + group
    if last_to_arrive(counter, PARTS):
        total = tl.zeros([WIDTH], dtype=tl.float32)
        for other in range(PARTS):
            total += tl.load(partial_ptr + (group * PARTS + other) * WIDTH + columns, cache_modifier=".cg")
        tl.store(out_ptr + group * WIDTH + columns, total)
        reset_count(counter)


def test_each_group_is_summed_once_by_its_last_part_on_every_launch():
    on_gpu = DEVICE == "cuda"
    groups, parts, width, launches = (96, 256, 64, 30) if on_gpu else (3, 5, 16, 2)
    generator = torch.Generator().manual_seed(0)
    device = torch.device(DEVICE)
    counters = arrival_counters(device, groups)
    partial = torch.empty(groups, parts, width, device=device)
    results, inputs = [], []
    for _ in range(launches):  # launched back to back: each launch finds the counts its predecessor left
        x = torch.randint(-8, 8, (groups, parts * 4, width), generator=generator).float().to(device)
        out = torch.full((groups, width), float("nan"), device=device)
        _sum_of_parts_kernel[(groups, parts)](x, partial, out, counters, PARTS=parts, WIDTH=width)
        inputs.append(x)
        results.append(out)
    for x, out in zip(inputs, results):
        # Small integers: every order of summing gives the same float32 value, so any difference is a race.
        assert torch.equal(out.cpu(), x.sum(dim=1).cpu())
    assert not counters[:groups].any()
