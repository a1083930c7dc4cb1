"""Model: the public handle on a loaded network (config, cache, forward, logits, generation)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from qwen35.engine.cache import HybridCache
from qwen35.errors import Qwen35Error
from qwen35.model.config import ModelConfig
from qwen35.model.qwen35 import Qwen35Network

# Prompts longer than this go through the network in pieces, carrying the cache,
# so attention scores and the delta rule's chunk systems stay bounded.
PREFILL_CHUNK = 512


class Model:
    def __init__(self, network: Qwen35Network, config: ModelConfig, generation_defaults: dict,
                 precision: str, source=None):
        self.network = network
        self.config = config
        self.generation_defaults = dict(generation_defaults)
        self.precision = precision
        self.device = torch.device("cpu")
        self._source = source  # keeps the GGUF memory map (or safetensors handles) open

    def make_cache(self, batch_size: int = 1) -> HybridCache:
        if batch_size < 1:
            raise Qwen35Error(f"batch size must be at least 1, got {batch_size}")
        return self.network.make_cache(batch_size, device=self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor | None = None,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Append input_ids [B, T] to the B rows of `cache`; logits [B, T, vocab] float32.

        `positions` [3, B, T] gives M-RoPE positions (time, height, width) for
        images; by default each row continues its own text positions.
        `embeddings` [B, T, hidden] replaces the token embeddings (image features).
        """
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if input_ids.dim() != 2:
            raise Qwen35Error(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if input_ids.shape[0] != cache.batch_size:
            raise Qwen35Error(f"{input_ids.shape[0]} rows of tokens for a cache of {cache.batch_size} sequences")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise Qwen35Error(f"token ids must lie in 0..{self.config.vocab_size - 1}")
        pieces = []
        for start in range(0, input_ids.shape[1], PREFILL_CHUNK):
            stop = start + PREFILL_CHUNK
            piece_positions = None if positions is None else positions[:, :, start:stop]
            piece_embeddings = None if embeddings is None else embeddings[:, start:stop]
            pieces.append(self.network(input_ids[:, start:stop], cache, piece_positions, piece_embeddings))
        if not pieces:
            return torch.zeros(cache.batch_size, 0, self.config.vocab_size)
        return torch.cat(pieces, dim=1)

    def logits(self, token_ids) -> np.ndarray:
        """One prefill of `token_ids` on a fresh cache: float32 [len, vocab_size]."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long).reshape(1, -1)
        return self.forward(ids, self.make_cache(1))[0].cpu().numpy()

    def generate(self, token_ids, max_new_tokens: int | None = None, **sampling) -> list[int]:
        from qwen35.engine.generate import generate

        return generate(self, token_ids, max_new_tokens=max_new_tokens, **sampling)

    def stream_generate(self, token_ids, max_new_tokens: int | None = None, **sampling) -> Iterator[int]:
        from qwen35.engine.generate import stream_generate

        return stream_generate(self, token_ids, max_new_tokens=max_new_tokens, **sampling)

    def nbytes(self) -> int:
        """Bytes held by the weights (block-format weights count their blocks)."""
        seen, total = set(), 0
        for tensor in [*self.network.buffers(), *self.network.parameters(), *self.network.dense_tensors()]:
            key = (tensor.data_ptr(), tensor.nbytes)
            if key not in seen:
                seen.add(key)
                total += tensor.nbytes
        return total
