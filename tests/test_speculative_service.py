"""Speculative decoding in the server's engine (engine/speculative_steps.py): the same tokens as transformers'
greedy continuations, whether a request decodes alone or beside others (every row's guesses checked in one
forward, each row rewound to its own tokens kept), and a reply that stops inside a step leaves exactly its
own tokens in the prefix store (a follow-up request starting with them continues transformers' way)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

import qwen35
from conftest import serve_greedily
from qwen35.engine.generate import resolve_sampling
from qwen35.engine.service import EngineService, GenerationRequest
from qwen35.engine.speculative import Speculation
from test_speculative import Scripted

TOKENS = 20


@pytest.fixture(scope="module")
def model(dense_hf):
    return qwen35.load_model(dense_hf)


@pytest.mark.parametrize("drafter", ["mtp", "scripted"])
def test_one_request_alone_gets_transformers_greedy_tokens(model, dense_sequences, drafter):
    sequence = dense_sequences["text"]
    expected = sequence["transformers_greedy"][:TOKENS]
    speculation = (Speculation(p_min=0.0) if drafter == "mtp" else
                   Scripted(draft_max=3, script=tuple(expected), prompt_length=len(sequence["ids"]),
                            wrong=lambda index: index % 3 == 2))
    assert serve_greedily(model, [sequence["ids"]], [TOKENS], max_running=2, speculation=speculation) == [expected]


def test_requests_decoding_together_and_then_alone_get_transformers_greedy_tokens(model, dense_sequences):
    """Three prompts at once (batched speculative steps with the MTP layer's guesses), then the longest reply
    goes on alone."""
    names = ["text", "chat_think", "chat_nothink"]
    counts = [TOKENS, 6, 9]
    prompts = [dense_sequences[name]["ids"] for name in names]
    expected = [dense_sequences[name]["transformers_greedy"][:count] for name, count in zip(names, counts)]
    assert serve_greedily(model, prompts, counts, max_running=4, speculation=Speculation(p_min=0.0)) == expected


def test_a_reply_stopped_inside_a_step_is_remembered_with_its_own_tokens(model, dense_sequences):
    sequence = dense_sequences["text"]
    prompt, expected = sequence["ids"], sequence["transformers_greedy"]
    stop = expected[7]
    everything_right = Scripted(draft_max=4, script=tuple(expected), prompt_length=len(prompt),
                                wrong=lambda index: False)

    async def served():
        service = EngineService(model, max_running=2, context_length=512, speculation=everything_right)
        service.start(asyncio.get_running_loop())

        async def one(prompt_ids, count, stop_ids=()):
            params = resolve_sampling(model, count, temperature=0)
            handle = service.submit(GenerationRequest(prompt_ids, params, count, ignore_eos=True,
                                                      stop_token_ids=frozenset(stop_ids)))
            outputs = [output async for output in handle]
            return [t.token_id for output in outputs for t in output.tokens], outputs[-1].finish

        try:
            first = await one(prompt, TOKENS, [stop])
            # The client sends the reply back with its stop token, as a chat template writes it.
            follow_up = await one(prompt + expected[:8], 6)
            return first, follow_up, service.stats
        finally:
            service.close()

    (tokens, finish), (continued, follow_finish), stats = asyncio.run(served())
    assert tokens == expected[:7] and finish.reason == "stop"
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0
    assert follow_finish.cached_tokens == len(prompt) + 7  # the remembered reply, up to its stop token
    assert continued == expected[8:14]


def test_prefix_snapshots_carry_the_mtp_layers_state(model, dense_sequences):
    """The prompt's and the reply's snapshots hold the MTP layer's K/V of every pair before them, so that a
    later request restoring them guesses with the whole history in view."""
    sequence = dense_sequences["text"]
    prompt = sequence["ids"]

    async def served():
        service = EngineService(model, max_running=2, context_length=512, speculation=Speculation(p_min=0.0))
        service.start(asyncio.get_running_loop())
        try:
            params = resolve_sampling(model, 8, temperature=0)
            handle = service.submit(GenerationRequest(prompt, params, 8, stop_token_ids=frozenset(
                [sequence["transformers_greedy"][5]])))
            outputs = [output async for output in handle]
            tokens = [t.token_id for output in outputs for t in output.tokens]
            # The next turn prepared in idle time (engine/service.py's prefix jobs): its drafter reads it too.
            service.prepare_prefix(prompt + tokens + next_turn)
            for _ in range(500):
                if service.prefix_jobs_pending == 0 and service.prefix_store.lookup(prompt + tokens + next_turn) \
                        and len(service.prefix_store.lookup(prompt + tokens + next_turn).cache.lengths):
                    break
                await asyncio.sleep(0.01)
            return service.prefix_store, tokens
        finally:
            service.close()

    next_turn = dense_sequences["chat_nothink"]["ids"][:30]
    store, tokens = asyncio.run(served())
    assert tokens == sequence["transformers_greedy"][:5]  # the stop token ends it, unsent
    # The prompt, the reply as fed (up to its stop token), and the prepared next turn.
    for key in (prompt, prompt + tokens, prompt + tokens + next_turn):
        snapshot = store.lookup(key)
        assert snapshot.length == len(key)
        mtp_cache, pending = snapshot.drafter_state
        # Pairs (hidden state at i, token i+1) for every token but the last, whose hidden state waits.
        assert mtp_cache.lengths.tolist() == [len(key) - 1] and pending.shape[1] == 1


@dataclass(frozen=True)
class ScriptedPerPrompt(Speculation):
    """Guesses each prompt's known continuation, wrong at every `every`-th guess of that prompt's reply."""

    scripts: tuple = ()  # (prompt ids, continuation, every)

    def drafter(self, model, cached_ids, state=None):
        return _PerPromptDrafter(self, list(cached_ids), model.config.vocab_size)


class _PerPromptDrafter:
    def __init__(self, settings, seen, vocab):
        self.settings, self.seen, self.vocab = settings, seen, vocab

    def feed(self, token_ids, hidden):
        self.seen += list(token_ids)

    skip = feed

    def snapshot(self, copy=True):
        return list(self.seen)

    @staticmethod
    def snapshot_bytes(state):
        return 0

    def propose(self, next_token, limit):
        for prompt, continuation, every in self.settings.scripts:
            if self.seen[:len(prompt)] == list(prompt):
                index = len(self.seen) - len(prompt)  # next_token is continuation[index]
                guesses = continuation[index + 1 : index + 1 + limit]
                return [(g + 1) % self.vocab if (index + 1 + i) % every == every - 1 else g
                        for i, g in enumerate(guesses)]
        return []


def test_requests_decoding_together_check_their_own_guesses_in_one_step(model, dense_sequences, monkeypatch):
    """Three replies decoding together, each guessed by its own script wrong at its own rhythm: one forward
    checks every row's guesses (rows with fewer padded), each row keeps its own number of tokens
    (HybridCache.rewind_rows), and every reply is transformers' greedy one."""
    from qwen35.engine import service as service_module

    names, counts, rhythms = ["text", "chat_think", "chat_nothink"], [TOKENS, 12, 16], [3, 2, 5]
    prompts = [dense_sequences[name]["ids"] for name in names]
    expected = [dense_sequences[name]["transformers_greedy"][:count] for name, count in zip(names, counts)]
    speculation = ScriptedPerPrompt(draft_max=3, p_min=0.0, scripts=tuple(
        (tuple(prompt), tuple(reply), every) for prompt, reply, every in zip(prompts, expected, rhythms)))
    batched = []
    original = service_module.speculative_batch_step
    monkeypatch.setattr(service_module, "speculative_batch_step",
                        lambda service, sequences: (batched.append(len(sequences)), original(service, sequences))[1])
    assert serve_greedily(model, prompts, counts, max_running=4, speculation=speculation) == expected
    assert batched and max(batched) == 3  # all three checked their guesses in one forward
