"""The hybrid cache of a batch of sequences: DeltaNet states for linear layers, K/V for full attention.

Each row of the batch is one sequence with its own length. DeltaNet layers keep a
fixed-size state per row (the last kernel-1 conv inputs and the recurrent state),
whatever the length; full-attention layers keep K/V for every token. Rows can be
prefilled on their own and merged into one batch (`HybridCache.merge`), then
decoded together: each row attends only to its own tokens.

A long-lived batch (a server's running requests) changes one row at a time instead:
`append` copies one sequence's row in (K/V go into storage reserved for more rows, so
the others' K/V stay where they are) and `remove` frees a row by moving the last row
into it. `shared` gives a read-only snapshot of a one-row cache without copying it.

Positions are kept as three M-RoPE streams (time, height, width). For text all
three equal the token index; an image advances them differently, so the cache
remembers the next text position per row apart from the token count.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qwen35.errors import Qwen35Error


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream: then the host may not read the device."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the storages behind `tensors`, each counted once (a view holds its whole storage)."""
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class DeltaNetState:
    conv: torch.Tensor  # [B, conv_dim, kernel - 1]: the last inputs of the causal conv
    recurrent: torch.Tensor  # [B, n_v, d_k, d_v], always fp32
    # The network replaces both tensors at every step instead of writing into them, so a snapshot
    # may hold the tensors of a cache that goes on being fed; except where `in_place` is set (a
    # cache that a CUDA graph replays over owns its tensors, which must stay where they are).
    in_place: bool = False
    # While a speculative verification runs (HybridCache.keep_steps): the (conv, recurrent) states
    # before the first token fed and after each one, so that any prefix of the tokens can be kept.
    steps: list | None = None

    def keep_step(self) -> None:
        if self.steps is not None:
            pinned = self.in_place  # its tensors are written over: keep copies
            self.steps.append((self.conv.clone(), self.recurrent.clone()) if pinned else (self.conv, self.recurrent))

    def store(self, conv: torch.Tensor | None = None, recurrent: torch.Tensor | None = None) -> None:
        """A step's new states: written into this cache's own tensors when it is pinned (`in_place`),
        else taking their place (a snapshot may hold the old ones)."""
        for name, new in (("conv", conv), ("recurrent", recurrent)):
            if new is None:
                continue
            if self.in_place:
                if new is not getattr(self, name):
                    getattr(self, name).copy_(new)
            else:
                setattr(self, name, new)

    def select(self, rows: list[int]) -> DeltaNetState:
        return DeltaNetState(self.conv[rows], self.recurrent[rows])  # indexing with a list copies

    @staticmethod
    def merge(states: list[DeltaNetState]) -> DeltaNetState:
        return DeltaNetState(torch.cat([s.conv for s in states]), torch.cat([s.recurrent for s in states]))

    def append(self, other: DeltaNetState, row: int) -> None:
        self.conv = torch.cat([self.conv, other.conv[row:row + 1]])
        self.recurrent = torch.cat([self.recurrent, other.recurrent[row:row + 1]])

    def remove(self, row: int) -> None:
        """Row `row` gets the last row's state; the last row goes. The tensors belong to this cache alone
        (made by `append` or the network), so they are written in place."""
        last = self.conv.shape[0] - 1
        if row != last:
            self.conv[row] = self.conv[last]
            self.recurrent[row] = self.recurrent[last]
        self.conv, self.recurrent = self.conv[:last], self.recurrent[:last]

    def install_row(self, row: int, other: DeltaNetState, other_row: int) -> None:
        """Row `row` takes `other`'s row `other_row`, written in place (a graph's rows stay where they are)."""
        self.conv[row].copy_(other.conv[other_row])
        self.recurrent[row].copy_(other.recurrent[other_row])

    def clear_row(self, row: int) -> None:
        self.conv[row].zero_()
        self.recurrent[row].zero_()

    def shared(self) -> DeltaNetState:
        return DeltaNetState(self.conv, self.recurrent)

    def nbytes(self) -> int:
        return _storage_bytes(self.conv, self.recurrent)


class AttentionKV:
    """K (after norm and RoPE) and V of one full-attention layer for `rows` sequences.

    Storage is [reserved rows, capacity, n_kv, head_dim]; the first `rows` rows are the batch's.
    Slots past a row's own length hold whatever was there (finite values, masked out)."""

    # Set while a speculative verification runs (HybridCache.keep_steps): queries attend one at a time.
    token_by_token = False

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        shape = (batch_size, capacity, num_kv_heads, head_dim)
        self._keys = torch.zeros(shape, dtype=dtype, device=device)
        self._values = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = batch_size

    @classmethod
    def _wrap(cls, keys: torch.Tensor, values: torch.Tensor, rows: int | None = None) -> AttentionKV:
        kv = cls.__new__(cls)
        kv._keys, kv._values = keys, values
        kv.rows = keys.shape[0] if rows is None else rows
        return kv

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:self.rows]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:self.rows]

    @property
    def capacity(self) -> int:
        return self._keys.shape[1]

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole K and V storage, [reserved rows, capacity, n_kv, d]: row b is the batch's row b."""
        return self._keys, self._values

    def make_room(self, starts: torch.Tensor, length: int) -> None:
        """Capacity for `length` more tokens after each row's `starts` (doubling, as a list grows)."""
        if capturing():
            return  # a graph's cache is given its whole capacity before capture (engine/cuda_graphs.py)
        needed = int(starts.max()) + length
        if needed > self.capacity:
            self.reserve(tokens=max(needed, 2 * self.capacity, 16))

    def write(self, starts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put T new tokens of each row at that row's own offset: keys/values [B, T, n_kv, d]."""
        batch, length = keys.shape[:2]
        self.make_room(starts, length)
        rows = torch.arange(batch, device=keys.device)[:, None]
        slots = starts[:, None] + torch.arange(length, device=keys.device)
        self._keys[rows, slots] = keys.to(self._keys.dtype)
        self._values[rows, slots] = values.to(self._values.dtype)

    def reserve(self, rows: int = 0, tokens: int = 0) -> None:
        """Storage for at least `rows` rows of `tokens` slots; a bigger one copies the live rows over."""
        rows, tokens = max(rows, self._keys.shape[0]), max(tokens, self.capacity)
        if (rows, tokens) == tuple(self._keys.shape[:2]):
            return

        def grown(buffer):
            bigger = buffer.new_zeros((rows, tokens, *buffer.shape[2:]))
            bigger[:self.rows, :buffer.shape[1]] = buffer[:self.rows]
            return bigger

        self._keys, self._values = grown(self._keys), grown(self._values)

    def view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` slots of every row (rows past their own length hold padding)."""
        return self._keys[:self.rows, :length], self._values[:self.rows, :length]

    def select(self, rows: list[int], length: int, capacity: int = 0) -> AttentionKV:
        """Copies of `rows`, with room for `capacity` tokens (at least `length`)."""
        leading = (len(rows), max(length, capacity))  # K and V may differ past these (engine/quantized_kv.py)
        picked = type(self)._wrap(self._keys.new_zeros((*leading, *self._keys.shape[2:])),
                                  self._values.new_zeros((*leading, *self._values.shape[2:])))
        for index, row in enumerate(rows):
            picked._keys[index, :length] = self._keys[row, :length]
            picked._values[index, :length] = self._values[row, :length]
        return picked

    @staticmethod
    def merge(parts: list[AttentionKV], length: int) -> AttentionKV:
        def padded(buffer):
            out = buffer.new_zeros((buffer.shape[0], length, *buffer.shape[2:]))
            count = min(length, buffer.shape[1])
            out[:, :count] = buffer[:, :count]
            return out

        return type(parts[0])._wrap(torch.cat([padded(p.keys) for p in parts]),
                                 torch.cat([padded(p.values) for p in parts]))

    def append(self, other: AttentionKV, row: int, length: int) -> None:
        """Row `row` of `other` (its first `length` slots) becomes this batch's last row. Storage grows
        by doubling, so over many appends each row's K/V moves a bounded number of times."""
        full = self.rows == self._keys.shape[0]
        self.reserve(rows=max(2 * self._keys.shape[0], self.rows + 1) if full else 0,
                     tokens=max(length, 2 * self.capacity, 16) if length > self.capacity else 0)
        self._keys[self.rows, :length] = other._keys[row, :length]
        self._values[self.rows, :length] = other._values[row, :length]
        self.rows += 1

    def install_row(self, row: int, other: AttentionKV, other_row: int, length: int) -> bool:
        """Row `row` takes the first `length` slots of `other`'s row `other_row`, in place: whether the
        storage stayed where it was (it must hold that many slots already)."""
        if length > self.capacity:
            raise Qwen35Error(f"a row of {length} tokens does not fit storage of {self.capacity}")
        self._keys[row, :length] = other._keys[other_row, :length]
        self._values[row, :length] = other._values[other_row, :length]
        return True

    def remove(self, row: int, last_length: int, longest: int) -> None:
        """Row `row` gets the last row's first `last_length` slots; the last row is free again. Storage far
        over what the remaining rows need (`longest` tokens at most) shrinks to twice that."""
        last = self.rows - 1
        if row != last:
            self._keys[row, :last_length] = self._keys[last, :last_length]
            self._values[row, :last_length] = self._values[last, :last_length]
        self.rows = last
        rows, tokens = max(self.rows, 1), max(longest, 16)
        if self._keys.shape[0] >= 4 * rows or self.capacity >= 8 * tokens:
            leading = (2 * rows, 2 * tokens)
            keys = self._keys.new_zeros((*leading, *self._keys.shape[2:]))
            values = self._values.new_zeros((*leading, *self._values.shape[2:]))
            keys[:self.rows, :longest] = self._keys[:self.rows, :longest]
            values[:self.rows, :longest] = self._values[:self.rows, :longest]
            self._keys, self._values = keys, values

    @staticmethod
    def empty_like(kv: AttentionKV, reserve_rows: int = 1) -> AttentionKV:
        """No rows, storage for `reserve_rows` rows of no slots, shaped like `kv`'s."""
        leading = (max(reserve_rows, 1), 0)
        return type(kv)._wrap(kv._keys.new_zeros((*leading, *kv._keys.shape[2:])),
                              kv._values.new_zeros((*leading, *kv._values.shape[2:])), rows=0)

    def shared(self, length: int) -> AttentionKV:
        """The first row's first `length` slots, not copied: valid while its owner only appends."""
        return type(self)._wrap(self._keys[:1, :length], self._values[:1, :length])

    def nbytes(self) -> int:
        return _storage_bytes(self._keys, self._values)


class HybridCache:
    """Per-layer states (DeltaNetState, or AttentionKV / PagedAttentionKV (engine/paged_kv.py) with one
    interface) plus per-row token counts and positions.

    Its tensors are made and written in inference mode (the model's forward runs in it, and an
    inference tensor can only be written in place there), so are the row operations."""

    # Set on a cache that a CUDA graph replays over: attention then spans this many slots whatever
    # the rows' lengths, and the counters are advanced in place, so the graph's buffers stay valid.
    static_length: int | None = None

    def __init__(self, layers: list, lengths: torch.Tensor, next_positions: torch.Tensor):
        self.layers = layers
        self.lengths = lengths  # [B] tokens each row holds
        self.next_positions = next_positions  # [B] the next text position (M-RoPE streams all equal for text)

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def default_positions(self, length: int) -> torch.Tensor:
        """M-RoPE positions [3, B, T] of T plain-text tokens appended to each row."""
        positions = self.next_positions[:, None] + torch.arange(length, device=self.lengths.device)
        return positions.unsqueeze(0).expand(3, -1, -1)

    def advance(self, length: int, positions: torch.Tensor) -> None:
        if self.static_length is not None:
            self.lengths.add_(length)
            self.next_positions.copy_(positions.amax(dim=(0, 2)) + 1)
            return
        self.lengths = self.lengths + length
        self.next_positions = positions.amax(dim=(0, 2)) + 1

    def keep_steps(self) -> None:
        """For the next forward: each mixer takes its tokens one at a time (the products still read each
        weight once for all of them) and each DeltaNet layer keeps its state after every token, so that
        `rewind` can keep any first part of them. A speculative verification feeds its drafts so: what it
        keeps is then computed exactly as one-token steps would have."""
        for layer in self.layers:
            if isinstance(layer, DeltaNetState):
                layer.steps = []
                layer.keep_step()
            else:
                layer.token_by_token = True

    def rewind(self, fed: int, keep: int) -> None:
        """After `keep_steps` and a forward of `fed` tokens: keep the first `keep` of them, as if only they
        had been fed (each row the same). K/V slots past the new lengths are simply written over later."""
        if not 0 <= keep <= fed:
            raise Qwen35Error(f"cannot keep {keep} of {fed} tokens")
        for layer in self.layers:
            if isinstance(layer, DeltaNetState):
                if layer.steps is None:
                    raise Qwen35Error("rewinding a cache that kept no steps (call keep_steps before the forward)")
                if keep < fed:
                    layer.store(*layer.steps[keep])
                layer.steps = None
            else:
                layer.token_by_token = False
        if keep < fed:
            self.lengths = self.lengths - (fed - keep)
            self.next_positions = self.next_positions - (fed - keep)

    def rewind_rows(self, fed: int, keeps: list[int]) -> None:
        """`rewind` with each row keeping its own first `keeps[row]` of the `fed` tokens."""
        if len(keeps) != self.batch_size or not all(0 <= keep <= fed for keep in keeps):
            raise Qwen35Error(f"cannot keep {keeps} of {fed} tokens in a cache of {self.batch_size} sequences")
        rows = torch.arange(self.batch_size)
        index = torch.tensor(keeps)
        for layer in self.layers:
            if isinstance(layer, DeltaNetState):
                if layer.steps is None:
                    raise Qwen35Error("rewinding a cache that kept no steps (call keep_steps before the forward)")
                kept = [torch.stack(states)[index.to(states[0].device), rows.to(states[0].device)]
                        for states in zip(*layer.steps)]  # (conv, recurrent), each row at its own step
                layer.store(*kept)
                layer.steps = None
            else:
                layer.token_by_token = False
        dropped = torch.tensor([fed - keep for keep in keeps], device=self.lengths.device)
        self.lengths = self.lengths - dropped
        self.next_positions = self.next_positions - dropped

    def _check_rows(self, rows: list[int]) -> None:
        for row in rows:
            if not 0 <= row < self.batch_size:
                raise Qwen35Error(f"row {row} is outside a cache of {self.batch_size} sequences")

    @torch.inference_mode()
    def select(self, rows: list[int], capacity: int = 0) -> HybridCache:
        """A new cache holding copies of the given rows (K/V room for `capacity` tokens each)."""
        self._check_rows(rows)
        length = int(self.lengths[rows].max()) if rows else 0
        layers = [
            layer.select(rows) if isinstance(layer, DeltaNetState) else layer.select(rows, length, capacity)
            for layer in self.layers
        ]
        return HybridCache(layers, self.lengths[rows].clone(), self.next_positions[rows].clone())

    @staticmethod
    @torch.inference_mode()
    def merge(caches: list[HybridCache]) -> HybridCache:
        """One batch from several caches of the same model (rows in the order given)."""
        if not caches:
            raise Qwen35Error("cannot merge an empty list of caches")
        if len({len(c.layers) for c in caches}) != 1:
            raise Qwen35Error("cannot merge caches of different models")
        length = max(int(c.lengths.max()) for c in caches)
        layers = []
        for index, first in enumerate(caches[0].layers):
            parts = [c.layers[index] for c in caches]
            if isinstance(first, DeltaNetState):
                layers.append(DeltaNetState.merge(parts))
            else:
                layers.append(type(first).merge(parts, length))
        return HybridCache(
            layers, torch.cat([c.lengths for c in caches]), torch.cat([c.next_positions for c in caches])
        )

    # --- a long-lived batch, one row at a time ------------------------------------------------

    @staticmethod
    @torch.inference_mode()
    def empty_like(cache: HybridCache, reserve_rows: int = 1) -> HybridCache:
        """A batch of no rows for caches shaped like `cache`, with K/V storage for `reserve_rows` rows."""
        layers = []
        for layer in cache.layers:
            if isinstance(layer, DeltaNetState):
                layers.append(DeltaNetState(layer.conv[:0].clone(), layer.recurrent[:0].clone()))
            else:  # AttentionKV, or engine/paged_kv.py's PagedAttentionKV
                layers.append(type(layer).empty_like(layer, reserve_rows))
        return HybridCache(layers, cache.lengths[:0].clone(), cache.next_positions[:0].clone())

    @torch.inference_mode()
    def reserve(self, rows: int = 0, tokens: int = 0) -> None:
        """K/V storage for `rows` rows of `tokens` slots, so that appends and prefills up to that size
        do not move the K/V already held."""
        for layer in self.layers:
            if not isinstance(layer, DeltaNetState):
                layer.reserve(rows, tokens)

    @torch.inference_mode()
    def append(self, other: HybridCache, row: int = 0) -> int:
        """Copy row `row` of `other` in as this batch's last row; its index. Only that row's K/V move."""
        other._check_rows([row])
        if len(other.layers) != len(self.layers):
            raise Qwen35Error("cannot add a row of another model's cache")
        length = int(other.lengths[row])
        for mine, theirs in zip(self.layers, other.layers):
            if isinstance(mine, DeltaNetState):
                mine.append(theirs, row)
            else:
                mine.append(theirs, row, length)
        self.lengths = torch.cat([self.lengths, other.lengths[row:row + 1]])
        self.next_positions = torch.cat([self.next_positions, other.next_positions[row:row + 1]])
        return self.batch_size - 1

    @torch.inference_mode()
    def install_row(self, row: int, other: HybridCache, other_row: int = 0) -> bool:
        """Row `row` becomes a copy of `other`'s row `other_row`, written in place: a CUDA graph replaying
        over this cache goes on reading the same memory. Whether every tensor stayed where it was (else
        K/V needed more room and the graph must be captured again)."""
        self._check_rows([row])
        other._check_rows([other_row])
        if len(other.layers) != len(self.layers):
            raise Qwen35Error("cannot install a row of another model's cache")
        length = int(other.lengths[other_row])
        stayed = True
        for mine, theirs in zip(self.layers, other.layers):
            if isinstance(mine, DeltaNetState):
                mine.install_row(row, theirs, other_row)
            else:
                stayed &= mine.install_row(row, theirs, other_row, length)
        self.lengths[row] = other.lengths[other_row]
        self.next_positions[row] = other.next_positions[other_row]
        return stayed

    @torch.inference_mode()
    def clear_row(self, row: int) -> None:
        """Row `row` emptied in place (no tokens, zero states), as an idle row of a graph's batch is kept."""
        self._check_rows([row])
        for layer in self.layers:
            if isinstance(layer, DeltaNetState):
                layer.clear_row(row)
        self.lengths[row] = 0
        self.next_positions[row] = 0

    @torch.inference_mode()
    def remove(self, row: int) -> int | None:
        """Free row `row` by moving the last row into it (one row's K/V copied); the moved row's old
        index, or None when `row` was the last."""
        self._check_rows([row])
        last = self.batch_size - 1
        last_length = int(self.lengths[last])
        order = list(range(last))
        if row != last:
            order[row] = last
        self.lengths, self.next_positions = self.lengths[order], self.next_positions[order]
        longest = int(self.lengths.max()) if last else 0
        for layer in self.layers:
            if isinstance(layer, DeltaNetState):
                layer.remove(row)
            else:
                layer.remove(row, last_length, longest)
        return last if row != last else None

    @torch.inference_mode()
    def shared(self) -> HybridCache:
        """A read-only snapshot of a one-row cache that copies nothing: it stays valid while this cache
        is only fed further (new tokens go past the snapshot's slots, new DeltaNet states replace the
        old tensors). Restore it with `select`, which copies."""
        if self.batch_size != 1:
            raise Qwen35Error(f"only a one-row cache can be shared, not one of {self.batch_size}")
        length = int(self.lengths[0])
        layers = [layer.shared() if isinstance(layer, DeltaNetState) else layer.shared(length)
                  for layer in self.layers]
        return HybridCache(layers, self.lengths.clone(), self.next_positions.clone())

    def nbytes(self) -> int:
        """Memory this cache keeps alive: whole storages, reserved rows and slots included."""
        return sum(layer.nbytes() for layer in self.layers)


@dataclass(slots=True)
class Snapshot:
    """A sequence's whole cache (K/V and DeltaNet state) after `length` tokens, and their last logits.
    Read-only: requests restore copies of it."""

    length: int
    cache: HybridCache
    last_logits: torch.Tensor
    nbytes: int
    drafter_state: object = None  # speculative decoding: the drafter's snapshot at the same point

    def restore(self, capacity: int = 0) -> HybridCache:
        """A copy to feed further, with K/V room for `capacity` tokens."""
        return self.cache.select([0], capacity=capacity)


class PrefixStore:
    """Cache snapshots keyed by the tokens they hold, least recently used dropped past a byte budget.

    A recurrent state cannot be rolled back, so reuse needs a snapshot taken exactly where the
    shared prefix ends: the engine stores one at each prompt's end and at the snapshot points the
    server names (turn boundaries), and a new prompt restores the longest one it starts with.
    """

    def __init__(self, budget_bytes: int, max_entries: int = 256):
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token_ids: list[int]) -> Snapshot | None:
        with self._lock:
            best_key = None
            for key in self._entries:
                if len(key) <= len(token_ids) and (best_key is None or len(key) > len(best_key)) \
                        and tuple(token_ids[:len(key)]) == key:
                    best_key = key
            if best_key is None:
                return None
            self._entries.move_to_end(best_key)
            return self._entries[best_key]

    def store(self, token_ids: list[int], cache, last_logits: torch.Tensor, select_row: int | None = 0,
              drafter_state=None, drafter_bytes: int = 0) -> None:
        """Keep a copy of row `select_row` of `cache`, or with None `cache` itself: a one-row cache
        nobody writes into any more, or a `shared` view of one that is only fed further. `drafter_state`
        (`drafter_bytes` of it) goes with it: a speculating request's drafter where the cache is."""
        if self.budget_bytes <= 0 or not token_ids:
            return
        key = tuple(token_ids)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
        snapshot_cache = cache if select_row is None else cache.select([select_row])
        nbytes = snapshot_cache.nbytes() + last_logits.numel() * 4 + drafter_bytes
        if nbytes > self.budget_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = Snapshot(len(key), snapshot_cache, last_logits.clone(), nbytes, drafter_state)
            self.nbytes += nbytes
            while self.nbytes > self.budget_bytes or len(self._entries) > self.max_entries:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= dropped.nbytes
