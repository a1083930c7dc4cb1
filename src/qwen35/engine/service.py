"""The async engine a server talks to: submit a request, iterate its tokens, cancel it.

One worker thread owns the model. Each step it drops cancelled sequences, admits waiting ones
(continuous batching: they join at the next step, finished ones leave), advances every prefilling
sequence by one chunk and every decoding sequence by one token, samples, and hands each request
its new tokens on the event loop. Torch releases the GIL inside its kernels, so the event loop
stays responsive while the worker computes.

With what a step leaves over, and only while no request waits for a slot, the worker runs prefix
jobs: prefilling tokens a later request is expected to start with (the server asks for the history
the next turn of a chat will send, as the template will render it) into a prefix-store snapshot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from qwen35.engine.cache import PrefixStore
from qwen35.engine.running_batch import RunningBatch
from qwen35.engine.sampler import Sampler, SamplingParams, sample
from qwen35.engine.scheduler import QueueFullError, Scheduler, Sequence, SequenceStatus
from qwen35.engine.speculative_steps import (drafter_snapshot, speculative_batch_step, speculative_prefill_logits,
                                             speculative_step, start_drafter, start_job_drafter)

__all__ = ["EngineService", "GenerationRequest", "PrefixStore", "QueueFullError", "RequestHandle",
           "ServiceClosedError", "StepOutput", "TokenOutput", "Finish", "TokenConstraint"]


class ServiceClosedError(Exception):
    """The engine is shutting down or not started: the client should come back later."""


class TokenConstraint(Protocol):
    """Restricts which tokens may come next (e.g. a JSON grammar); used from the worker thread only."""

    def allowed(self) -> torch.Tensor | None:  # bool [vocab] or None for "anything"
        ...

    def advance(self, token_id: int) -> None: ...

    @property
    def complete(self) -> bool: ...


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False  # the model's end tokens do not stop it (stop_token_ids still do)
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    constraint: TokenConstraint | None = None
    snapshot_points: tuple[int, ...] = ()  # prompt positions worth keeping a state snapshot at
    # A prompt with images (`model.multimodal.PreparedPrompt`): prompt_ids are its token_ids, its
    # cache_key (images' tokens replaced by their pixels' fingerprint) keys the prefix store.
    prepared: Any = None

    @property
    def prefix_key(self) -> list[int]:
        return self.prepared.cache_key if self.prepared is not None else self.prompt_ids


@dataclass(slots=True)
class TokenOutput:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass(slots=True)
class StepOutput:
    tokens: list[TokenOutput]
    finish: Finish | None = None


class RequestHandle:
    """The event-loop side of one request: async iteration over its StepOutputs, and cancel()."""

    def __init__(self, service: EngineService, sequence: Sequence, loop: asyncio.AbstractEventLoop):
        self._service = service
        self.sequence = sequence
        self._loop = loop
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.finished = False

    def deliver(self, output: StepOutput) -> None:  # from the worker thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

    async def __aiter__(self):
        while not self.finished:
            output = await self._queue.get()
            if output.finish is not None:
                self.finished = True
            yield output

    def cancel(self) -> None:
        if not self.finished:
            self._service.scheduler.cancel(self.sequence)


@dataclass
class EngineStats:
    requests_by_reason: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_jobs: dict[str, int] = field(default_factory=dict)  # by outcome: stored, cached, adopted, failed
    draft_tokens: int = 0  # speculative decoding: guesses checked
    accepted_tokens: int = 0  # ... and kept
    recent_tokens: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, count)

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        counted = sum(count for stamp, count in list(self.recent_tokens) if now - stamp <= window_s)
        return counted / window_s


@dataclass(eq=False)
class PrefixJob:
    """Tokens to prefill into a prefix-store snapshot in idle time; `cache` holds the first `done`."""

    token_ids: list[int]
    cache: Any = None
    done: int = 0
    drafter: Any = None  # speculating: the guesser reading the same tokens (engine/speculative_steps.py)

    def is_prefix_of(self, token_ids: list[int]) -> bool:
        return len(self.token_ids) <= len(token_ids) and token_ids[:len(self.token_ids)] == self.token_ids


JOB_PIECE_S = 0.025  # a prefix job's piece of prefill takes about this long (at least one forward)


class _WorkerCall:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def __call__(self) -> None:
        if self.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
            try:
                self.future.set_result(self.fn())
            except Exception as error:  # the caller's to report; the worker goes on
                self.future.set_exception(error)


class EngineService:
    """Continuous batching over `model.forward` with a bounded queue and a prefix store."""

    def __init__(self, model, *, max_running: int = 4, max_waiting: int = 64, context_length: int = 4096,
                 prefill_chunk: int = 512, prefix_cache_bytes: int = 1 << 30, speculation=None):
        self.model = model
        # engine.speculative.Speculation: while one request decodes, its steps check guesses
        # (engine/speculative_steps.py); with more, the batch decodes plainly.
        self.speculation = speculation
        self.context_length = context_length
        self.prefill_chunk = prefill_chunk
        self.scheduler = Scheduler(max_running=max_running, max_waiting=max_waiting)
        self.prefix_store = PrefixStore(prefix_cache_bytes)
        self.stats = EngineStats()
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.batch = RunningBatch(model, max_rows=max_running)  # the decoding rows
        self._job_piece = min(16, prefill_chunk)  # tokens per prefix-job piece, adapted to the prefill speed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="qwen35-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self.scheduler.close()
        for sequence in self.scheduler.drain():
            self._deliver_finish(sequence, "cancelled")
        for call in self.scheduler.drop_calls():
            call.future.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- event-loop side --------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        if self._closing or self._loop is None:
            raise ServiceClosedError("The server is shutting down; retry on another instance or later.")
        sequence = Sequence(prompt_ids=list(request.prompt_ids), request=request)
        handle = RequestHandle(self, sequence, self._loop)
        sequence.sink = handle
        self.scheduler.add(sequence)
        return handle

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """fn() on the worker thread before its next step, awaited on the event loop: work that needs the
        model between two steps (an embedding's forward pass), since the model is the worker's alone."""
        if self._closing or self._loop is None:
            raise ServiceClosedError("The server is shutting down; retry on another instance or later.")
        call = _WorkerCall(fn)
        self.scheduler.add_call(call)
        return asyncio.wrap_future(call.future, loop=self._loop)

    def prepare_prefix(self, token_ids: list[int]) -> None:
        """Have the worker prefill `token_ids` into a prefix-store snapshot when it has time to spare, so
        that a later request starting with them finds them cached (thread-safe; never blocks)."""
        if self._closing or self.prefix_store.budget_bytes <= 0 or not token_ids \
                or len(token_ids) > self.context_length:
            return
        self.scheduler.add_background(PrefixJob(list(token_ids)))

    @property
    def prefix_jobs_pending(self) -> int:
        return self.scheduler.background_depth

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def running(self) -> int:
        return self.scheduler.running_count

    # --- worker side ------------------------------------------------------------------------

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                step = self.scheduler.next_step(timeout=0.5)
                if step is None:
                    return
                try:
                    self._run_step(step)
                except Exception as error:  # a bug or out-of-memory: fail these requests, keep serving
                    self.batch.clear()
                    for sequence in step.running:
                        if sequence.status is not SequenceStatus.FINISHED:
                            self._finish(sequence, "error", error=f"{type(error).__name__}: {error}")

    def _run_step(self, step) -> None:
        for call in step.calls:
            call()
        for sequence in step.dropped:
            self._deliver_finish(sequence, "cancelled")
        for sequence in step.admitted:
            self._admit(sequence)
        # Taken before prefill: a sequence whose prompt completes now samples its first token from
        # the prefill's logits and joins the decoding batch at the next step.
        decoding = [seq for seq in step.running if seq.status is SequenceStatus.DECODING]
        ready: list[tuple[Sequence, torch.Tensor]] = []
        # Prompt tokens per step are bounded, so a burst of long prompts delays the running streams by
        # one chunk's worth of compute per token at most.
        budget = self.prefill_chunk
        for sequence in step.running:
            if sequence.status is not SequenceStatus.PREFILLING:
                continue
            if budget <= 0 and sequence.prefilled < len(sequence.prompt_ids):
                continue
            try:
                logits, used = self._prefill_chunk(sequence, budget)
            except Exception as error:  # this prompt only (an out-of-memory, a bug): the others go on
                self._finish(sequence, "error", error=f"{type(error).__name__}: {error}")
                continue
            budget -= used
            if logits is not None:
                ready.append((sequence, logits))
        if len(decoding) == 1 and decoding[0].drafter is not None:
            speculative_step(self, decoding[0])
        elif len(decoding) > 1 and any(seq.drafter is not None for seq in decoding) and not self._graphs():
            speculative_batch_step(self, decoding)
        elif decoding:
            for sequence in decoding:
                if sequence.drafter is not None:
                    sequence.drafter.skip(sequence.output_ids[-1:])
            ready.extend(zip(decoding, self.batch.step(decoding)))
        elif self.batch:
            self.batch.clear()
        if ready:
            self._sample_and_deliver(ready)
        if step.background is not None:  # offered only when no request runs or waits
            self._advance_job(step.background)

    def _graphs(self) -> bool:
        """Whether the model's device captures decode steps (then a batch decodes plainly, in its graph)."""
        from qwen35.engine import cuda_graphs

        return cuda_graphs.graphs_supported(self.model)

    def _admit(self, sequence: Sequence) -> None:
        request = sequence.request
        sequence.sampler_state = Sampler(request.sampling, sequence.prompt_ids)
        key = request.prefix_key
        hit = self.prefix_store.lookup(key)
        # A prefix job this prompt starts with is work the request would do anyway: it takes the
        # job's state over when the job got further than the store; the tokens it had prefilled
        # before this request came count as cached, the rest the request prefills itself.
        jobs = self.scheduler.take_background(lambda job: job.is_prefix_of(key))
        for job in jobs:
            self._count_job("adopted")
        job = max(jobs, key=lambda job: job.done, default=None)
        prompt_length = len(sequence.prompt_ids)
        state = None  # the restored point's drafter state, where speculating
        if job is not None and job.cache is not None and job.done > (hit.length if hit is not None else 0):
            self.stats.prefix_hits += 1
            sequence.cache = job.cache
            sequence.cache.reserve(tokens=prompt_length)
            sequence.prefilled = sequence.cached_tokens = job.done
            state = job.drafter.snapshot(copy=False) if job.drafter is not None else None
        elif hit is None:
            self.stats.prefix_misses += 1
            sequence.cache = self.model.make_cache(1)
            sequence.cache.reserve(tokens=prompt_length)  # the prompt's chunks never move its K/V
        else:
            self.stats.prefix_hits += 1
            # The whole prompt: the snapshot itself goes into the decoding batch, which copies its row.
            sequence.cache = hit.cache if hit.length == prompt_length else hit.restore(capacity=prompt_length)
            sequence.prefilled = sequence.cached_tokens = hit.length
            sequence.ready_logits = hit.last_logits
            state = hit.drafter_state
        start_drafter(self, sequence, state)

    def _prefill_chunk(self, sequence: Sequence, budget: int) -> tuple[torch.Tensor | None, int]:
        """Advance one chunk of at most `budget` tokens, ending at a snapshot point when one is near.

        Returns the logits after the prompt's last token once it is all in (else None), and the
        number of tokens fed."""
        prompt, key, prepared = sequence.prompt_ids, sequence.request.prefix_key, sequence.request.prepared
        if sequence.prefilled == len(prompt):  # the whole prompt came from the prefix store
            sequence.status = SequenceStatus.DECODING
            return sequence.ready_logits, 0
        start = sequence.prefilled
        end = min(len(prompt), start + budget)
        points = [p for p in sequence.request.snapshot_points if sequence.prefilled < p < end]
        if points:
            end = points[0]
        if prepared is not None:  # image features and M-RoPE positions for this slice
            last_logits = self.model.forward_prompt(prepared, sequence.cache, start, end)[0, -1].float()
        elif sequence.drafter is not None:  # the drafter reads the prompt's hidden states too
            last_logits = speculative_prefill_logits(self, sequence, prompt[start:end])
        else:
            last_logits = self._last_logits(torch.tensor([prompt[start:end]], dtype=torch.long), sequence.cache)
        sequence.prefilled = end
        if end in sequence.request.snapshot_points or end == len(prompt):
            # Shared, not copied: this cache is only fed further, then copied into the batch.
            self.prefix_store.store(key[:end], sequence.cache.shared(), last_logits, select_row=None,
                                    **drafter_snapshot(sequence.drafter))
        if end < len(prompt):
            return None, end - start
        sequence.status = SequenceStatus.DECODING
        return last_logits, end - start

    def _advance_job(self, job: PrefixJob) -> None:
        """One piece of a prefix job, from the longest snapshot its tokens start with. Pieces are sized
        to take about JOB_PIECE_S, so a request arriving meanwhile waits about that long at most."""
        ids = job.token_ids
        try:
            if job.cache is None:
                hit = self.prefix_store.lookup(ids)
                if hit is not None and hit.length == len(ids):
                    return self._end_job(job, "cached")
                if hit is not None:
                    job.cache = hit.restore(capacity=len(ids))
                else:
                    job.cache = self.model.make_cache(1)
                    job.cache.reserve(tokens=len(ids))
                job.done = hit.length if hit is not None else 0
                start_job_drafter(self, job, hit)
            end = min(len(ids), job.done + self._job_piece)
            started = time.perf_counter()
            if job.drafter is not None:  # its drafter reads the hidden states too, as a request's would
                logits = speculative_prefill_logits(self, job, ids[job.done:end])
            else:
                logits = self._last_logits(torch.tensor([ids[job.done:end]], dtype=torch.long), job.cache)
            elapsed = time.perf_counter() - started
            rate = (end - job.done) / max(elapsed, 1e-6)
            self._job_piece = min(self.prefill_chunk, max(2, int(rate * JOB_PIECE_S)))
            job.done = end
            if end == len(ids):
                self.prefix_store.store(ids, job.cache, logits.float(), select_row=None, **drafter_snapshot(job.drafter))
                self._end_job(job, "stored")
        except Exception:  # an out-of-memory or a bug: the job was only ever a bonus
            self._end_job(job, "failed")

    def _last_logits(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits after the last of `ids` (one row): the output head runs on that position only when the
        model lets us reach its network (the head costs as much as a small model's layers per token)."""
        network = getattr(self.model, "network", None)
        if network is None or ids.shape[1] > self.prefill_chunk:
            return self.model.forward(ids, cache, last_only=True)[0, -1].float()
        return network.forward(ids.to(self.model.device), cache, last_only=True)[0, -1]

    def _end_job(self, job: PrefixJob, outcome: str) -> None:
        self.scheduler.take_background(lambda queued: queued is job)
        job.cache = job.drafter = None
        self._count_job(outcome)

    def _count_job(self, outcome: str) -> None:
        self.stats.prefix_jobs[outcome] = self.stats.prefix_jobs.get(outcome, 0) + 1

    @staticmethod
    def masked(raw: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """Logits [rows, vocab] with what each sequence's constraint forbids at -inf."""
        masked = raw.clone()
        for row, sequence in enumerate(sequences):
            constraint = sequence.request.constraint
            allowed = constraint.allowed() if constraint is not None else None
            if allowed is not None:
                allowed = allowed.to(masked.device)
                width = min(allowed.numel(), masked.shape[1])
                masked[row, :width].masked_fill_(~allowed[:width], float("-inf"))
                masked[row, width:] = float("-inf")
        return masked

    def _sample_and_deliver(self, ready: list[tuple[Sequence, torch.Tensor]]) -> None:
        raw = torch.stack([logits for _, logits in ready])
        masked = self.masked(raw, [sequence for sequence, _ in ready])
        tokens = sample(masked, [sequence.sampler_state for sequence, _ in ready]).tolist()
        want_logprobs = any(sequence.request.top_logprobs is not None for sequence, _ in ready)
        logprobs = torch.log_softmax(raw, dim=-1) if want_logprobs else None
        self.stats.recent_tokens.append((time.monotonic(), len(ready)))
        for row, ((sequence, _), token_id) in enumerate(zip(ready, tokens)):
            self._accept(sequence, token_id, logprobs[row] if logprobs is not None else None, raw[row])

    def _accept(self, sequence: Sequence, token_id: int, logprobs: torch.Tensor | None,
                logits: torch.Tensor, constraint_advanced: bool = False) -> None:
        request = sequence.request
        sequence.output_ids.append(token_id)
        self.stats.generated_tokens += 1
        if request.constraint is not None and not constraint_advanced:
            request.constraint.advance(token_id)
        if (token_id in self.eos_token_ids and not request.ignore_eos) or token_id in request.stop_token_ids:
            self._remember_turn(sequence, logits)
            self._finish(sequence, "stop")
            return
        output = TokenOutput(token_id)
        if logprobs is not None and request.top_logprobs is not None:
            output.logprob = float(logprobs[token_id])
            if request.top_logprobs > 0:
                values, ids = logprobs.topk(request.top_logprobs)
                output.top_logprobs = list(zip(ids.tolist(), values.tolist()))
        reason = None
        if request.constraint is not None and request.constraint.complete:
            reason = "stop"
            self._remember_turn(sequence, logits)
        elif len(sequence.output_ids) >= request.max_new_tokens or sequence.total_tokens >= self.context_length:
            reason = "length"
        if reason is None:
            sequence.sink.deliver(StepOutput([output]))
        else:
            self._finish(sequence, reason, last=[output])

    def _remember_turn(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Keep the state after a reply that ended by itself: the next request of an agent loop repeats
        this reply (a tool call re-rendered as it was written) and can start after it."""
        row = self.batch.row_of(sequence)
        if row is not None:  # else it ended on its first token, before joining the batch: the prompt's snapshot covers it
            fed = sequence.request.prefix_key + sequence.output_ids[:-1]
            self.prefix_store.store(fed, self.batch.cache, logits, select_row=row, **drafter_snapshot(sequence.drafter))

    def _finish(self, sequence: Sequence, reason: str, last: list[TokenOutput] | None = None,
                error: str | None = None) -> None:
        self.scheduler.finish(sequence)
        self._deliver_finish(sequence, reason, last or [], error)

    def _deliver_finish(self, sequence: Sequence, reason: str, last: list[TokenOutput] | None = None,
                        error: str | None = None) -> None:
        sequence.status = SequenceStatus.FINISHED
        sequence.cache = sequence.drafter = None  # frees the slot's memory now, not when the client goes away
        stats = self.stats
        stats.requests_by_reason[reason] = stats.requests_by_reason.get(reason, 0) + 1
        stats.prompt_tokens += len(sequence.prompt_ids)
        stats.cached_tokens += sequence.cached_tokens
        finish = Finish(reason, len(sequence.prompt_ids), sequence.cached_tokens, len(sequence.output_ids), error)
        sequence.sink.deliver(StepOutput(last or [], finish))
