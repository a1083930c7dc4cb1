"""Model: the public handle on a loaded network (config, cache, forward, logits, generation)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from qwen35.cache_options import cpu_cache_types, gpu_pages_are_float32
from qwen35.engine.cache import HybridCache
from qwen35.errors import Qwen35Error
from qwen35.model.config import ModelConfig
from qwen35.model.qwen35 import Qwen35Network

# Prompts longer than this go through the network in pieces, carrying the cache,
# so attention scores and the delta rule's chunk systems stay bounded.
PREFILL_CHUNK = 512
# A GPU runs a longer piece at once at full speed (its attention kernels hold no [T, S] matrix).
GPU_PREFILL_CHUNK = 4096
POOLINGS = ("last", "mean", "cls")  # how `embed` makes one vector of a text's hidden states (llama.cpp's names)


class Model:
    # Set by load_model when the model reads images (an HF checkpoint with a vision
    # tower, or a GGUF text model with an mmproj file).
    vision = None  # model.vision.VisionTower
    image_settings = None  # chat.images.ImageSettings
    image_token_id: int | None = None  # <|image_pad|>
    # -ctk/-ctv (cache_options.py): how the full-attention layers keep K and V; None: as they always have
    # (float32 on the CPU, the precision's pages on a GPU).
    cache_type_k: str | None = None
    cache_type_v: str | None = None

    def __init__(self, network: Qwen35Network, config: ModelConfig, generation_defaults: dict,
                 precision: str, source=None):
        self.network = network
        self.config = config
        self.generation_defaults = dict(generation_defaults)
        self.precision = precision
        self.device = torch.device("cpu")
        self._source = source  # keeps the GGUF memory map (or safetensors handles) open

    @property
    def prefill_chunk(self) -> int:
        """Tokens a prompt goes through the network at once."""
        return GPU_PREFILL_CHUNK if self.device.type == "cuda" else PREFILL_CHUNK

    def make_cache(self, batch_size: int = 1) -> HybridCache:
        if batch_size < 1:
            raise Qwen35Error(f"batch size must be at least 1, got {batch_size}")
        return self.network.make_cache(batch_size, **self.kv_settings())

    def kv_settings(self) -> dict:
        """How full-attention layers keep K/V (Qwen35Network.attention_store's keywords), from -ctk/-ctv and
        the precision: fast precision keeps a GPU layer's float K/V in bf16, as llama.cpp keeps f16 (half
        the memory)."""
        asked = (self.cache_type_k, self.cache_type_v)
        gpu_float32 = gpu_pages_are_float32(*asked, fast=self.precision == "fast")
        cpu_k, cpu_v = cpu_cache_types(*asked)
        return dict(gpu_kv_dtype=torch.float32 if gpu_float32 else torch.bfloat16, cache_type_k=cpu_k,
                    cache_type_v=cpu_v)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HybridCache, positions: torch.Tensor | None = None,
                embeddings: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Append input_ids [B, T] to the B rows of `cache`; logits [B, T, vocab] float32.

        `positions` [3, B, T] gives M-RoPE positions (time, height, width) for
        images; by default each row continues its own text positions.
        `embeddings` [B, T, hidden] replaces the token embeddings (image features).
        `last_only`: logits [B, 1, vocab] of the last position alone, what a prompt's prefill needs
        (the 248K-row output head then runs once, not T times: for a 4K piece of prompt on a GPU
        that is 4 GB of logits not made).
        """
        input_ids = self._token_rows(input_ids, cache.batch_size)
        pieces = []
        chunk = self.prefill_chunk
        for start in range(0, input_ids.shape[1], chunk):
            stop = start + chunk
            piece_positions = None if positions is None else positions[:, :, start:stop]
            piece_embeddings = None if embeddings is None else embeddings[:, start:stop]
            last = last_only and stop >= input_ids.shape[1]
            if last_only and not last:  # no logits wanted from this piece: its head is skipped as well
                self.network.hidden_states(input_ids[:, start:stop], cache, piece_positions, piece_embeddings)
                continue
            pieces.append(self.network(input_ids[:, start:stop], cache, piece_positions, piece_embeddings,
                                       last_only=last_only))
        if not pieces:
            return torch.zeros(cache.batch_size, 0, self.config.vocab_size)
        return torch.cat(pieces, dim=1)

    def _token_rows(self, input_ids, batch_size: int) -> torch.Tensor:
        """input_ids as a long tensor [batch_size, tokens] on the model's device, every id in the vocabulary."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if input_ids.dim() != 2:
            raise Qwen35Error(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if input_ids.shape[0] != batch_size:
            raise Qwen35Error(f"{input_ids.shape[0]} rows of tokens for a cache of {batch_size} sequences")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise Qwen35Error(f"token ids must lie in 0..{self.config.vocab_size - 1}")
        return input_ids

    def encode_images(self, images) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """Features [tokens, hidden] and patch grids (t, h, w) of each image.

        An image is anything `chat.images.preprocess_image` takes (encoded bytes, a path,
        a PIL image, an HWC uint8 array) or an already `ProcessedImage`.
        """
        features, grids, _ = self._encode_images(images)
        return features, grids

    def _encode_images(self, images):
        from qwen35.chat.images import ProcessedImage, preprocess_image

        if self.vision is None:
            raise Qwen35Error("this model has no vision tower: load an HF checkpoint with one, or pass an mmproj file")
        processed = [i if isinstance(i, ProcessedImage) else preprocess_image(i, self.image_settings) for i in images]
        features = [self.vision(image.pixel_values.to(self.device), [image.grid_thw]) for image in processed]
        return features, [image.grid_thw for image in processed], [image.digest() for image in processed]

    def prepare_prompt(self, token_ids, images=(), start_position: int = 0):
        """`multimodal.PreparedPrompt` of token ids whose `<|image_pad|>` placeholders stand for `images` in order."""
        from qwen35.model.multimodal import prepare_prompt

        images = list(images)
        features, grids, digests = self._encode_images(images) if images else ([], [], [])
        if images and self.image_token_id is None:
            raise Qwen35Error("the model's vocabulary has no <|image_pad|> token")
        merge = self.vision.config.merge_size if self.vision is not None else 1
        image_token_id = self.image_token_id if self.image_token_id is not None else -1
        return prepare_prompt(token_ids, features, grids, image_token_id, merge, start_position, digests)

    def forward_prompt(self, prompt, cache: HybridCache, start: int = 0, stop: int | None = None,
                       last_only: bool = False) -> torch.Tensor:
        """Tokens [start, stop) of a PreparedPrompt appended to a one-row cache: logits [1, n, vocab]
        (with last_only, [1, 1, vocab])."""
        if cache.batch_size != 1:
            raise Qwen35Error(f"a prepared prompt fills one sequence, not a cache of {cache.batch_size}")
        input_ids, positions, embeddings = prompt.chunk(self.network.embed_tokens, start, stop, self.device)
        return self.forward(input_ids, cache, positions, embeddings, last_only=last_only)

    @torch.inference_mode()
    def embed(self, token_ids, pooling: str = "last", normalize: bool = True) -> torch.Tensor:
        """One prefill of `token_ids` on a fresh cache, its final-normed hidden states pooled as llama.cpp's
        `--pooling` pools them: "last" (the last token's, the only one a causal model shows the whole input;
        what Qwen3-Embedding uses), "mean" or "cls" (the first token's). float32 [hidden] on the CPU, scaled to
        unit length where `normalize` (llama.cpp's and OpenAI's default)."""
        if pooling not in POOLINGS:
            raise Qwen35Error(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        ids = self._token_rows([list(token_ids)], batch_size=1)
        if ids.shape[1] == 0:
            raise Qwen35Error("nothing to embed: the input has no tokens")
        cache = self.make_cache(1)
        pooled = None
        for start in range(0, ids.shape[1], self.prefill_chunk):
            hidden = self.network.hidden_states(ids[:, start:start + self.prefill_chunk], cache)[0].float()
            if pooling == "mean":
                pooled = hidden.sum(dim=0) if pooled is None else pooled + hidden.sum(dim=0)
            elif pooling == "last":
                pooled = hidden[-1]
            elif pooled is None:  # cls
                pooled = hidden[0]
        if pooling == "mean":
            pooled = pooled / ids.shape[1]
        if normalize:
            pooled = pooled / pooled.norm().clamp_min(1e-12)
        return pooled.cpu()

    def logits(self, token_ids) -> np.ndarray:
        """One prefill of `token_ids` on a fresh cache: float32 [len, vocab_size]."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long).reshape(1, -1)
        return self.forward(ids, self.make_cache(1))[0].cpu().numpy()

    def generate(self, token_ids, max_new_tokens: int | None = None, images=None, speculation=None,
                 **sampling) -> list[int]:
        """`speculation`: an engine.speculative.Speculation (MTP or a draft model; same tokens, sooner)."""
        from qwen35.engine.generate import generate

        return generate(self, token_ids, max_new_tokens=max_new_tokens, images=images, speculation=speculation,
                        **sampling)

    def stream_generate(self, token_ids, max_new_tokens: int | None = None, images=None, speculation=None,
                        **sampling) -> Iterator[int]:
        from qwen35.engine.generate import stream_generate

        return stream_generate(self, token_ids, max_new_tokens=max_new_tokens, images=images, speculation=speculation,
                               **sampling)

    def nbytes(self) -> int:
        """Bytes held by the weights (block-format weights count their blocks)."""
        seen, total = set(), 0
        modules = [self.network] if self.vision is None else [self.network, self.vision]
        tensors = [t for m in modules for t in (*m.buffers(), *m.parameters(), *m.dense_tensors())]
        for tensor in tensors:
            key = (tensor.data_ptr(), tensor.nbytes)
            if key not in seen:
                seen.add(key)
                total += tensor.nbytes
        return total
