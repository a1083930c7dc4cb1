"""The hybrid cache of a batch of sequences: DeltaNet states for linear layers, K/V for full attention.

Each row of the batch is one sequence with its own length. DeltaNet layers keep a
fixed-size state per row (the last kernel-1 conv inputs and the recurrent state),
whatever the length; full-attention layers keep K/V for every token. Rows can be
prefilled on their own and merged into one batch (`HybridCache.merge`), then
decoded together: each row attends only to its own tokens.

Positions are kept as three M-RoPE streams (time, height, width). For text all
three equal the token index; an image advances them differently, so the cache
remembers the next text position per row apart from the token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35.errors import Qwen35Error


@dataclass
class DeltaNetState:
    conv: torch.Tensor  # [B, conv_dim, kernel - 1]: the last inputs of the causal conv
    recurrent: torch.Tensor  # [B, n_v, d_k, d_v], always fp32

    def select(self, rows: list[int]) -> DeltaNetState:
        return DeltaNetState(self.conv[rows].clone(), self.recurrent[rows].clone())

    @staticmethod
    def merge(states: list[DeltaNetState]) -> DeltaNetState:
        return DeltaNetState(torch.cat([s.conv for s in states]), torch.cat([s.recurrent for s in states]))

    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes


class AttentionKV:
    """K (after norm and RoPE) and V of one full-attention layer, [B, capacity, n_kv, head_dim]."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 0):
        shape = (batch_size, capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, starts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put T new tokens of each row at that row's own offset: keys/values [B, T, n_kv, d]."""
        batch, length = keys.shape[:2]
        needed = int(starts.max()) + length
        if needed > self.keys.shape[1]:
            self._grow(max(needed, 2 * self.keys.shape[1], 16))
        rows = torch.arange(batch, device=keys.device)[:, None]
        slots = starts[:, None] + torch.arange(length, device=keys.device)
        self.keys[rows, slots] = keys.to(self.keys.dtype)
        self.values[rows, slots] = values.to(self.values.dtype)

    def _grow(self, capacity: int) -> None:
        def grown(buffer):
            bigger = buffer.new_zeros((buffer.shape[0], capacity, *buffer.shape[2:]))
            bigger[:, : buffer.shape[1]] = buffer
            return bigger

        self.keys, self.values = grown(self.keys), grown(self.values)

    def view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` slots of every row (rows past their own length hold padding)."""
        return self.keys[:, :length], self.values[:, :length]

    def select(self, rows: list[int], length: int) -> AttentionKV:
        picked = AttentionKV.__new__(AttentionKV)
        picked.keys = self.keys[rows, :length].clone()
        picked.values = self.values[rows, :length].clone()
        return picked

    @staticmethod
    def merge(parts: list[AttentionKV], length: int) -> AttentionKV:
        def padded(buffer):
            out = buffer.new_zeros((buffer.shape[0], length, *buffer.shape[2:]))
            count = min(length, buffer.shape[1])
            out[:, :count] = buffer[:, :count]
            return out

        merged = AttentionKV.__new__(AttentionKV)
        merged.keys = torch.cat([padded(p.keys) for p in parts])
        merged.values = torch.cat([padded(p.values) for p in parts])
        return merged

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class HybridCache:
    """Per-layer states (DeltaNetState or AttentionKV) plus per-row token counts and positions."""

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
        self.lengths = self.lengths + length
        self.next_positions = positions.amax(dim=(0, 2)) + 1

    def select(self, rows: list[int]) -> HybridCache:
        """A new cache holding copies of the given rows."""
        for row in rows:
            if not 0 <= row < self.batch_size:
                raise Qwen35Error(f"row {row} is outside a cache of {self.batch_size} sequences")
        length = int(self.lengths[rows].max()) if rows else 0
        layers = [
            layer.select(rows) if isinstance(layer, DeltaNetState) else layer.select(rows, length)
            for layer in self.layers
        ]
        return HybridCache(layers, self.lengths[rows].clone(), self.next_positions[rows].clone())

    @staticmethod
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
                layers.append(AttentionKV.merge(parts, length))
        return HybridCache(
            layers, torch.cat([c.lengths for c in caches]), torch.cat([c.next_positions for c in caches])
        )

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
