"""tests/triton_memcheck.py stops interpreted kernels that would fail on a GPU: touching memory outside
their tensors (a GPU faults, or reads another tensor's bytes) and programs racing on the same bytes
(the interpreter runs them in order; a GPU runs them at once)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from qwen35.kernels.triton_arrivals import last_to_arrive, reset_count  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the checks guard Triton's interpreter; a GPU faults by itself", allow_module_level=True)


@triton.jit
def _copy(source_ptr, target_ptr, n, reach, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    if MASKED:
        values = tl.load(source_ptr + offsets, mask=offsets < n, other=0.0)
    else:
        values = tl.load(source_ptr + offsets)
    tl.store(target_ptr + offsets * reach, values, mask=offsets < n)


@triton.jit
def _count(counter_ptr, offset):
    tl.atomic_add(counter_ptr + offset, 1)


def test_masked_reads_inside_the_tensors_pass():
    source, target = torch.arange(5, dtype=torch.float32), torch.zeros(5)
    _copy[(1,)](source, target, 5, 1, BLOCK=8, MASKED=True)
    assert torch.equal(target, source)


def test_a_read_past_the_end_fails():
    source, target = torch.arange(5, dtype=torch.float32), torch.zeros(5)
    with pytest.raises(Exception, match=r"_copy program \(0, 0, 0\): load of 4 bytes .*past the end of argument 'source_ptr' \(20 bytes\)"):
        _copy[(1,)](source, target, 5, 1, BLOCK=8, MASKED=False)


def test_a_store_past_the_end_fails():
    source, target = torch.arange(5, dtype=torch.float32), torch.zeros(5)
    with pytest.raises(Exception, match=r"store of 4 bytes .* 'target_ptr'"):
        _copy[(1,)](source, target, 5, 2, BLOCK=8, MASKED=True)


def test_a_read_past_a_views_end_fails_even_inside_its_storage():
    # No fault on a GPU, but the kernel would be reading a neighbour's bytes (another page, row or tensor).
    storage = torch.arange(10, dtype=torch.float32)
    with pytest.raises(Exception, match=r"past the end of argument 'source_ptr' \(20 bytes\)"):
        _copy[(1,)](storage[:5], torch.zeros(5), 5, 1, BLOCK=8, MASKED=False)
    _copy[(1,)](storage[:8], torch.zeros(5), 5, 1, BLOCK=8, MASKED=False)


def test_an_atomic_outside_fails():
    counter = torch.zeros(4, dtype=torch.int32)
    _count[(1,)](counter, 3)
    assert counter.tolist() == [0, 0, 0, 1]
    with pytest.raises(Exception, match=r"atomic of 4 bytes"):
        _count[(1,)](counter, 4)


@triton.jit
def _sum_of_programs(values_ptr, partial_ptr, total_ptr, counter_ptr, ORDERED: tl.constexpr, CG: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Each program sums its block into partial[program]; one of them adds up the partials."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    offsets = tl.arange(0, BLOCK)
    tl.store(partial_ptr + program, tl.sum(tl.load(values_ptr + program * BLOCK + offsets), axis=0))
    if ORDERED:
        if last_to_arrive(counter_ptr, programs):
            if CG:
                partials = tl.load(partial_ptr + offsets, mask=offsets < programs, other=0.0, cache_modifier=".cg")
            else:
                partials = tl.load(partial_ptr + offsets, mask=offsets < programs, other=0.0)
            tl.store(total_ptr, tl.sum(partials, axis=0))
            reset_count(counter_ptr)
    elif program == programs - 1:  # "the last one" in the interpreter's order only
        partials = tl.load(partial_ptr + offsets, mask=offsets < programs, other=0.0, cache_modifier=".cg")
        tl.store(total_ptr, tl.sum(partials, axis=0))


def _sum_inputs():
    values = torch.arange(32, dtype=torch.float32)
    return values, torch.zeros(4), torch.zeros(1), torch.zeros(1, dtype=torch.int32)


def test_the_last_program_to_arrive_may_read_the_others_results():
    values, partial, total, counter = _sum_inputs()
    _sum_of_programs[(4,)](values, partial, total, counter, ORDERED=True, CG=True, BLOCK=8)
    assert total.item() == values.sum().item() and counter.item() == 0


def test_reading_other_programs_results_without_ordering_is_a_race():
    values, partial, total, counter = _sum_inputs()
    with pytest.raises(Exception, match=r"_sum_of_programs program \(3, 0, 0\): load of argument 'partial_ptr'.*written "
                                        r"by an earlier program with no release after it"):
        _sum_of_programs[(4,)](values, partial, total, counter, ORDERED=False, CG=True, BLOCK=8)


def test_reading_other_programs_results_through_l1_fails():
    values, partial, total, counter = _sum_inputs()
    with pytest.raises(Exception, match=r"reads another program's result through L1: load it with cache_modifier='.cg'"):
        _sum_of_programs[(4,)](values, partial, total, counter, ORDERED=True, CG=False, BLOCK=8)


@triton.jit
def _shift_left(values_ptr, BLOCK: tl.constexpr):
    """values[i] = values[i + 1] in place, each program its block: the next block's first value is read
    by one program while another writes it."""
    program = tl.program_id(0)
    offsets = program * BLOCK + tl.arange(0, BLOCK)
    shifted = tl.load(values_ptr + offsets + 1, mask=offsets + 1 < tl.num_programs(0) * BLOCK)
    tl.debug_barrier()  # orders this program's threads; nothing orders two programs
    tl.store(values_ptr + offsets, shifted, mask=offsets + 1 < tl.num_programs(0) * BLOCK)


def test_a_program_writing_what_another_read_is_a_race():
    values = torch.arange(16, dtype=torch.float32)
    _shift_left[(1,)](values, BLOCK=16)  # one program: its loads before its stores
    assert values[:15].tolist() == list(range(1, 16))
    with pytest.raises(Exception, match=r"_shift_left program \(1, 0, 0\): store of argument 'values_ptr'.*read by an earlier"):
        _shift_left[(2,)](torch.arange(16, dtype=torch.float32), BLOCK=8)


@triton.jit
def _roll_in_place(values_ptr, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    """values[i] = 2 * values[i] in place, then values[i] += values[i + 1]: the second step loads what
    another thread stored."""
    offsets = tl.arange(0, BLOCK)
    tl.store(values_ptr + offsets, 2 * tl.load(values_ptr + offsets))  # the same lane, so the same thread
    if BARRIER:
        tl.debug_barrier()
    following = tl.load(values_ptr + offsets + 1, mask=offsets + 1 < BLOCK, other=0.0)
    if BARRIER:
        tl.debug_barrier()  # every thread has loaded before any stores
    tl.store(values_ptr + offsets, tl.load(values_ptr + offsets) + following)


def test_a_programs_threads_need_a_barrier_between_one_storing_and_another_loading():
    # 128 values: a lane a thread of Triton's default 4 warps, so each in-place lane is one thread's
    values = torch.arange(128, dtype=torch.float32)
    _roll_in_place[(1,)](values, BARRIER=True, BLOCK=128)
    doubled = torch.arange(128, dtype=torch.float32) * 2
    assert values.tolist() == (doubled + torch.cat([doubled[1:], torch.zeros(1)])).tolist()
    with pytest.raises(Exception, match=r"_roll_in_place program \(0, 0, 0\): load: one thread stored bytes that "
                                        r"another then loads, with no tl.debug_barrier\(\) between"):
        _roll_in_place[(1,)](torch.arange(128, dtype=torch.float32), BARRIER=False, BLOCK=128)
    # with fewer lanes than threads, several threads hold each lane and only one of them stores it
    with pytest.raises(Exception, match=r"store: one thread loaded bytes that another then stores"):
        _roll_in_place[(1,)](torch.arange(32, dtype=torch.float32), BARRIER=True, BLOCK=32)
    _roll_in_place[(1,)](torch.arange(32, dtype=torch.float32), BARRIER=True, BLOCK=32, num_warps=1)


@triton.jit
def _count_then_read(counter_ptr, out_ptr, ORDERED: tl.constexpr):
    """Every program counts itself in; the last in grid order reads the count with a plain load."""
    if ORDERED:
        tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    else:
        tl.atomic_add(counter_ptr, 1, sem="relaxed")
    if tl.program_id(0) == tl.num_programs(0) - 1:
        tl.store(out_ptr, tl.load(counter_ptr, cache_modifier=".cg"))


def test_a_plain_read_of_what_other_programs_atomics_updated_needs_ordering():
    counter, out = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    _count_then_read[(3,)](counter, out, ORDERED=True)
    assert out.item() == 3
    with pytest.raises(Exception, match=r"load of argument 'counter_ptr'.*updated by an atomic by an earlier program"):
        _count_then_read[(3,)](torch.zeros(1, dtype=torch.int32), out, ORDERED=False)
