"""Speculative decoding in the server's engine (engine/service.py), as llama-server does it per slot.

A request gets a drafter (engine/speculative.py) when the server speculates and its prompt has no
images; its prompt's pieces then go through the network's hidden states, which the MTP layer reads.
While it is the only request decoding, its steps feed the last token and the drafter's guesses and
sample position by position, as `SpeculativeDecoder.step` does (on a GPU, once it has been alone a
while, in a captured verification step: RunningBatch.verifier_for). Several decoding together each check
their own guesses in one batched forward (`speculative_batch_step`), except on a GPU, where the batch's
captured plain step is faster than an eager one: there the batch decodes plainly and each drafter is told
which tokens went by. Every token goes through the
engine's own `_accept` (stops, logprobs, grammar, length), after the cache is rewound to the tokens
kept: a reply that ends is remembered in the prefix store with exactly its own tokens.
"""

from __future__ import annotations

import time

import torch

from qwen35.engine.sampler import sample
from qwen35.engine.speculative import propose_together
from qwen35.engine.scheduler import SequenceStatus


def start_drafter(service, sequence, state=None) -> None:
    """A drafter for a request whose cache holds its first `prefilled` prompt tokens; `state`: the drafter
    snapshot stored with the restored point (else the drafter starts there, without what came before)."""
    if service.speculation is None or sequence.request.prepared is not None:
        return
    sequence.drafter = service.speculation.drafter(service.model, sequence.prompt_ids[:sequence.prefilled], state)


def start_job_drafter(service, job, hit) -> None:
    """A prefix job's drafter (its snapshot goes into the store with the job's), from the hit it starts at."""
    if service.speculation is None:
        return
    state = hit.drafter_state if hit is not None else None
    job.drafter = service.speculation.drafter(service.model, job.token_ids[:job.done], state)


def drafter_snapshot(drafter) -> dict:
    """PrefixStore.store's keywords for a drafter's state beside a snapshot of its cache (shared, not copied:
    the drafter only goes on from there)."""
    if drafter is None:
        return {}
    state = drafter.snapshot(copy=False)
    return {"drafter_state": state, "drafter_bytes": drafter.snapshot_bytes(state)}


def speculative_prefill_logits(service, sequence, piece: list[int]) -> torch.Tensor:
    """The logits [vocab] after a piece of the prompt (of a request or a prefix job), whose hidden states
    its drafter reads."""
    network = service.model.network
    hidden = network.hidden_states(torch.tensor([piece], device=network.input_device), sequence.cache)
    sequence.drafter.feed(piece, hidden)
    return network.lm_head(hidden[:, -1:]).float()[0, -1]


def _ends_reply(service, sequence, token_id: int) -> bool:
    request = sequence.request
    return ((token_id in service.eos_token_ids and not request.ignore_eos) or token_id in request.stop_token_ids
            or (request.constraint is not None and request.constraint.complete))


def _guesses(service, sequences: list) -> list[list[int]]:
    """Each sequence's drafter's guesses after its last token (none without a drafter, or under draft_min),
    the MTP layer's made together (engine/speculative.py propose_together)."""
    settings = service.speculation
    limits = []
    for sequence in sequences:
        request = sequence.request
        room = min(request.max_new_tokens - len(sequence.output_ids), service.context_length - sequence.total_tokens)
        limits.append(min(settings.draft_max, room - 1))
    proposed = propose_together([sequence.drafter for sequence in sequences],
                                [sequence.output_ids[-1] for sequence in sequences], limits)
    return [guesses if len(guesses) >= settings.draft_min else [] for guesses in proposed]


def _sample_positions(service, sequence, raw: torch.Tensor, guesses: list[int]) -> list[int]:
    """Sample the fed positions' logits raw [positions, vocab] in order with the request's own sampler while
    they confirm the guesses: the tokens sampled (the first that differs, or the one after the last guess,
    ends the step)."""
    constraint = sequence.request.constraint
    sampled = []
    for position in range(len(guesses) + 1):
        token = int(sample(service.masked(raw[position : position + 1], [sequence]), [sequence.sampler_state])[0])
        if constraint is not None:
            constraint.advance(token)  # the next position's mask depends on it
        sampled.append(token)
        if position == len(guesses) or token != guesses[position] or _ends_reply(service, sequence, token):
            break
    return sampled


def _deliver(service, sequence, fed: list[int], guesses: list[int], sampled: list[int], hidden: torch.Tensor,
             raw: torch.Tensor) -> None:
    """The drafter told what was kept (hidden [1, kept, H]), the counts, and each sampled token through the
    engine's `_accept` (raw [kept, vocab])."""
    kept = len(sampled)
    if sequence.drafter is not None:
        sequence.drafter.feed(fed[:kept], hidden)
    service.stats.draft_tokens += len(guesses)
    service.stats.accepted_tokens += kept - 1
    service.stats.recent_tokens.append((time.monotonic(), kept))
    logprobs = torch.log_softmax(raw, dim=-1) if sequence.request.top_logprobs is not None else None
    for position, token in enumerate(sampled):
        service._accept(sequence, token, logprobs[position] if logprobs is not None else None, raw[position],
                        constraint_advanced=True)
        if sequence.status is SequenceStatus.FINISHED:
            return


def speculative_step(service, sequence) -> None:
    """One step of the only decoding sequence: its last token and the drafter's guesses, checked at once."""
    settings, network = service.speculation, service.model.network
    verifier = service.batch.verifier_for(sequence, 1 + settings.draft_max)  # None: eager steps
    cache = service.batch.cache
    guesses = _guesses(service, [sequence])[0]
    fed = [sequence.output_ids[-1]] + guesses
    if verifier is not None:
        hidden, raw = verifier.step(fed)
        raw = raw[0]  # [positions, vocab]: the graph's buffer, read before its next step
    else:
        if guesses:
            cache.keep_steps()
        hidden = network.hidden_states(torch.tensor([fed], device=network.input_device), cache)
        raw = network.lm_head(hidden).float()[0]  # [positions, vocab]
    sampled = _sample_positions(service, sequence, raw, guesses)
    kept = len(sampled)  # the token fed first and the guesses sampled
    if verifier is not None:
        verifier.rewind(kept)
    elif guesses:
        cache.rewind(len(fed), kept)
    _deliver(service, sequence, fed, guesses, sampled, hidden[:, :kept].clone(), raw[:kept].clone())


def speculative_batch_step(service, sequences: list) -> None:
    """One step of several decoding sequences, each feeding its last token and its drafter's guesses (rows
    with fewer padded: what follows a row's last guess is never kept), checked in one forward; each row is
    then rewound to its own tokens kept (HybridCache.rewind_rows). As llama-server checks each slot's drafts
    in one batch. Eager: on a GPU the batch's captured plain step is taken instead (engine/service.py)."""
    network = service.model.network
    cache = service.batch.hold(sequences)
    rows = [service.batch.row_of(sequence) for sequence in sequences]
    guesses = _guesses(service, sequences)
    width = 1 + max(len(g) for g in guesses)
    fed = [[sequence.output_ids[-1]] + g for sequence, g in zip(sequences, guesses)]
    ids = [[0] * width for _ in range(cache.batch_size)]
    for row, tokens in zip(rows, fed):
        ids[row] = tokens + [tokens[-1]] * (width - len(tokens))
    if width > 1:
        cache.keep_steps()
    hidden = network.hidden_states(torch.tensor(ids, device=network.input_device), cache)
    raw = network.lm_head(hidden).float()  # [rows, positions, vocab]
    sampled = [_sample_positions(service, sequence, raw[row], g) for sequence, row, g in zip(sequences, rows, guesses)]
    if width > 1:
        keeps = [0] * cache.batch_size
        for row, tokens in zip(rows, sampled):
            keeps[row] = len(tokens)
        cache.rewind_rows(width, keeps)
    for sequence, row, tokens, g, s in zip(sequences, rows, fed, guesses, sampled):
        _deliver(service, sequence, tokens, g, s, hidden[row : row + 1, :len(s)], raw[row, :len(s)])
