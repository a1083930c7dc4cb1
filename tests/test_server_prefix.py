"""The engine's prefix store on the real tiny model's hybrid cache: a restored snapshot continues exactly
as a fresh prefill does (judged by the model's own one-shot logits), lookups take the longest stored
prefix, and the memory held never passes the budget."""

from __future__ import annotations

import pytest
import torch

from qwen35.engine.service import PrefixStore


@pytest.fixture(scope="module")
def model(fixtures):
    from qwen35 import load_model

    return load_model(fixtures / "tiny" / "dense-hf", precision="reference")


def _prefilled(model, ids):
    cache = model.make_cache(1)
    logits = model.forward(torch.tensor([ids]), cache)[0, -1]
    return cache, logits


def test_restored_snapshot_continues_like_a_fresh_prefill(model):
    ids = list(range(100, 160))
    store = PrefixStore(64 << 20)
    cache, last = _prefilled(model, ids[:40])
    store.store(ids[:40], cache, last)
    model.forward(torch.tensor([ids[40:50]]), cache)  # the live cache moves on; the snapshot must not
    hit = store.lookup(ids)
    assert hit is not None and hit.length == 40
    restored = hit.restore()
    continued = model.forward(torch.tensor([ids[40:]]), restored)[0]
    reference = torch.from_numpy(model.logits(ids))[40:]
    assert torch.allclose(continued, reference, atol=1e-4)
    assert torch.allclose(hit.last_logits, torch.from_numpy(model.logits(ids[:40]))[-1], atol=1e-4)
    # Restoring twice gives two independent caches.
    again = hit.restore()
    assert torch.allclose(model.forward(torch.tensor([ids[40:]]), again)[0], reference, atol=1e-4)


def test_lookup_takes_the_longest_stored_prefix(model):
    store = PrefixStore(64 << 20)
    base = list(range(200, 230))
    for length in (10, 20, 30):
        cache, last = _prefilled(model, base[:length])
        store.store(base[:length], cache, last)
    assert store.lookup(base + [5, 6]).length == 30
    assert store.lookup(base[:25]).length == 20
    assert store.lookup(base[:30]).length == 30  # the whole prompt: its last logits are kept too
    assert store.lookup([1, 2, 3]) is None
    assert store.lookup(base[:9]) is None


def test_memory_stays_within_the_budget_least_recently_used_first(model):
    sizes = []
    caches = []
    for start in range(5):
        ids = list(range(300 + 50 * start, 300 + 50 * start + 20))
        cache, last = _prefilled(model, ids)
        caches.append((ids, cache, last))
        sizes.append(cache.nbytes() + last.numel() * 4)
    budget = int(2.5 * max(sizes))
    store = PrefixStore(budget)
    for ids, cache, last in caches[:2]:
        store.store(ids, cache, last)
    store.lookup(caches[0][0])  # the first is now the most recently used
    for ids, cache, last in caches[2:]:
        store.store(ids, cache, last)
        assert store.nbytes <= budget
    assert len(store) == 2
    assert store.lookup(caches[1][0]) is None  # evicted: least recently used
    assert store.lookup(caches[4][0]) is not None
    assert PrefixStore(0).lookup(caches[0][0]) is None
