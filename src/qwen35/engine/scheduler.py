"""Scheduling policy only: who waits, who runs, who leaves. No tensors, no model.

The event loop adds and cancels sequences; the engine's worker thread asks for the next step. A
bounded waiting queue turns overload into an immediate "come back later" instead of a growing
backlog, and a cancelled sequence leaves at the next step whichever queue it is in.

Background jobs (work that only pays off for a later request, such as prefilling the history the
next turn of a chat will send) come last: a step offers one only while no request runs or waits, and
past `max_background` queued jobs the oldest is dropped.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFullError(Exception):
    """The waiting queue is full: the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    """One request's plain state as it moves through the engine."""

    prompt_ids: list[int]
    request: Any  # the engine's GenerationRequest
    sink: Any = None  # where the engine delivers outputs (the request handle)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    cancelled: bool = False
    cache: Any = None
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    prefilled: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    sampler_state: Any = None
    ready_logits: Any = None  # logits for the first token when the prefix store held the whole prompt
    drafter: Any = None  # speculative decoding's guesser for this sequence (engine/speculative.py)

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class Step:
    """What the worker does next: drop the cancelled, start the admitted, advance the running, and
    work on `background` (None while requests wait) with what is left. `calls` run first: work that needs the
    model between two steps (an embedding's forward pass)."""

    dropped: list[Sequence]
    admitted: list[Sequence]
    running: list[Sequence]
    background: Any = None
    calls: list[Callable[[], None]] = field(default_factory=list)


class Scheduler:
    def __init__(self, max_running: int, max_waiting: int, max_background: int = 8):
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        if max_waiting < 0 or max_background < 0:
            raise ValueError("max_waiting and max_background must not be negative")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_background = max_background
        self.background_dropped = 0
        self._background: deque[Any] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cancelled: list[Sequence] = []
        self._closed = False
        self._changed = threading.Condition()

    # --- called from the event loop ---------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        with self._changed:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            # A cancelled sequence's slot counts as free already: it leaves at the next step.
            free_slots = self.max_running - len(self._running) + len(self._cancelled)
            if len(self._waiting) >= self.max_waiting + max(free_slots, 0):
                raise QueueFullError(
                    f"The server is busy: {len(self._running)} requests running and "
                    f"{len(self._waiting)} waiting (the queue holds {self.max_waiting}). Retry shortly.",
                    retry_after_s=1 + len(self._waiting) // max(self.max_running, 1))
            self._waiting.append(sequence)
            self._changed.notify_all()

    def cancel(self, sequence: Sequence) -> None:
        with self._changed:
            if sequence.cancelled or sequence.status is SequenceStatus.FINISHED:
                return
            sequence.cancelled = True
            self._cancelled.append(sequence)
            self._changed.notify_all()

    def add_background(self, job) -> None:
        """Queue a job for idle time; the oldest queued job makes room when the queue is full."""
        with self._changed:
            if self._closed or self.max_background == 0:
                self.background_dropped += 1
                return
            self._background.append(job)
            while len(self._background) > self.max_background:
                self._background.popleft()
                self.background_dropped += 1
            self._changed.notify_all()

    def add_call(self, call: Callable[[], None]) -> None:
        """Run `call` on the worker before its next step."""
        with self._changed:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._calls.append(call)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # --- called from the worker -------------------------------------------------------------

    def next_step(self, timeout: float | None = None) -> Step | None:
        """The next step's work, waiting up to `timeout` for some; None when closed and idle."""
        with self._changed:
            while not (self._waiting or self._running or self._cancelled or self._background or self._calls):
                if self._closed:
                    return None
                if not self._changed.wait(timeout):
                    return Step([], [], [])
            dropped = [seq for seq in self._cancelled if seq.status is not SequenceStatus.FINISHED]
            self._cancelled.clear()
            if dropped:
                gone = set(map(id, dropped))
                self._waiting = deque(seq for seq in self._waiting if id(seq) not in gone)
                self._running = [seq for seq in self._running if id(seq) not in gone]
            admitted = []
            while self._waiting and len(self._running) < self.max_running:
                sequence = self._waiting.popleft()
                sequence.status = SequenceStatus.PREFILLING
                self._running.append(sequence)
                admitted.append(sequence)
            for sequence in dropped:
                sequence.status = SequenceStatus.FINISHED
            idle = not self._waiting and not self._running
            background = self._background[0] if self._background and idle else None
            calls = list(self._calls)
            self._calls.clear()
            return Step(dropped=dropped, admitted=admitted, running=list(self._running), background=background,
                        calls=calls)

    def finish(self, sequence: Sequence) -> None:
        with self._changed:
            sequence.status = SequenceStatus.FINISHED
            if sequence in self._running:
                self._running.remove(sequence)

    def take_background(self, wanted) -> list[Any]:
        """Remove and return the queued jobs for which `wanted(job)` is true (done, dropped or adopted)."""
        with self._changed:
            taken = [job for job in self._background if wanted(job)]
            if taken:
                gone = set(map(id, taken))
                self._background = deque(job for job in self._background if id(job) not in gone)
            return taken

    def drain(self) -> list[Sequence]:
        """Everything not yet finished, removed at once (shutdown)."""
        with self._changed:
            left = list(self._waiting) + self._running
            self._background.clear()
            self._waiting.clear()
            self._running.clear()
            self._cancelled.clear()
            for sequence in left:
                sequence.status = SequenceStatus.FINISHED
            return left

    def drop_calls(self) -> list[Callable[[], None]]:
        """The calls not yet run, removed (shutdown)."""
        with self._changed:
            calls = list(self._calls)
            self._calls.clear()
            return calls

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def background_depth(self) -> int:
        return len(self._background)

    @property
    def running_count(self) -> int:
        return len(self._running)
