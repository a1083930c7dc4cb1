"""Prompts with images: placeholder expansion, M-RoPE positions, and the embeddings fed to the network.

The chat template writes one `<|image_pad|>` per image (between `<|vision_start|>`
and `<|vision_end|>`); the prompt needs one per merged 2x2 patch block. Positions
follow transformers' `Qwen3_5Model.get_rope_index`: text advances all three
streams by one per token; an image whose merged grid is h x w takes, for the
token of row r and column c, T = p, H = p + r, W = p + c, where p is the position
the image starts at; the text after it continues at p + max(h, w), not at p + h*w.
A cache's `next_positions` (max position + 1) therefore continues correctly after
a prefill with these positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen35.errors import Qwen35Error


@dataclass
class PreparedPrompt:
    """A prompt ready for the network: token ids, positions, and image features for the placeholders.

    `feature_index[t]` is the row of `image_features` that replaces token t's embedding,
    or -1 for text. Embeddings are built per slice (`chunk`), so a long prompt never
    holds a [T, hidden] copy.
    """

    token_ids: list[int]  # image placeholders expanded: one per merged patch block
    positions: torch.Tensor  # [3, T] long: M-RoPE (time, height, width)
    image_features: torch.Tensor  # [n_image_tokens, hidden] float32, in placeholder order
    feature_index: torch.Tensor  # [T] long
    image_grids: list[tuple[int, int, int]]  # (t, h, w) in patches, per image
    # The token ids with each image's placeholders replaced by -1 - a fingerprint of its
    # pixels: placeholder ids are the same for every image, so a prefix cache keyed on
    # token ids alone would hand one image's state to another. Never a real token id.
    cache_key: list[int]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def next_position(self) -> int:
        """The position the first token after the prompt takes."""
        return int(self.positions.max()) + 1 if len(self) else 0

    def chunk(self, embed_tokens, start: int = 0, stop: int | None = None, device=None):
        """(input_ids [1, n], positions [3, 1, n], embeddings [1, n, hidden]) of tokens [start, stop).

        `embed_tokens` is the network's embedding (a QuantLinear: `.rows(ids)`); `device` the model's.
        """
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise Qwen35Error(f"slice [{start}, {stop}) is outside a prompt of {len(self)} tokens")
        device = self.image_features.device if device is None else torch.device(device)
        ids = torch.tensor([self.token_ids[start:stop]], dtype=torch.long, device=device)
        embeddings = embed_tokens.rows(ids).float()
        index = self.feature_index[start:stop].to(device)
        is_image = index >= 0
        if bool(is_image.any()):
            embeddings[0, is_image] = self.image_features[index[is_image]].to(embeddings.dtype)
        return ids, self.positions[:, None, start:stop].to(device), embeddings


def expand_placeholders(token_ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """Each run of `image_token_id` becomes image i's `counts[i]` tokens.

    A run of one placeholder (as the chat template writes it) is expanded; a run
    already of the right length (as HF's processor writes it) is kept.
    """
    runs = _runs(token_ids, image_token_id)
    if len(runs) != len(counts):
        raise Qwen35Error(f"the prompt has {len(runs)} image placeholder(s) for {len(counts)} image(s)")
    out, previous = [], 0
    for (start, stop), count in zip(runs, counts):
        if stop - start not in (1, count):
            raise Qwen35Error(
                f"an image placeholder run of {stop - start} tokens fits neither 1 nor the image's {count} tokens"
            )
        out.extend(token_ids[previous:start])
        out.extend([image_token_id] * count)
        previous = stop
    out.extend(token_ids[previous:])
    return out


def _runs(token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    runs, start = [], None
    for index, value in enumerate(token_ids):
        if value == token_id and start is None:
            start = index
        elif value != token_id and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(token_ids)))
    return runs


def mrope_positions(token_ids: list[int], image_token_id: int, merged_grids: list[tuple[int, int, int]],
                    start_position: int = 0) -> torch.Tensor:
    """[3, T] M-RoPE positions of an expanded prompt; `merged_grids` are (t, h, w) after merging."""
    runs = _runs(token_ids, image_token_id)
    if len(runs) != len(merged_grids):
        raise Qwen35Error(f"the prompt has {len(runs)} image placeholder run(s) for {len(merged_grids)} image(s)")
    pieces, position, previous = [], start_position, 0
    for (start, stop), (t, h, w) in zip(runs, merged_grids):
        if stop - start != t * h * w:
            raise Qwen35Error(f"an image of {t * h * w} tokens has a placeholder run of {stop - start}")
        text = torch.arange(start - previous) + position
        pieces.append(text.expand(3, -1))
        position += start - previous
        frames, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack([frames, rows, cols]).reshape(3, -1) + position)
        position += max(h, w)
        previous = stop
    pieces.append((torch.arange(len(token_ids) - previous) + position).expand(3, -1))
    return torch.cat(pieces, dim=1)


def prepare_prompt(token_ids, image_features: list[torch.Tensor], image_grids: list[tuple[int, int, int]],
                   image_token_id: int, merge_size: int, start_position: int = 0,
                   image_digests: list[int] | None = None) -> PreparedPrompt:
    """Expand the placeholders, compute positions and map placeholder tokens to feature rows.

    `image_digests`: a non-negative fingerprint per image for the cache key (default: its index).
    """
    if len(image_features) != len(image_grids):
        raise Qwen35Error(f"{len(image_features)} feature sets for {len(image_grids)} image grids")
    merged = [(t, h // merge_size, w // merge_size) for t, h, w in image_grids]
    counts = [t * h * w for t, h, w in merged]
    for features, count in zip(image_features, counts):
        if features.shape[0] != count:
            raise Qwen35Error(f"an image has {features.shape[0]} feature rows for {count} tokens")
    expanded = expand_placeholders(list(token_ids), image_token_id, counts)
    ids = torch.tensor(expanded, dtype=torch.long)
    is_image = ids == image_token_id
    feature_index = torch.full_like(ids, -1)
    feature_index[is_image] = torch.arange(int(is_image.sum()))
    features = torch.cat(image_features) if image_features else torch.zeros(0, 0)
    digests = list(range(len(counts))) if image_digests is None else list(image_digests)
    if len(digests) != len(counts) or any(d < 0 for d in digests):
        raise Qwen35Error("one non-negative digest per image is needed")
    cache_key = list(expanded)
    for (start, stop), digest in zip(_runs(expanded, image_token_id), digests):
        cache_key[start:stop] = [-1 - digest] * (stop - start)
    return PreparedPrompt(
        token_ids=expanded,
        positions=mrope_positions(expanded, image_token_id, merged, start_position),
        image_features=features,
        feature_index=feature_index,
        image_grids=[tuple(g) for g in image_grids],
        cache_key=cache_key,
    )
