"""Decode steps replayed from a CUDA graph: the whole network as one launch per token.

A decode step is hundreds of small kernels. Launched one by one from Python, their
launch costs exceed their run time on a GPU; a captured graph replays them with none
of that. A graph reads and writes fixed addresses, so `GraphDecoder` first pins the
cache it decodes into:
- K/V gets its whole capacity up front (pages, on GPU layers), so no shape or address
  depends on the lengths; attention reads each row's own length on the device;
- DeltaNet states are updated in place (the cache's own copies: a snapshot may have
  shared the old tensors), and the lengths and positions are advanced in place;
- the token ids go in through a fixed buffer, the logits come out of another.
Nothing in the step reads a device value on the host (the kernels of fast_cuda are
built for that). `release()` hands the cache back as an ordinary one, holding every
token decoded.

A server's batch changes as clients come and go. Its graph keeps its rows: a row whose
sequence ended is left idle (`vacate`: emptied, fed a token that nobody reads, its length
put back to 0 before each step), and a newcomer is copied into an idle row in place
(`install`). The graph is captured again only when K/V needs more room.

Speculative decoding checks a token and its guesses in one step, each mixer taking them one at a time
and each DeltaNet layer keeping its state after every one (HybridCache.keep_steps): eagerly that is
several times a one-token step's launches. `VerificationGraph` captures such a step of a fixed number of
tokens over a pinned one-row cache (fewer guesses are padded: what follows the last guess is never kept),
and `rewind` keeps the first tokens by copying the kept states in place. The MTP layer's guesses are a chain
of one-token forwards, each fed the last one's top token: `GuessGraph` captures the whole chain, the tokens
never leaving the device until the host reads them all at once.
"""

from __future__ import annotations

import torch

from qwen35.engine.cache import DeltaNetState, HybridCache
from qwen35.errors import Qwen35Error


# K/V room a graph is captured with: the tokens already held and the next stretch, in whole steps of this.
ROOM_STEP = 256


def room_for(tokens: int) -> int:
    """K/V room for a graph over a cache holding `tokens` tokens (a capture doubles it when it fills)."""
    return -(-(tokens + ROOM_STEP) // ROOM_STEP) * ROOM_STEP


def graphs_supported(model) -> bool:
    """Whether decode on this model's device can be captured (CUDA, fast kernels)."""
    from qwen35.kernels import fast_cuda

    device = getattr(model, "device", None)  # stand-in models (tests, fakes) may have none
    if not (isinstance(device, torch.device) and device.type == "cuda" and getattr(model, "precision", None) == "fast"
            and fast_cuda.available()):
        return False
    # A split model (-ngl, --n-cpu-moe) runs part of each step on the CPU: nothing to capture there.
    return all(d.type == "cuda" for d in model.network.devices)


class GraphDecoder:
    """Captured decode steps over `cache` (B rows, on the model's GPU). K/V room starts at `capacity`
    tokens a row and doubles, with a new capture, when a row fills it. `idle_rows`: rows that hold no
    sequence (yet)."""

    def __init__(self, model, cache: HybridCache, capacity: int, idle_rows=()):
        if not graphs_supported(model):
            raise Qwen35Error("CUDA graphs need the model on a CUDA device in fast precision")
        self.model, self.cache = model, cache
        self.host_lengths = [int(n) for n in cache.lengths.tolist()]
        self.token_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        self.idle: set[int] = set()
        self._idle_mask = torch.zeros(cache.batch_size, dtype=torch.bool, device=cache.lengths.device)
        self._capture(max(int(capacity), max(self.host_lengths, default=0) + 1))
        for row in idle_rows:  # (after the pin: the states written in place are the cache's own by then)
            self.vacate(row)

    @property
    def batch_size(self) -> int:
        return len(self.host_lengths)

    def vacate(self, row: int) -> None:
        """Row `row`'s sequence is gone: the row is emptied and decodes nothing anyone reads until `install`."""
        self.cache.clear_row(row)
        self.host_lengths[row] = 0
        self.idle.add(row)
        self._idle_mask[row] = True

    def install(self, row: int, source: HybridCache, source_row: int = 0) -> None:
        """An idle row takes a copy of `source`'s row `source_row` (a newcomer's prefilled prompt), in place."""
        if row not in self.idle:
            raise Qwen35Error(f"row {row} of the graph's batch is not idle")
        length = int(source.lengths[source_row])
        stayed = self.cache.install_row(row, source, source_row)
        self.host_lengths[row] = length
        self.idle.discard(row)
        self._idle_mask[row] = False
        if not stayed or length + 1 > self.capacity:  # K/V moved or needs more room: capture again
            capacity = self.capacity
            while length + 1 > capacity:
                capacity *= 2
            self._capture(capacity)

    def _capture(self, capacity: int) -> None:
        cache = self.cache
        self.capacity = capacity
        _pin_own(cache, capacity)
        _warm_up(self.model, cache, capacity)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = self.model.network(self.token_ids, cache)

    def step(self, token_ids) -> torch.Tensor:
        """Feed one token per row; logits [B, 1, vocab] float32, valid until the next step."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() != len(self.host_lengths):
            raise Qwen35Error(f"{ids.numel()} token ids for a batch of {len(self.host_lengths)}")
        vocab = self.model.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise Qwen35Error(f"token ids must lie in 0..{vocab - 1}")
        if max(self.host_lengths) + 1 > self.capacity:
            self._capture(2 * self.capacity)
        if self.idle:  # an idle row starts again at slot 0 each step: it never needs more room
            self.cache.lengths.masked_fill_(self._idle_mask, 0)
            self.cache.next_positions.masked_fill_(self._idle_mask, 0)
        self.token_ids.copy_(ids.reshape(-1, 1))
        self.graph.replay()
        self.host_lengths = [0 if row in self.idle else n + 1 for row, n in enumerate(self.host_lengths)]
        return self.logits

    def drop(self, tokens: int) -> None:
        """A one-row decoder's last `tokens` tokens taken back (a draft model's guesses the model did not
        keep): lengths and positions lowered in place; the caller puts back the DeltaNet states."""
        if self.batch_size != 1 or not 0 <= tokens <= self.host_lengths[0]:
            raise Qwen35Error(f"cannot take {tokens} tokens back from a decoder of {self.host_lengths} tokens")
        with torch.inference_mode():
            self.cache.lengths.sub_(tokens)
            self.cache.next_positions.sub_(tokens)
        self.host_lengths[0] -= tokens

    def release(self) -> HybridCache:
        """The cache as an ordinary one again (states replaced per step, K/V grown on demand). Idle rows
        stay in it, empty: the caller removes them (`self.idle`)."""
        cache = self.cache
        if self.idle:
            cache.lengths.masked_fill_(self._idle_mask, 0)
            cache.next_positions.masked_fill_(self._idle_mask, 0)
        _unpin(cache)
        self.graph = None
        return cache


def _pin(cache: HybridCache, capacity: int) -> None:
    """K/V room for `capacity` tokens a row, attention over all of it, DeltaNet states of its own updated in place."""
    cache.reserve(rows=cache.batch_size, tokens=capacity)
    for layer in cache.layers:
        if isinstance(layer, DeltaNetState) and not layer.in_place:
            layer.conv, layer.recurrent = layer.conv.clone(), layer.recurrent.clone()
            layer.in_place = True
    cache.static_length = capacity


def _page_slots(cache: HybridCache) -> int:
    """The slots a paged K/V table spans (its width decides the attention kernel's split count), or 0."""
    return max((layer.page_table.shape[1] * layer.page_pool[0].shape[1] for layer in cache.layers
                if hasattr(layer, "page_table")), default=0)


class VerificationGraph:
    """Captured speculative verification steps over a one-row `cache`: `tokens` tokens fed at a time, the
    states after each kept (see the module's note). K/V room starts at `capacity` tokens and doubles, with a
    new capture, when a step would pass it."""

    def __init__(self, model, cache: HybridCache, tokens: int, capacity: int):
        if not graphs_supported(model):
            raise Qwen35Error("CUDA graphs need the model on a CUDA device in fast precision")
        if cache.batch_size != 1:
            raise Qwen35Error(f"a verification graph decodes one sequence, not {cache.batch_size}")
        self.model, self.cache, self.tokens = model, cache, tokens
        self.host_length = int(cache.lengths[0])
        self.token_ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
        self._capture(max(int(capacity), self.host_length + tokens))

    def _capture(self, capacity: int) -> None:
        cache, network = self.cache, self.model.network
        self.capacity = capacity
        _pin_own(cache, capacity)
        _warm_up(self.model, cache, capacity, tokens=self.tokens)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            cache.keep_steps()
            self.hidden = network.hidden_states(self.token_ids, cache)
            self.logits = network.lm_head(self.hidden).float()
        # Each replay writes every DeltaNet layer's states after each token here (the capture's tensors).
        self.kept_states = [layer.steps for layer in cache.layers if isinstance(layer, DeltaNetState)]
        _end_keeping_steps(cache)

    def step(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `token_ids` (1 to `tokens` of them; the rest padded); (hidden [1, tokens, H], logits
        [1, tokens, vocab] float32), valid until the next step. Then `rewind` says how many are kept."""
        if not 1 <= len(token_ids) <= self.tokens:
            raise Qwen35Error(f"a verification step feeds 1 to {self.tokens} tokens, not {len(token_ids)}")
        if self.host_length + self.tokens > self.capacity:
            capacity = self.capacity
            while self.host_length + self.tokens > capacity:
                capacity *= 2
            self._capture(capacity)
        padded = list(token_ids) + [token_ids[-1]] * (self.tokens - len(token_ids))
        with torch.inference_mode():
            self.token_ids.copy_(torch.tensor([padded], dtype=torch.long))
            self.graph.replay()
        self.host_length += self.tokens
        return self.hidden, self.logits

    def rewind(self, keep: int) -> None:
        """Keep the first `keep` tokens the last step fed, as if only they had been fed."""
        if not 1 <= keep <= self.tokens:
            raise Qwen35Error(f"cannot keep {keep} of {self.tokens} tokens")
        dropped = self.tokens - keep
        if dropped:
            layers = [layer for layer in self.cache.layers if isinstance(layer, DeltaNetState)]
            with torch.inference_mode():
                for layer, states in zip(layers, self.kept_states):
                    layer.store(*states[keep])  # in place: the graph reads these tensors
                self.cache.lengths.sub_(dropped)
                self.cache.next_positions.sub_(dropped)
        self.host_length -= dropped

    def release(self) -> HybridCache:
        """The cache as an ordinary one again (see GraphDecoder.release)."""
        _unpin(self.cache)
        self.graph, self.kept_states = None, []
        return self.cache


class GuessGraph:
    """The MTP layer's chain of `guesses` guesses (engine/speculative.py MtpDrafter.propose), captured over
    its pinned one-row `cache`: the pair (the model's last hidden state, the last sampled token) stays in
    the cache, the chained pairs of the layer's own guesses are rewound. K/V room for `capacity` tokens:
    `fits` says whether the next chain still fits (else capture a new one)."""

    def __init__(self, predictor, cache: HybridCache, guesses: int, capacity: int):
        self.predictor, self.cache, self.guesses = predictor, cache, guesses
        device = predictor.device
        self.hidden = torch.zeros(1, 1, predictor.network.config.hidden_size, device=device)
        self.token_ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.capacity = max(int(capacity), int(cache.lengths[0]) + guesses)
        _pin_own(cache, self.capacity)
        with torch.inference_mode():
            scratch = _scratch_like(lambda rows: predictor.make_cache(), cache, self.capacity)
            _run_aside(lambda: self._chain(scratch))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.tokens, self.probabilities = self._chain(cache)

    def _chain(self, cache: HybridCache) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, probabilities = [], []
        logits, out = self.predictor(self.hidden, self.token_ids, cache)
        for index in range(self.guesses):
            last = logits[0, -1]
            token = last.argmax()
            tokens.append(token)
            probabilities.append(1 / torch.exp(last - last[token]).sum())  # softmax at the top token
            if index + 1 < self.guesses:
                logits, out = self.predictor(out, token.view(1, 1), cache)
        return torch.stack(tokens), torch.stack(probabilities)

    def fits(self, length: int) -> bool:
        return length + self.guesses <= self.capacity

    def propose(self, hidden: torch.Tensor, next_token: int) -> tuple[list[int], list[float]]:
        """The chain's guesses and their probabilities under the layer, from the pair (hidden [1, 1, H],
        next_token); the cache keeps that pair only."""
        with torch.inference_mode():
            self.hidden.copy_(hidden)
            self.token_ids.fill_(next_token)
            self.graph.replay()
            if self.guesses > 1:
                self.cache.lengths.sub_(self.guesses - 1)
                self.cache.next_positions.sub_(self.guesses - 1)
        return self.tokens.tolist(), self.probabilities.tolist()

    def release(self) -> HybridCache:
        _unpin(self.cache)
        self.graph = None
        return self.cache


def _end_keeping_steps(cache: HybridCache) -> None:
    """What `keep_steps` set, unset without rewinding (a capture fed nothing)."""
    for layer in cache.layers:
        if isinstance(layer, DeltaNetState):
            layer.steps = None
        else:
            layer.token_by_token = False


def _warm_up(model, cache: HybridCache, capacity: int, tokens: int = 0) -> None:
    """Run the step eagerly on a scratch cache pinned like `cache`: Triton compiles its kernels for these
    shapes and cuBLAS makes its handles there; neither may happen inside a capture. Before every capture,
    not once per shape: the kernels' launch settings (fast_cuda's row thresholds, the matrix-vector
    launch shapes) can change between captures, and two eager steps cost little next to a capture.
    `tokens`: a verification step of that many tokens (VerificationGraph) in place of a one-token step."""
    with torch.inference_mode():
        scratch = _scratch_like(model.make_cache, cache, capacity)
        ids = torch.zeros(cache.batch_size, max(tokens, 1), dtype=torch.long, device=model.device)

        def step():
            if tokens:
                scratch.keep_steps()
            model.network(ids, scratch)
            if tokens:
                scratch.rewind(tokens, 1)

        _run_aside(step)


def _pin_own(cache: HybridCache, capacity: int) -> None:
    """`_pin`, and lengths and positions of the cache's own (a snapshot may share the old ones)."""
    with torch.inference_mode():
        _pin(cache, capacity)
        cache.lengths, cache.next_positions = cache.lengths.clone(), cache.next_positions.clone()


def _unpin(cache: HybridCache) -> None:
    """A pinned cache an ordinary one again: attention over what it holds, DeltaNet states replaced per step."""
    cache.static_length = None
    for layer in cache.layers:
        if isinstance(layer, DeltaNetState):
            layer.in_place = False


def _scratch_like(make_cache, cache: HybridCache, capacity: int) -> HybridCache:
    """A new cache (`make_cache(rows)`) pinned as `cache` is, its page table as wide: the attention kernel's
    split count follows the width, and the warm-up must compile what the capture will launch."""
    batch_size, span = cache.batch_size, max(capacity, _page_slots(cache))
    scratch = make_cache(batch_size)
    _pin(scratch, capacity)
    scratch.reserve(rows=batch_size, tokens=span)
    return scratch


def _run_aside(work, times: int = 2) -> None:
    """`work` run eagerly on a side stream, then waited for (a capture's warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            work()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
