"""The running batch's row operations on the real tiny model's hybrid cache: sequences join (`append`)
and leave (`remove`) one row at a time, and every row still continues exactly as its sequence run
alone in one prefill; a join or a leave moves one row's K/V, not everyone's; a `shared` snapshot
copies nothing and stays valid while its source is fed further."""

from __future__ import annotations

import pytest
import torch

from qwen35.engine.cache import AttentionKV, HybridCache

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(fixtures):
    from qwen35 import load_model

    return load_model(fixtures / "tiny" / "dense-hf", precision="reference")


def _prefilled(model, ids):
    cache = model.make_cache(1)
    model.forward(torch.tensor([ids]), cache)
    return cache


def _kv_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, AttentionKV)]


def test_rows_joining_and_leaving_continue_as_if_alone(model):
    prompts = {name: list(range(start, start + length))
               for name, start, length in (("a", 100, 7), ("b", 300, 40), ("c", 600, 90), ("d", 900, 20))}
    fed = {name: list(ids) for name, ids in prompts.items()}
    batch = HybridCache.empty_like(model.make_cache(1))
    members = []

    def join(name):
        batch.append(_prefilled(model, prompts[name]))
        members.append(name)

    def leave(name):
        row = members.index(name)
        moved = batch.remove(row)
        last = members.pop()
        if row < len(members):
            members[row] = last
            assert moved == len(members)

    def step(token):
        ids = torch.tensor([[token + index] for index in range(len(members))])
        logits = model.forward(ids, batch)[:, -1]
        for index, name in enumerate(members):
            fed[name].append(token + index)
            expected = torch.from_numpy(model.logits(fed[name]))[-1]
            assert torch.allclose(logits[index], expected, atol=TOLERANCE), name

    join("a")
    join("b")
    join("c")
    step(1000)
    leave("a")  # the first row: the last one moves into it
    step(1100)
    join("d")
    step(1200)
    leave("d")  # the last row: nothing moves
    leave("c")
    step(1300)
    assert members == ["b"] and batch.lengths.tolist() == [len(fed["b"])]


def test_a_join_or_a_leave_moves_one_row_only(model):
    batch = HybridCache.empty_like(model.make_cache(1))
    batch.reserve(rows=4, tokens=64)
    storages = [layer._keys.untyped_storage().data_ptr() for layer in _kv_layers(batch)]
    first, second, third = (_prefilled(model, list(range(start, start + 30))) for start in (10, 50, 90))
    for cache in (first, second, third):
        batch.append(cache)
    batch.remove(0)
    # Everything happened inside the reserved storage: no layer's K/V were reallocated (copied whole).
    assert [layer._keys.untyped_storage().data_ptr() for layer in _kv_layers(batch)] == storages
    for mine, theirs in zip(_kv_layers(batch), _kv_layers(third)):
        assert torch.equal(mine.keys[0, :30], theirs.keys[0, :30])  # the last row moved into row 0
    # Storage doubles when the reserved rows run out, and shrinks again once most rows left.
    for _ in range(3):
        batch.append(first)
    assert _kv_layers(batch)[0]._keys.shape[0] == 8
    for _ in range(4):
        batch.remove(0)
    assert batch.batch_size == 1 and _kv_layers(batch)[0]._keys.shape[0] == 2


def test_a_shared_snapshot_copies_nothing_and_survives_its_source_going_on(model):
    ids = list(range(200, 260))
    cache = model.make_cache(1)
    cache.reserve(tokens=len(ids))
    model.forward(torch.tensor([ids[:30]]), cache)
    snapshot = cache.shared()
    for mine, theirs in zip(_kv_layers(snapshot), _kv_layers(cache)):
        assert mine._keys.untyped_storage().data_ptr() == theirs._keys.untyped_storage().data_ptr()
    assert snapshot.nbytes() == cache.nbytes()  # it keeps the whole storage alive, and says so
    model.forward(torch.tensor([ids[30:45]]), cache)  # the source goes on in the same storage
    restored = snapshot.select([0], capacity=len(ids))
    continued = model.forward(torch.tensor([ids[30:]]), restored)[0]
    reference = torch.from_numpy(model.logits(ids))[30:]
    assert torch.allclose(continued, reference, atol=TOLERANCE)
    with pytest.raises(Exception, match="one-row"):
        HybridCache.merge([cache, restored]).shared()
