"""The paged K/V store (engine/paged_kv.py) against AttentionKV (engine/cache.py), the contiguous store
the network already uses, through the same operations; and the paged decode kernel
(kernels/triton_paged_attention.py) against attention_decode_ (kernels/triton_attention.py) on the same
K/V laid out contiguously. Without a GPU the kernels run in Triton's interpreter."""

import contextlib
from unittest import mock

import pytest
import torch

from conftest import triton_devices
from sm90 import run_compile_script

from qwen35.engine.cache import AttentionKV
from qwen35.engine.paged_kv import PagedAttentionKV
from qwen35.errors import Qwen35Error
from qwen35.kernels.triton_arrivals import arrival_counters

N_KV, HEAD_DIM, PAGE = 2, 8, 16


def random_tokens(generator, batch, length, dtype, n_kv=N_KV, head_dim=HEAD_DIM):
    return tuple((torch.randn(batch, length, n_kv, head_dim, generator=generator) * 3).to(dtype) for _ in range(2))


class Twins:
    """An AttentionKV and a PagedAttentionKV fed the same operations, with the rows' lengths on the host."""

    def __init__(self, plain, paged, lengths):
        self.plain, self.paged, self.lengths = plain, paged, list(lengths)

    @classmethod
    def prefilled(cls, lengths, dtype, generator, chunk=7):
        """One-row stores prefilled in chunks of `chunk` tokens (and one token at a time at the end), merged."""
        rows = []
        for length in lengths:
            twin = cls(AttentionKV(1, N_KV, HEAD_DIM, dtype, "cpu"),
                       PagedAttentionKV(1, N_KV, HEAD_DIM, dtype, "cpu", page_size=PAGE), [0])
            while twin.lengths[0] < length:
                twin.write(generator, min(chunk if length - twin.lengths[0] > 3 else 1, length - twin.lengths[0]))
            rows.append(twin)
        longest = max(lengths)
        return cls(AttentionKV.merge([t.plain for t in rows], longest),
                   PagedAttentionKV.merge([t.paged for t in rows], longest), lengths)

    def write(self, generator, length):
        keys, values = random_tokens(generator, len(self.lengths), length, self.paged.page_pool[0].dtype)
        starts = torch.tensor(self.lengths)
        self.plain.write(starts, keys, values)
        self.paged.write(starts, keys, values)
        self.lengths = [n + length for n in self.lengths]

    def assert_same(self, span=None):
        """Every row's own slots the same bits in both views; slots past a row's tokens finite."""
        span = max(self.lengths, default=0) + 5 if span is None else span
        assert self.paged.rows == self.plain.rows == len(self.lengths)
        for ours, theirs in zip(self.paged.view(span), self.plain.view(span)):
            assert ours.shape == (len(self.lengths), span, N_KV, HEAD_DIM)
            for row, length in enumerate(self.lengths):
                assert torch.equal(ours[row, :length], theirs[row, :length])
            assert torch.isfinite(ours.float()).all()


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_tokens_as_attention_kv_through_every_operation(dtype):
    generator = torch.Generator().manual_seed(1)
    twins = Twins.prefilled([30, 0, 16, 45], dtype, generator)
    twins.assert_same()
    for _ in range(3):  # decode steps: rows cross page boundaries (16 -> 17, 30 -> 33, 45 -> 48)
        twins.write(generator, 1)
        twins.assert_same()
    twins.write(generator, 5)  # a prefill chunk for every row at its own offset
    twins.assert_same()

    order = [3, 0, 2]
    picked = Twins(twins.plain.select(order, max(twins.lengths), capacity=80),
                   twins.paged.select(order, max(twins.lengths), capacity=80), [twins.lengths[r] for r in order])
    picked.assert_same()
    assert picked.paged.capacity >= 80
    picked.write(generator, 1)
    picked.assert_same()
    twins.assert_same()  # the copies are copies

    # A long-lived batch: rows in one at a time, out from the middle.
    batch = Twins(AttentionKV._wrap(twins.plain.storage[0][:1, :0].clone(), twins.plain.storage[1][:1, :0].clone(),
                                    rows=0),
                  PagedAttentionKV.empty_like(twins.paged), [])
    for source, row in ((twins, 0), (picked, 2), (twins, 3), (twins, 1)):
        length = source.lengths[row]
        batch.plain.append(source.plain, row, length)
        batch.paged.append(source.paged, row, length)
        batch.lengths.append(length)
        batch.assert_same()
    batch.write(generator, 1)
    batch.assert_same()
    for row in (1, 2, 0):  # the middle, then the last, then the first
        lengths = batch.lengths[:]
        last_length = lengths.pop()
        if row < len(lengths):
            lengths[row] = last_length
        batch.plain.remove(row, last_length, max(lengths))
        batch.paged.remove(row, last_length, max(lengths))
        batch.lengths = lengths
        batch.assert_same()
        batch.write(generator, 2)
        batch.assert_same()


@torch.inference_mode()
def test_a_shared_snapshot_stays_valid_while_its_owner_is_fed():
    generator = torch.Generator().manual_seed(2)
    owner = Twins.prefilled([21], torch.float32, generator)
    owner.plain.reserve(tokens=40)
    owner.paged.reserve(tokens=40)
    snapshot = Twins(owner.plain.shared(21), owner.paged.shared(21), [21])
    assert snapshot.paged.page_pool[0] is owner.paged.page_pool[0]  # nothing copied
    owner.write(generator, 3)  # into the page the snapshot ends in, past its slots
    snapshot.assert_same()
    snapshot.write(generator, 2)  # fed itself, a snapshot copies its pages first
    snapshot.assert_same()
    owner.assert_same()

    snapshot = Twins(owner.plain.shared(24), owner.paged.shared(24), [24])
    pool_bytes = sum(pool.untyped_storage().nbytes() for pool in owner.paged.page_pool)
    for _ in range(3):
        owner.write(generator, 9)  # new pages, the pool growing
    owner.assert_same()
    snapshot.assert_same()
    assert snapshot.paged.nbytes() >= pool_bytes  # it keeps its owner's old pool alive
    restored = Twins(snapshot.plain.select([0], 24, capacity=40), snapshot.paged.select([0], 24, capacity=40), [24])
    restored.write(generator, 4)
    restored.assert_same()
    snapshot.assert_same()


@torch.inference_mode()
def test_growing_moves_no_page_and_removed_pages_are_reused():
    generator = torch.Generator().manual_seed(3)
    kv = PagedAttentionKV(2, N_KV, HEAD_DIM, torch.float32, "cpu", page_size=PAGE)
    tokens = random_tokens(generator, 2, 21, torch.float32)
    kv.write(torch.tensor([0, 0]), *tokens)
    pages = kv.page_table[:2, :2].clone()
    held = [kv.page_pool[0][pages[row]].clone() for row in range(2)]
    pool_pages = [kv.page_pool[0].shape[0]]
    for length in (1, 40, 200):
        kv.make_room(torch.tensor([21, 21]), length)
        pool_pages.append(kv.page_pool[0].shape[0])
        assert torch.equal(kv.page_table[:2, :2], pages)
        for row in range(2):
            assert torch.equal(kv.page_pool[0][pages[row]], held[row])
    assert kv.capacity >= 221 and pool_pages[-1] > 2 * pool_pages[0]  # the pool grew, twice at least

    pool_pages = kv.page_pool[0].shape[0]
    freed = set(kv.page_table[0, :pages_held(kv, 0)].tolist())
    kv.remove(0, 21, 221)  # row 1 moves to row 0: its table row, not its K/V
    assert torch.equal(kv.page_table[0, :2], pages[1])
    kv.append(kv.select([0], 221), 0, 221)
    assert set(kv.page_table[1, :pages_held(kv, 1)].tolist()) <= freed
    assert kv.page_pool[0].shape[0] == pool_pages

    # Told the rows hold 21 tokens at most, remove frees the pages far past them and the pool shrinks.
    kv.remove(1, 221, 21)
    assert kv.page_pool[0].shape[0] < pool_pages and kv.capacity < 221
    for ours, written in zip(kv.view(21), tokens):
        assert torch.equal(ours[0], written[1])


def pages_held(kv, row):
    return int((kv.page_table[row] != 0).sum())


@torch.inference_mode()
def test_reserve_pins_the_pool_and_table_for_a_graph():
    """After reserve(rows, tokens), prefills and decode steps up to that size move nothing (fixed addresses)."""
    generator = torch.Generator().manual_seed(4)
    twins = Twins.prefilled([5, 18], torch.bfloat16, generator)
    twins.plain.reserve(rows=2, tokens=64)
    twins.paged.reserve(rows=2, tokens=64)
    addresses = [t.data_ptr() for t in (*twins.paged.page_pool, twins.paged.page_table)]
    assert twins.paged.capacity >= 64
    while max(twins.lengths) < 64:
        twins.write(generator, 1 if max(twins.lengths) > 40 else 9)
    twins.assert_same()
    assert [t.data_ptr() for t in (*twins.paged.page_pool, twins.paged.page_table)] == addresses

    # The table's width (which the kernel's split count follows) is what reserve asked for, however wide
    # the table had grown: a graph's scratch cache reserved alike gets the same.
    grown = PagedAttentionKV(2, N_KV, HEAD_DIM, torch.bfloat16, "cpu", page_size=PAGE)
    grown.make_room(torch.tensor([0, 0]), 90)
    scratch = PagedAttentionKV(2, N_KV, HEAD_DIM, torch.bfloat16, "cpu", page_size=PAGE)
    for kv in (grown, scratch):
        kv.reserve(rows=2, tokens=128)
    assert grown.page_table.shape == scratch.page_table.shape == (2, 128 // PAGE)


@torch.inference_mode()
def test_rows_take_free_pages_in_place_when_they_fit():
    """make_room_for (lengths the host knows) says whether the pool and the table stayed put: a graph
    captured over them then stays valid, its rows' new pages written into the table in place."""
    generator = torch.Generator().manual_seed(6)
    kv = PagedAttentionKV(1, N_KV, HEAD_DIM, torch.float32, "cpu", capacity=64, page_size=PAGE)
    short = PagedAttentionKV(1, N_KV, HEAD_DIM, torch.float32, "cpu", page_size=PAGE)
    tokens = random_tokens(generator, 1, 10, torch.float32)
    short.write(torch.tensor([0]), *tokens)
    kv.append(short, 0, 10)  # row 1: one page of four the table has room for; the pool keeps spare pages
    addresses = [t.data_ptr() for t in (*kv.page_pool, kv.page_table)]
    assert kv.make_room_for([64, 60])
    assert [t.data_ptr() for t in (*kv.page_pool, kv.page_table)] == addresses
    assert pages_held(kv, 1) == 4 and kv.capacity == 64
    assert torch.equal(kv.view(10)[0][1], tokens[0][0])
    assert not kv.make_room_for([64, 200])  # past the table's width: a new table
    assert torch.equal(kv.view(10)[0][1], tokens[0][0])


@torch.inference_mode()
def test_a_row_installed_in_place_holds_the_source_rows_tokens_in_both_stores():
    """install_row (a newcomer copied into a graph's idle row): the row reads back the source row's
    tokens, the other rows keep theirs; a pinned row with room moves nothing, a row without room takes
    more pages and says the pool or the table moved."""
    generator = torch.Generator().manual_seed(8)
    batch = Twins.prefilled([5, 18, 3], torch.float32, generator)
    for store in (batch.plain, batch.paged):
        store.reserve(rows=3, tokens=64)
    source = Twins.prefilled([40], torch.float32, generator)
    addresses = [t.data_ptr() for t in (*batch.paged.page_pool, batch.paged.page_table)]
    assert batch.paged.install_row(2, source.paged, 0, 40) and batch.plain.install_row(2, source.plain, 0, 40)
    assert [t.data_ptr() for t in (*batch.paged.page_pool, batch.paged.page_table)] == addresses
    batch.lengths[2] = 40
    batch.assert_same()
    for ours, theirs in zip(batch.paged.view(40), source.paged.view(40)):
        assert torch.equal(ours[2], theirs[0])
    longer = Twins.prefilled([100], torch.float32, generator)
    assert not batch.paged.install_row(0, longer.paged, 0, 100)  # 7 pages into a row of 4: the table widens
    assert torch.equal(batch.paged.view(100)[0][0], longer.paged.view(100)[0][0])
    with pytest.raises(Qwen35Error, match="does not fit"):
        batch.plain.install_row(0, longer.plain, 0, 100)


@torch.inference_mode()
def test_only_make_room_reads_a_tensor_on_the_host():
    """On a GPU a tensor read on the host waits for it: AttentionKV reads one in make_room (starts.max()),
    the paged store reads `starts` there and nowhere else (page lists live on the host)."""
    generator = torch.Generator().manual_seed(5)
    kv = PagedAttentionKV(2, N_KV, HEAD_DIM, torch.float32, "cpu", page_size=PAGE)
    reads = []

    def spied(name):
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, **kwargs):
            reads.append(name)
            return original(tensor, *args, **kwargs)
        return read

    names = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy")
    with contextlib.ExitStack() as patches:
        for name in names:
            patches.enter_context(mock.patch.object(torch.Tensor, name, spied(name)))
        kv.write(torch.tensor([0, 0]), *random_tokens(generator, 2, 20, torch.float32))
        assert reads == ["tolist"]
        kv.reserve(rows=4, tokens=64)
        kv.append(kv.select([1], 20, capacity=30), 0, 20)
        merged = PagedAttentionKV.merge([kv, kv.shared(20)], 20)
        merged.remove(0, 20, 20)
        merged.view(20)
        PagedAttentionKV.empty_like(merged, 3)
        assert reads == ["tolist"]
        kv.make_room(torch.tensor([20, 20, 20]), 1)
        assert reads == ["tolist", "tolist"]


def test_bad_page_sizes_and_mixed_stores_give_a_clear_error():
    with pytest.raises(Qwen35Error, match="power of two"):
        PagedAttentionKV(1, N_KV, HEAD_DIM, torch.float32, "cpu", page_size=48)
    kv = PagedAttentionKV(1, N_KV, HEAD_DIM, torch.float32, "cpu", page_size=PAGE)
    with pytest.raises(Qwen35Error, match="merged"):
        PagedAttentionKV.merge([kv, PagedAttentionKV(1, N_KV, HEAD_DIM, torch.float32, "cpu", page_size=32)], 4)
    with pytest.raises(Qwen35Error, match="page_pool and page_table"):
        kv.storage


# --- the kernel --------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def kernels():
    """(triton_attention, triton_paged_attention), where Triton is installed."""
    pytest.importorskip("triton")
    from qwen35.kernels import triton_attention, triton_paged_attention

    return triton_attention, triton_paged_attention


DEVICES = triton_devices()
EPS = 1e-6


def decode_inputs(generator, batch, n_q, n_kv, head_dim, rotary_dim):
    """A step's q_gate, k, v (as the layer's qkv_proj gives them), norm weights and each row's RoPE."""
    q_gate = torch.randn(batch, 1, 2 * n_q * head_dim, generator=generator)
    k, v = (torch.randn(batch, 1, n_kv * head_dim, generator=generator) for _ in range(2))
    q_norm, k_norm = (1 + 0.2 * torch.randn(head_dim, generator=generator) for _ in range(2))
    angles = torch.rand(batch, 1, rotary_dim // 2, generator=generator).repeat(1, 1, 2) * 6
    return q_gate, k, v, q_norm, k_norm, angles.cos(), angles.sin()


def scattered_pages(keys, values, page_size, generator):
    """Contiguous storage [rows, capacity, n_kv, d] -> pools with each row's pages in a random order among
    spare garbage pages, and the table."""
    rows, capacity = keys.shape[:2]
    width = capacity // page_size
    n_pages = rows * width + 3
    order = torch.randperm(n_pages, generator=generator)
    table = order[:rows * width].view(rows, width).to(torch.int32)
    pools = []
    for storage in (keys, values):
        pool = torch.randn(n_pages, page_size, *storage.shape[2:], generator=generator).to(storage.dtype)
        pool[table.long()] = storage.view(rows, width, page_size, *storage.shape[2:])
        pools.append(pool)
    return pools[0], pools[1], table


def assert_output_close(ours, expected, tolerance=1e-5):
    error = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert error < tolerance, f"largest error {error:.2e} of the largest output"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lengths,n_q,n_kv,page_size,capacity,dtype,splits",
    [
        ([0], 4, 2, 16, 32, torch.float32, None),  # the new token alone, group 2
        ([37, 0, 16], 8, 1, 16, 64, torch.bfloat16, None),  # group 8; the new token opens a page
        ([47], 4, 2, 16, 64, torch.bfloat16, 3),  # group 2, splits merged
        ([63, 5, 32], 16, 2, 32, 96, torch.float32, 2),  # group 8, the last slot of a page
    ],
)
def test_the_kernel_matches_attention_decode_on_contiguous_storage(kernels, device, lengths, n_q, n_kv, page_size,
                                                                     capacity, dtype, splits):
    contiguous, paged = kernels
    head_dim, rotary_dim = 32, 8
    generator = torch.Generator().manual_seed(sum(lengths) + n_q)
    inputs = decode_inputs(generator, len(lengths), n_q, n_kv, head_dim, rotary_dim)
    shape = (len(lengths) + 1, capacity, n_kv, head_dim)  # a spare row, as a long-lived batch has
    keys, values = ((torch.randn(shape, generator=generator) * 2).to(dtype) for _ in range(2))
    key_pool, value_pool, table = scattered_pages(keys, values, page_size, generator)
    starts = torch.tensor(lengths)
    on = [t.to(device) for t in (*inputs, keys, values, key_pool, value_pool, table, starts)]
    *step, keys, values, key_pool, value_pool, table, starts = on
    pools_before = key_pool.clone(), value_pool.clone()
    shape_args = (n_q, n_kv, head_dim, EPS, head_dim**-0.5)
    if splits is None:
        expected = contiguous.attention_decode_(*step, keys, values, starts, *shape_args)
        ours = paged.paged_attention_decode_(*step, key_pool, value_pool, table, starts, *shape_args)
    else:
        expected = contiguous._launch(*step, keys, values, starts, *shape_args, splits=splits)
        ours = paged._launch_paged(*step, key_pool, value_pool, table, starts, *shape_args, splits=splits)
    assert_output_close(ours.cpu(), expected.cpu())
    assert not arrival_counters(key_pool.device, len(lengths) * n_kv).any()  # left at 0 for the next call
    # The new K/V went where attention_decode_ put them, bit for bit; no other page changed.
    for pool, before, storage in ((key_pool, pools_before[0], keys), (value_pool, pools_before[1], values)):
        pool, before, storage, pages = pool.cpu(), before.cpu(), storage.cpu(), table.cpu().long()
        assert torch.equal(pool[pages].flatten(1, 2), storage)
        spare = torch.ones(pool.shape[0], dtype=torch.bool)
        spare[pages.flatten()] = False
        assert torch.equal(pool[spare], before[spare])


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_over_the_paged_store_match_attention_kv(kernels, device):
    """The network's GPU decode path twice: AttentionKV.make_room + attention_decode_ on its storage, and
    PagedAttentionKV.make_room + the paged kernel on its pool and table, for steps that open new pages;
    then both stores hold the same K/V."""
    n_q, n_kv, head_dim = 4, 2, 32
    generator = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        rows = []
        for length in (15, 0, 33):
            one = [AttentionKV(1, n_kv, head_dim, torch.bfloat16, device),
                   PagedAttentionKV(1, n_kv, head_dim, torch.bfloat16, device, page_size=PAGE)]
            tokens = [t.to(device) for t in random_tokens(generator, 1, length, torch.bfloat16, n_kv, head_dim)]
            for kv in one:
                kv.write(torch.zeros(1, dtype=torch.long, device=device), *tokens)
            rows.append(one)
        plain = AttentionKV.merge([one[0] for one in rows], 33)
        paged = PagedAttentionKV.merge([one[1] for one in rows], 33)
        lengths = [15, 0, 33]
        for _ in range(2):
            step = [t.to(device) for t in decode_inputs(generator, 3, n_q, n_kv, head_dim, 8)]
            starts = torch.tensor(lengths, device=device)
            shape_args = (n_q, n_kv, head_dim, EPS, head_dim**-0.5)
            plain.make_room(starts, 1)
            paged.make_room(starts, 1)
            expected = kernels[0].attention_decode_(*step, *plain.storage, starts, *shape_args)
            ours = kernels[1].paged_attention_decode_(*step, *paged.page_pool, paged.page_table, starts, *shape_args)
            assert_output_close(ours.cpu(), expected.cpu())
            lengths = [n + 1 for n in lengths]
        for ours, theirs in zip(paged.view(35), plain.view(35)):
            for row, length in enumerate(lengths):
                assert torch.equal(ours[row, :length].cpu(), theirs[row, :length].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_pools_and_tables_give_a_clear_error(kernels, device):
    paged_attention_decode_ = kernels[1].paged_attention_decode_
    generator = torch.Generator().manual_seed(8)
    step = [t.to(device) for t in decode_inputs(generator, 2, 4, 2, 32, 8)]
    pool = torch.zeros(5, 16, 2, 32, device=device)
    table = torch.zeros(2, 3, dtype=torch.int32, device=device)
    starts = torch.tensor([3, 4], device=device)
    shape_args = (4, 2, 32, EPS, 32**-0.5)
    with pytest.raises(Qwen35Error, match="pools must be alike"):
        paged_attention_decode_(*step, pool, pool[:, :, :1], table, starts, *shape_args)
    with pytest.raises(Qwen35Error, match="page size"):
        paged_attention_decode_(*step, pool[:, :12], pool[:, :12], table, starts, *shape_args)
    with pytest.raises(Qwen35Error, match="page_table must be int32"):
        paged_attention_decode_(*step, pool, pool, table.long(), starts, *shape_args)
    with pytest.raises(Qwen35Error, match="page_table must be int32"):
        paged_attention_decode_(*step, pool, pool, table[:1], starts, *shape_args)
    with pytest.raises(Qwen35Error, match="starts must be int64"):
        paged_attention_decode_(*step, pool, pool, table, starts.int(), *shape_args)


# The paged kernel's GPU-only branch (each tile's page id loaded in a loop to a loaded bound),
# compiled for an H100 (tests/sm90.py).
SM90_COMPILE = r"""
import json
import torch
from sm90 import compile_report
from qwen35.kernels import triton_attention as ta, triton_paged_attention as tpa

ALIGNED = {"q_gate_s0", "k_s0", "v_s0", "pool_s0", "pool_s1", "pool_s2", "value_pool_s0", "value_pool_s1",
           "value_pool_s2"}  # what torch's tensors give
results = {}
for name, storage, pointer, splits, types in (("bf16", torch.bfloat16, "*bf16", 32, (0, 0)),
                                              ("fp16", torch.float16, "*fp16", 1, (0, 0)),
                                              ("q8_0", torch.float32, "*u8", 32, (8, 8)),
                                              ("q4_0", torch.float32, "*u8", 32, (2, 2))):
    constants = dict(ta._attend_config(16, 2, 256, 64, storage, 4096, splits), P=64, KEY_TYPE=types[0],
                     VALUE_TYPE=types[1])
    if types != (0, 0):
        constants.update(enable_fp_fusion=False, BF16_STORAGE=False)
    pointers = {"keys_ptr": pointer, "values_ptr": pointer, "starts_ptr": "*i64", "table_ptr": "*i32",
                "counter_ptr": "*i32"}
    results[name] = compile_report(tpa._paged_attend_kernel, constants, pointers, ALIGNED)
print(json.dumps(results))
"""


def test_the_paged_kernel_compiles_for_sm90_without_spilling():
    """The 35B model's shapes (16 query heads, 2 kv heads of 256, 64 rotated) in pages of 64: a bf16 pool
    split 32 ways (bf16 tensor cores, the last split merging) and an fp16 pool in one split (tf32x3), which
    may not spill; q8_0 and q4_0 block pools split 32 ways (tiles read as float32: tf32x3), which spill a
    little (40 and 16 bytes a thread as first written, untuned: no GPU has timed them yet)."""
    results = run_compile_script(SM90_COMPILE)
    stacks = {name: result["stack"] for name, result in results.items()}
    assert stacks["bf16"] == stacks["fp16"] == 0, stacks
    assert stacks["q8_0"] <= 64 and stacks["q4_0"] <= 64, stacks
    assert results["bf16"]["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"]
    for name in ("fp16", "q8_0", "q4_0"):
        assert results[name]["mma"] == ["mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"]
