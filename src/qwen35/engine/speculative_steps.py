"""Speculative decoding in the server's engine (engine/service.py), as llama-server does it per slot.

A request gets a drafter (engine/speculative.py) when the server speculates and its prompt has no
images; its prompt's pieces then go through the network's hidden states, which the MTP layer reads.
While it is the only request decoding, its steps feed the last token and the drafter's guesses and
sample position by position, as `SpeculativeDecoder.step` does (on a GPU, once it has been alone a
while, in a captured verification step: RunningBatch.verifier_for); with others decoding beside it, the
batch decodes plainly (a CUDA graph on a GPU) and the drafter is told which tokens went by. Every token goes through the
engine's own `_accept` (stops, logprobs, grammar, length), after the cache is rewound to the tokens
kept: a reply that ends is remembered in the prefix store with exactly its own tokens.
"""

from __future__ import annotations

import time

import torch

from qwen35.engine.sampler import sample
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


def speculative_step(service, sequence) -> None:
    """One step of the only decoding sequence: its last token and the drafter's guesses, checked at once."""
    request, settings, network = sequence.request, service.speculation, service.model.network
    verifier = service.batch.verifier_for(sequence, 1 + settings.draft_max)  # None: eager steps
    cache = service.batch.cache
    token_id = sequence.output_ids[-1]
    room = min(request.max_new_tokens - len(sequence.output_ids), service.context_length - sequence.total_tokens)
    guesses = sequence.drafter.propose(token_id, min(settings.draft_max, room - 1))
    if len(guesses) < settings.draft_min:
        guesses = []
    fed = [token_id] + guesses
    if verifier is not None:
        hidden, raw = verifier.step(fed)
        raw = raw[0]  # [positions, vocab]: the graph's buffer, read before its next step
    else:
        if guesses:
            cache.keep_steps()
        hidden = network.hidden_states(torch.tensor([fed], device=network.input_device), cache)
        raw = network.lm_head(hidden).float()[0]  # [positions, vocab]
    sampled = []
    for position in range(len(fed)):
        token = int(sample(service.masked(raw[position : position + 1], [sequence]), [sequence.sampler_state])[0])
        if request.constraint is not None:
            request.constraint.advance(token)  # the next position's mask depends on it
        sampled.append(token)
        if position == len(guesses) or token != guesses[position] or _ends_reply(service, sequence, token):
            break
    kept = len(sampled)  # the token fed first and the guesses sampled
    if verifier is not None:
        verifier.rewind(kept)
        hidden, raw = hidden[:, :kept].clone(), raw[:kept].clone()
    elif guesses:
        cache.rewind(len(fed), kept)
    sequence.drafter.feed(fed[:kept], hidden[:, :kept])
    service.stats.draft_tokens += len(guesses)
    service.stats.accepted_tokens += kept - 1
    service.stats.recent_tokens.append((time.monotonic(), kept))
    logprobs = torch.log_softmax(raw[:kept], dim=-1) if request.top_logprobs is not None else None
    for position, token in enumerate(sampled):
        service._accept(sequence, token, logprobs[position] if logprobs is not None else None, raw[position],
                        constraint_advanced=True)
        if sequence.status is SequenceStatus.FINISHED:
            return
