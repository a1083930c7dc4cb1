"""Turning logits into tokens: penalties, temperature, top-k, top-p, min-p, seeded draws.

The order of operations, per row, is the one transformers and vLLM use:

1. penalties on the raw logits
   - repetition penalty (transformers' RepetitionPenaltyLogitsProcessor / llama.cpp's
     ``repeat_penalty``): for every token seen in the prompt or the output, a positive
     logit is divided by the penalty and a negative one multiplied by it;
   - presence and frequency penalties (OpenAI's definition), on generated tokens only:
     ``logit -= presence_penalty * (count > 0) + frequency_penalty * count``;
2. temperature 0 means greedy: the argmax of the penalised logits, no randomness;
3. otherwise logits / temperature, then top-k, then top-p (nucleus) over what top-k
   kept, then min-p relative to the most likely token left; a token filtered out gets
   logit -inf;
4. one draw from the softmax of what is left, with the request's own ``torch.Generator``,
   so that a seed gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from qwen35.errors import Qwen35Error

__all__ = [
    "InvalidSamplingError",
    "Sampler",
    "SamplingParams",
    "apply_penalties",
    "sample",
    "warp_logits",
]

_SEED_SPACE = 2**64
# OpenAI's documented range for presence_penalty and frequency_penalty.
_OPENAI_PENALTY_LIMIT = 2.0


class InvalidSamplingError(Qwen35Error, ValueError):
    """A sampling option out of its range; the server answers these with a 400."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_number(name: str, value) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidSamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How one request picks its tokens; validated on construction.

    ``top_k`` 0 (or -1, as vLLM spells it) and ``top_p`` 1 turn those filters off;
    ``seed`` None draws a fresh random seed for the request; ``max_new_tokens`` None
    leaves the limit to the caller (the generation loop uses the context length).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)
        temperature = _require_number("temperature", self.temperature)
        if temperature < 0:
            raise InvalidSamplingError(f"temperature must be 0 (greedy) or more, got {temperature}")
        set_field("temperature", temperature)

        top_k = self.top_k
        if top_k is None:
            top_k = 0
        if not _is_int(top_k) or top_k < -1:
            raise InvalidSamplingError(f"top_k must be a whole number >= 0 (0 or -1 = off), got {top_k!r}")
        set_field("top_k", max(top_k, 0))

        top_p = _require_number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {top_p}")
        set_field("top_p", top_p)

        min_p = _require_number("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise InvalidSamplingError(f"min_p must be in [0, 1], got {min_p}")
        set_field("min_p", min_p)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _require_number(name, getattr(self, name))
            if abs(value) > _OPENAI_PENALTY_LIMIT:
                raise InvalidSamplingError(f"{name} must be between -2 and 2, got {value}")
            set_field(name, value)

        repetition_penalty = _require_number("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise InvalidSamplingError(f"repetition_penalty must be more than 0, got {repetition_penalty}")
        set_field("repetition_penalty", repetition_penalty)

        if self.seed is not None and not _is_int(self.seed):
            raise InvalidSamplingError(f"seed must be a whole number, got {self.seed!r}")

        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise InvalidSamplingError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")

        set_field("stop_token_ids", _token_id_tuple(self.stop_token_ids))
        set_field("stop", _stop_string_tuple(self.stop))
        if not isinstance(self.ignore_eos, bool):
            raise InvalidSamplingError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_options(cls, defaults: Mapping | None = None, **options) -> SamplingParams:
        """Build params from a model's generation defaults overridden by ``options``.

        Keys of ``defaults`` that are not sampling options are ignored (a
        generation_config.json holds others); ``do_sample: false`` there means greedy.
        An unknown key in ``options`` is an error; an option given as None keeps the default.
        """
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InvalidSamplingError(
                f"unknown sampling option {unknown[0]!r}; known options: {', '.join(sorted(names))}"
            )
        merged = {}
        if defaults:
            merged = {key: value for key, value in defaults.items() if key in names and value is not None}
            if defaults.get("do_sample") is False:
                merged["temperature"] = 0.0
        merged.update({key: value for key, value in options.items() if value is not None})
        return cls(**merged)


def _token_id_tuple(values) -> tuple[int, ...]:
    if values is None:
        return ()
    if _is_int(values):
        values = (values,)
    try:
        ids = tuple(values)
    except TypeError:
        raise InvalidSamplingError(f"stop_token_ids must be a list of token ids, got {values!r}") from None
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise InvalidSamplingError(f"stop_token_ids must hold token ids >= 0, got {token_id!r}")
    return ids


def _stop_string_tuple(values) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = (values,)
    try:
        strings = tuple(values)
    except TypeError:
        raise InvalidSamplingError(f"stop must be a string or a list of strings, got {values!r}") from None
    for text in strings:
        if not isinstance(text, str) or not text:
            raise InvalidSamplingError(f"each stop string must be a non-empty string, got {text!r}")
    return strings


class Sampler:
    """One request's sampling state: its params, its random generator, its token history.

    The prompt feeds the repetition penalty; the tokens this sampler picks (``record``,
    called by ``sample``) feed all three penalties.
    """

    __slots__ = ("params", "seed", "prompt_ids", "output_ids", "_generator", "_seen", "_counts")

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.prompt_ids = [int(token_id) for token_id in prompt_ids]
        self.output_ids: list[int] = []
        self._generator: torch.Generator | None = None
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed % _SEED_SPACE)
        return self._generator

    def record(self, token_id: int) -> None:
        token_id = int(token_id)
        self.output_ids.append(token_id)
        if self._seen is not None and token_id < self._seen.numel():
            self._seen[token_id] = True
        if self._counts is not None and token_id < self._counts.numel():
            self._counts[token_id] += 1

    def penalize_(self, logits: torch.Tensor) -> None:
        """Apply this request's penalties in place to one row of logits [vocab]."""
        params = self.params
        if params.repetition_penalty != 1.0:
            seen = self._seen_mask(logits)
            penalised = torch.where(
                logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
            )
            logits.copy_(torch.where(seen, penalised, logits))
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            counts = self._output_counts(logits)
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)

    def _seen_mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self._seen is None or self._seen.numel() != logits.numel() or self._seen.device != logits.device:
            self._seen = self._id_mask(self.prompt_ids + self.output_ids, logits)
        return self._seen

    def _output_counts(self, logits: torch.Tensor) -> torch.Tensor:
        if self._counts is None or self._counts.numel() != logits.numel() or self._counts.device != logits.device:
            ids = torch.tensor([t for t in self.output_ids if t < logits.numel()], dtype=torch.long)
            counts = torch.bincount(ids, minlength=logits.numel()).to(torch.float32)
            self._counts = counts.to(logits.device)
        return self._counts

    @staticmethod
    def _id_mask(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # Ids past the logits' width (a tokenizer larger than the head) cannot be sampled anyway.
        mask = torch.zeros(logits.numel(), dtype=torch.bool)
        in_range = torch.tensor([t for t in ids if t < logits.numel()], dtype=torch.long)
        mask[in_range] = True
        return mask.to(logits.device)


def apply_penalties(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """Penalised copy of ``logits`` [B, V] (float32), row i by ``samplers[i]``."""
    _check_batch(logits, samplers)
    penalised = logits.to(torch.float32, copy=True)
    for row, sampler in enumerate(samplers):
        sampler.penalize_(penalised[row])
    return penalised


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits [B, V]; filtered tokens get -inf.

    Rows with temperature 0 are left at temperature 1 here (they are drawn greedily).
    """
    batch, vocab = logits.shape
    device = logits.device
    temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    logits = logits.to(torch.float32) / temperatures.unsqueeze(1)

    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # top_p 1 must keep everything, even where rounding pushes the running mass past 1.
    top_ps = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
    if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        kth_index = torch.tensor(top_ks, device=device).sub_(1).unsqueeze(1)
        # Ties with the k-th logit stay in, as transformers' TopKLogitsWarper keeps them.
        remove_sorted = sorted_logits < sorted_logits.gather(1, kth_index)
        probs = sorted_logits.masked_fill(remove_sorted, -math.inf).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
        remove_sorted |= mass_before >= torch.tensor(top_ps, device=device).unsqueeze(1)
        remove_sorted[:, 0] = False
        remove = torch.empty_like(remove_sorted).scatter_(1, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)

    min_ps = [p.min_p for p in params]
    if any(p > 0 for p in min_ps):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_ps, device=device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, -math.inf)
    return logits


def sample(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] and record it in that row's sampler.

    Returns a LongTensor [B] on the logits' device.
    """
    penalised = apply_penalties(logits, samplers)
    tokens = penalised.argmax(dim=-1)
    random_rows = [row for row, sampler in enumerate(samplers) if not sampler.params.greedy]
    if random_rows:
        warped = warp_logits(penalised[random_rows], [samplers[row].params for row in random_rows])
        probs = warped.softmax(dim=-1)
        for index, row in enumerate(random_rows):
            generator = samplers[row].generator(probs.device)
            tokens[row] = torch.multinomial(probs[index], 1, generator=generator)[0]
    for sampler, token_id in zip(samplers, tokens.tolist()):
        sampler.record(token_id)
    return tokens


def _check_batch(logits: torch.Tensor, samplers: Sequence[Sampler]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(samplers):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(samplers)} samplers")
