"""Decoding with the hybrid cache: token by token equals one prefill; batched rows equal single runs."""

import json

import numpy as np
import pytest
import torch

import qwen35
from qwen35.engine.cache import HybridCache

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def dense(fixtures):
    return qwen35.load_model(fixtures / "tiny" / "dense-hf", precision="reference")


@pytest.fixture(scope="module")
def prompt(fixtures):
    return json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]["text"]["ids"]


def decode_one_by_one(model, token_ids, cache=None):
    cache = cache or model.make_cache(1)
    steps = [model.forward(torch.tensor([[token]]), cache)[0, 0] for token in token_ids]
    return torch.stack(steps).numpy(), cache


def test_decode_token_by_token_equals_prefill(dense, prompt):
    decoded, _ = decode_one_by_one(dense, prompt[:200])
    for length in (1, 63, 64, 65, 200):
        prefill = dense.logits(prompt[:length])
        assert np.abs(decoded[:length] - prefill).max() <= TOLERANCE, length


def test_prefill_in_pieces_equals_one_prefill(dense, prompt):
    whole = dense.logits(prompt)
    cache = dense.make_cache(1)
    pieces = [dense.forward(torch.tensor([prompt[a:b]]), cache)[0] for a, b in ((0, 65), (65, 130), (130, 131), (131, 248))]
    assert np.abs(torch.cat(pieces).numpy() - whole).max() <= TOLERANCE
    assert int(cache.lengths[0]) == len(prompt) and int(cache.next_positions[0]) == len(prompt)


def test_long_prompts_go_through_in_bounded_pieces(dense, prompt, monkeypatch):
    """Model.forward splits a long input itself (here in pieces of 100) and gets the same logits."""
    from qwen35.model import api

    whole = dense.logits(prompt)
    monkeypatch.setattr(api, "PREFILL_CHUNK", 100)
    assert np.abs(dense.logits(prompt) - whole).max() <= TOLERANCE


def test_moe_decode_equals_prefill(fixtures):
    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf", precision="reference")
    # Reference precision dequantizes every expert it uses at each step: keep this one short.
    ids = json.loads((fixtures / "ref" / "moe.json").read_text())["sequences"]["chat_think"]["ids"][:6]
    decoded, _ = decode_one_by_one(model, ids)
    assert np.abs(decoded - model.logits(ids)).max() <= TOLERANCE


def test_batch_of_different_lengths_equals_each_alone(dense, prompt):
    prompts = [prompt[:5], prompt[10:80], prompt[100:230]]
    continuations = [[11, 12, 13, 14], [900, 901, 902, 903], [2000, 7, 2001, 3]]
    alone = []
    for ids, more in zip(prompts, continuations):
        cache = dense.make_cache(1)
        dense.forward(torch.tensor([ids]), cache)
        first = dense.forward(torch.tensor([more[:2]]), cache)[0]  # two tokens at once
        rest = [dense.forward(torch.tensor([[t]]), cache)[0, 0] for t in more[2:]]
        alone.append(torch.cat([first, torch.stack(rest)]).numpy())

    caches = []
    for ids in prompts:
        cache = dense.make_cache(1)
        dense.forward(torch.tensor([ids]), cache)
        caches.append(cache)
    batch = HybridCache.merge(caches)
    assert batch.lengths.tolist() == [5, 70, 130]
    first = dense.forward(torch.tensor([c[:2] for c in continuations]), batch)
    rest = [dense.forward(torch.tensor([[c[i]] for c in continuations]), batch)[:, 0] for i in (2, 3)]
    batched = torch.cat([first, torch.stack(rest, dim=1)], dim=1).numpy()
    for row in range(3):
        assert np.abs(batched[row] - alone[row]).max() <= TOLERANCE, row
    assert batch.lengths.tolist() == [9, 74, 134]

    # A row taken back out of the batch carries on as if it had run alone.
    single = batch.select([1])
    follow = dense.forward(torch.tensor([[5]]), single)[0, 0].numpy()
    cache = dense.make_cache(1)
    expected = dense.forward(torch.tensor([prompts[1] + continuations[1] + [5]]), cache)[0, -1].numpy()
    assert np.abs(follow - expected).max() <= TOLERANCE


def test_forward_rejects_bad_input(dense):
    cache = dense.make_cache(2)
    with pytest.raises(qwen35.errors.Qwen35Error):
        dense.forward(torch.tensor([[1, 2]]), cache)  # one row for a cache of two
    with pytest.raises(qwen35.errors.Qwen35Error):
        dense.forward(torch.tensor([[1], [dense.config.vocab_size]]), cache)


def test_given_embeddings_replace_the_token_lookup(dense, prompt):
    ids = torch.tensor([prompt[:40]])
    embeddings = dense.network.embed_tokens.rows(ids)
    expected = dense.logits(prompt[:40])
    logits = dense.forward(ids, dense.make_cache(1), embeddings=embeddings)[0].numpy()
    assert np.array_equal(logits, expected)
    shuffled = dense.forward(ids, dense.make_cache(1), embeddings=embeddings.flip(1))[0].numpy()
    assert np.abs(shuffled - expected).max() > 1e-2
