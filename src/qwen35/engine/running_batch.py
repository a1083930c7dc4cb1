"""The server's running batch: the decoding sequences' rows in one cache, stepped together.

Sequences join (their prefilled row copied in) and leave (the last row moved into theirs) one row at
a time, so nobody else's K/V is copied. On a GPU the step is a CUDA graph (engine/cuda_graphs.py) of
a power-of-two number of rows: a leaver's row goes idle and a newcomer is copied into an idle row, so
clients coming and going cause no new capture. A sequence decoding alone with speculation checks its
guesses in steps of its own (engine/speculative_steps.py): on a GPU, once it has been alone a while, in a
captured verification step (`verifier_for`), released when others join.
"""

from __future__ import annotations

import torch

# Decode steps a batch runs eagerly with unchanged rows before its step is captured in a CUDA graph:
# capturing costs about as much as a few dozen eager steps, so a batch whose rows change every few
# tokens (clients coming and going) is not recaptured at each change.
GRAPH_AFTER_STEADY_STEPS = 8


def graph_batch_size(sequences: int, max_running: int) -> int:
    """Rows of a server's CUDA graph for this many sequences: the next power of two (room for newcomers
    without a new capture), no more than the server runs at once."""
    size = 1
    while size < sequences:
        size *= 2
    return max(sequences, min(size, max_running))


class RunningBatch:
    """`rows[i]` is the sequence whose state is row i of `cache` (None: an idle row of the graph)."""

    def __init__(self, model, max_rows: int, graphs: bool = True):
        self.model, self.max_rows = model, max_rows
        self.graphs = graphs  # off: every step eager
        self.rows: list = []
        self.cache = None
        self.decoder = None  # on a GPU: a CUDA-graph decoder over `cache`
        self.verifier = None  # on a GPU: a speculative verification graph over `cache`'s one row
        self._steady_steps = 0  # steps since the rows last changed
        self._small_steps = 0  # steps the graph's rows have been half idle or more
        self._alone_steps = 0  # speculative steps of the same sequence alone, in a row

    def clear(self) -> None:
        self.rows, self.cache, self.decoder, self.verifier = [], None, None, None
        self._small_steps = self._alone_steps = 0

    def __bool__(self) -> bool:
        return bool(self.rows)

    def row_of(self, sequence) -> int | None:
        return next((row for row, member in enumerate(self.rows) if member is sequence), None)

    def step(self, sequences: list) -> list[torch.Tensor]:
        """One token for every decoding sequence, in one forward over the running batch's cache (on a GPU,
        one replay of a captured step: a newcomer takes an idle row of the graph, a leaver leaves one)."""
        from qwen35.engine.cuda_graphs import graphs_supported

        self._release_verifier()
        self._alone_steps = 0
        if self.decoder is not None and not self._fit_rows_into_graph(sequences):
            self._release_graph()
        if self.decoder is None:
            if {id(s) for s in sequences} != {id(m) for m in self.rows}:
                self._steady_steps = 0
            self._regroup(sequences)
            self._steady_steps += 1
            # A capture costs many steps' time: only a batch that has kept its rows for a while gets one.
            if self._steady_steps > GRAPH_AFTER_STEADY_STEPS and self.graphs and graphs_supported(self.model):
                self._capture_graph()
        ids = torch.tensor([[0 if member is None else member.output_ids[-1]] for member in self.rows],
                           dtype=torch.long)
        if self.decoder is not None:
            # A copy: the graph's output buffer is written again at the next step.
            logits = self.decoder.step(ids[:, 0])[:, -1].float().clone()
        else:
            logits = self.model.forward(ids, self.cache)[:, -1].float()
        row_of = {id(member): row for row, member in enumerate(self.rows) if member is not None}
        return [logits[row_of[id(sequence)]] for sequence in sequences]

    def hold(self, sequences: list):
        """The batch cache made to hold exactly `sequences` (eager steps), for a step the caller runs itself."""
        self._release_verifier()
        if self.decoder is not None:
            self._release_graph()
        self._regroup(sequences)
        return self.cache

    def verifier_for(self, sequence, tokens: int):
        """A captured verification step of `tokens` tokens over `sequence`'s row alone (engine/cuda_graphs.py),
        where the model's device captures and the sequence has been alone for a while; else None (the caller
        then `hold`s the cache and runs its step eagerly)."""
        from qwen35.engine.cuda_graphs import VerificationGraph, graphs_supported, room_for

        alone = len(self.rows) == 1 and self.rows[0] is sequence and self.decoder is None
        if alone and self.verifier is not None and self.verifier.tokens == tokens:
            return self.verifier
        cache = self.hold([sequence])
        self._alone_steps = self._alone_steps + 1 if alone else 1
        # As for the batch's graph: a capture costs many steps' time, so only a sequence that stays alone gets one.
        if self._alone_steps > GRAPH_AFTER_STEADY_STEPS and self.graphs and graphs_supported(self.model):
            self.verifier = VerificationGraph(self.model, cache, tokens, room_for(int(cache.lengths[0])))
        return self.verifier

    def _release_verifier(self) -> None:
        if self.verifier is not None:
            self.verifier.release()
            self.verifier = None
    def _capture_graph(self) -> None:
        """A CUDA-graph decoder over the batch, with idle rows up to its size bucket for newcomers."""
        from qwen35.engine.cuda_graphs import GraphDecoder, room_for

        size = graph_batch_size(len(self.rows), self.max_rows)
        idle = list(range(len(self.rows), size))
        for _ in idle:
            self.cache.append(self.model.make_cache(1))
            self.rows.append(None)
        longest = int(self.cache.lengths.max())
        self.decoder = GraphDecoder(self.model, self.cache, room_for(longest), idle_rows=idle)

    def _fit_rows_into_graph(self, sequences: list) -> bool:
        """The graph's rows made to hold `sequences`, in place: a leaver's row goes idle, a newcomer is
        copied into an idle row. False when they do not fit its size, or have filled half of it or less
        for a while (a smaller graph would step faster: a batch of one has its own fused launches; a dip
        while newcomers prefill is not worth a capture)."""
        size = self.decoder.batch_size
        if len(sequences) > size:
            return False
        self._small_steps = self._small_steps + 1 if len(sequences) <= size // 2 else 0
        if self._small_steps > GRAPH_AFTER_STEADY_STEPS:
            return False
        wanted = {id(sequence) for sequence in sequences}
        for row, member in enumerate(self.rows):
            if member is not None and id(member) not in wanted:
                self.decoder.vacate(row)
                self.rows[row] = None
        present = {id(member) for member in self.rows if member is not None}
        for sequence in sequences:
            if id(sequence) not in present:
                row = self.rows.index(None)
                self.decoder.install(row, sequence.cache)
                self.rows[row] = sequence
                sequence.cache = None  # its row lives in the batch cache now
        return True

    def _release_graph(self) -> None:
        """Back to eager steps over the batch cache, its idle rows removed."""
        cache = self.decoder.release()
        for row in sorted(self.decoder.idle, reverse=True):  # from the end: a moved-in last row is live
            cache.remove(row)
            moved = self.rows.pop()
            if row < len(self.rows):
                self.rows[row] = moved
        self.decoder = None
        self._steady_steps = self._small_steps = 0

    def _regroup(self, sequences: list) -> None:
        """Make the batch cache hold `sequences`, one row at a time: a row that left gets the last row
        moved into it, a newcomer's row is copied in after the others (into reserved storage), so
        nobody else's K/V is copied."""
        wanted = {id(sequence) for sequence in sequences}
        for row in reversed(range(len(self.rows))):
            if id(self.rows[row]) not in wanted:
                self.cache.remove(row)
                moved = self.rows.pop()
                if row < len(self.rows):
                    self.rows[row] = moved
        present = {id(member) for member in self.rows}
        for sequence in sequences:
            if id(sequence) in present:
                continue
            if self.cache is None:
                self.cache = type(sequence.cache).empty_like(sequence.cache)
            self.cache.append(sequence.cache)
            self.rows.append(sequence)
            sequence.cache = None  # its row lives in the batch cache now
