"""The cache a chat carries from one turn to the next.

After each prompt's history (up to the end of the new user message, the part the next turn's
prompt repeats token for token) a snapshot of the cache is kept; the next turn restores it
where its prompt starts with the same tokens and reads only what follows. A recurrent state
cannot be rolled back, so a prompt that starts otherwise is read in full.

Prompts with images: the snapshot is keyed by the prompt's `cache_key`, in which an image's
tokens name its pixels (two images of one size render to the same token ids), and every
image goes into the cache here, as its features with its M-RoPE positions: only text after
the last image is left for the generation loop, which reads plain token ids.
"""

from __future__ import annotations

import torch


class TurnCache:
    def __init__(self, model):
        self.model = model
        self._snapshot = None  # (the cache key of what it holds, a one-row cache nobody feeds)

    def clear(self) -> None:
        """Forget the snapshot (no prompt will start with it now) and free its memory."""
        self._snapshot = None

    def cache_for(self, ids: list[int], key: list[int], history: int | None, prepared=None, speculation=None):
        """A one-row cache holding the start of the prompt `ids` (None: the generation loop reads it all),
        how many of those tokens came from the snapshot, and with `speculation` (and no images) the drafter
        that has read what the cache holds (None: the generation loop makes its own).

        `key`: the prompt's cache key (its ids, or `prepared.cache_key` with images); `history`: how many
        of its first tokens the next turn's prompt will repeat (None: unknown), fed and kept as the next
        snapshot, with the drafter's state there; `prepared`: the `multimodal.PreparedPrompt` of a prompt
        with images."""
        key = tuple(key)
        cache, cached, drafter_state = None, 0, None
        if self._snapshot is not None:
            snapshot_key, snapshot, drafter_state = self._snapshot
            if len(snapshot_key) < len(key) and key[:len(snapshot_key)] == snapshot_key:
                with torch.inference_mode():
                    cache = snapshot.select([0], capacity=len(ids))
                cached = len(snapshot_key)
        drafter = None
        if speculation is not None and prepared is None and (cache is not None or history is not None):
            drafter = speculation.drafter(self.model, ids[:cached], drafter_state if cache is not None else None)
        fed = cached
        if history is not None and cached < history < len(ids):
            cache = cache if cache is not None else self.model.make_cache(1)
            self._prefill(ids, prepared, fed, history, cache, drafter)
            fed = history
            with torch.inference_mode():
                self._snapshot = (key[:history], cache.select([0]), drafter.snapshot() if drafter is not None else None)
        if prepared is not None and fed < len(ids) - 1:
            cache = cache if cache is not None else self.model.make_cache(1)
            self._prefill(ids, prepared, fed, len(ids) - 1, cache)
        return cache, cached, drafter if cache is not None else None

    def _prefill(self, ids: list[int], prepared, start: int, stop: int, cache, drafter=None) -> None:
        """Feed tokens [start, stop) to `cache` in the model's prefill pieces (the output head runs once per
        piece, at its end); a prepared prompt brings its images' features and positions; a drafter reads the
        pieces' hidden states."""
        if drafter is not None:
            network = self.model.network
            with torch.inference_mode():
                for piece in range(start, stop, self.model.prefill_chunk):
                    part = ids[piece:min(piece + self.model.prefill_chunk, stop)]
                    drafter.feed(part, network.hidden_states(torch.tensor([part], device=network.input_device), cache))
            return
        if prepared is None:
            self.model.forward(torch.tensor([ids[start:stop]], dtype=torch.long), cache, last_only=True)
            return
        with torch.inference_mode():
            for piece in range(start, stop, self.model.prefill_chunk):
                self.model.forward_prompt(prepared, cache, piece, min(piece + self.model.prefill_chunk, stop),
                                          last_only=True)
