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

Top-k does not depend on the temperature, so it is applied first here, to the penalised
logits; the draw then only looks at the tokens top-k kept.
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

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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
        if self._seen is not None and 0 <= token_id < self._seen.numel():
            self._seen[token_id] = True
        if self._counts is not None and 0 <= token_id < self._counts.numel():
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
            ids = torch.tensor([t for t in self.output_ids if 0 <= t < logits.numel()], dtype=torch.long)
            counts = torch.bincount(ids, minlength=logits.numel()).to(torch.float32)
            self._counts = counts.to(logits.device)
        return self._counts

    @staticmethod
    def _id_mask(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        # Ids past the logits' width (a tokenizer larger than the head) cannot be sampled anyway.
        mask = torch.zeros(logits.numel(), dtype=torch.bool)
        in_range = torch.tensor([t for t in ids if 0 <= t < logits.numel()], dtype=torch.long)
        mask[in_range] = True
        return mask.to(logits.device)


def apply_penalties(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """Penalised copy of ``logits`` [B, V] (float32), row i by ``samplers[i]``."""
    _check_batch(logits, samplers)
    if not any(sampler.params.has_penalties for sampler in samplers):
        return logits.to(torch.float32)
    penalised = logits.to(torch.float32, copy=True)
    for row, sampler in enumerate(samplers):
        sampler.penalize_(penalised[row])
    return penalised


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits [B, V]; filtered tokens get -inf.

    Rows with temperature 0 are left at temperature 1 here (they are drawn greedily).
    """
    values, indices = _warped_candidates(logits, params)
    if indices is None:
        return values
    return torch.full_like(logits, -math.inf, dtype=torch.float32).scatter_(1, indices, values)


def _warped_candidates(logits: torch.Tensor, params: Sequence[SamplingParams]):
    """The warped logits of the tokens that can still be drawn, as (values [B, C], indices [B, C]).

    Sampling only needs the tokens that can survive the filters: with Qwen's top_k 20
    that is twenty logits, not a 150k vocabulary to sort and draw from. ``indices`` None
    means the values cover the whole vocabulary in order (no row needed sorting).
    """
    vocab = logits.shape[1]
    device = logits.device
    logits = logits.to(torch.float32)
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    temperatures = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
    temperatures = temperatures.unsqueeze(1)
    has_top_k = torch.tensor([k < vocab for k in top_ks], device=device).unsqueeze(1)
    kth_index = (torch.tensor(top_ks, device=device) - 1).unsqueeze(1)
    needs_top_p = any(p < 1.0 for p in top_ps)
    nucleus_normalizer = None  # log of the softmax denominator over the whole vocabulary

    window = _candidate_window(logits, top_ks, top_ps, temperatures)
    if window is not None:
        values, indices, nucleus_normalizer = window
    elif needs_top_p:
        values, indices = logits.sort(dim=-1, descending=True)
    else:
        values, indices = logits, None
    if any(k < vocab for k in top_ks):
        ranked = values if indices is not None else logits.topk(max(k for k in top_ks if k < vocab), dim=-1).values
        kth_values = ranked.gather(1, kth_index.clamp(max=ranked.shape[1] - 1))
        kth_values = torch.where(has_top_k, kth_values, -math.inf)
        # Ties with the k-th logit stay in, as transformers' TopKLogitsWarper keeps them.
        values = values.masked_fill(values < kth_values, -math.inf)
    values = values / temperatures

    if needs_top_p:
        # Here values are sorted, highest first. Keep the smallest prefix whose mass
        # reaches top_p; the first token always stays. top_p 1 must keep everything,
        # even where rounding pushes the running mass past 1.
        normalizer = values.logsumexp(dim=-1, keepdim=True)
        if nucleus_normalizer is not None:
            # Rows bounded by their nucleus alone hold only part of their vocabulary here.
            normalizer = torch.where(has_top_k, normalizer, nucleus_normalizer)
        probs = (values - normalizer).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        top_p_limits = torch.tensor([p if p < 1.0 else math.inf for p in top_ps], device=device).unsqueeze(1)
        remove = mass_before >= top_p_limits
        remove[:, 0] = False
        values = values.masked_fill(remove, -math.inf)

    min_ps = [p.min_p for p in params]
    if any(p > 0 for p in min_ps):
        probs = values.softmax(dim=-1)
        threshold = torch.tensor(min_ps, device=device).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        values = values.masked_fill(probs < threshold, -math.inf)
    return values, indices


_FIRST_NUCLEUS_WINDOW = 64


def _candidate_window(logits, top_ks, top_ps, temperatures):
    """The highest logits of each row, sorted, as many as hold every row's top-k (ties
    included) and nucleus; None when some row is unbounded or needs the whole vocabulary.

    Returns (values, indices, log softmax denominator over the vocabulary at each row's
    temperature, or None when no row relies on its nucleus alone).
    """
    vocab = logits.shape[1]
    device = logits.device
    nucleus_only = [k == vocab and p < 1.0 for k, p in zip(top_ks, top_ps)]
    if any(k == vocab and p >= 1.0 for k, p in zip(top_ks, top_ps)):
        return None
    size = max((k + 1 for k in top_ks if k < vocab), default=0)
    normalizer = None
    if any(nucleus_only):
        size = max(size, _FIRST_NUCLEUS_WINDOW)
        normalizer = (logits / temperatures).logsumexp(dim=-1, keepdim=True)
        nucleus_rows = torch.tensor(nucleus_only, device=device)
        top_p_limits = torch.tensor(top_ps, device=device)
    has_top_k = torch.tensor([k < vocab for k in top_ks], device=device)
    kth_index = (torch.tensor(top_ks, device=device) - 1).clamp(max=vocab - 1).unsqueeze(1)
    while size < vocab:
        values, indices = logits.topk(size, dim=-1)
        kth_values = values.gather(1, kth_index.clamp(max=size - 1)).squeeze(1)
        # Every token tied with the k-th must be inside (a -inf k-th, where a constraint
        # allows fewer than k tokens, needs nothing more).
        enough = ~has_top_k | (values[:, -1] < kth_values) | torch.isneginf(kth_values)
        if normalizer is not None:
            mass = (values / temperatures - normalizer).exp().sum(dim=-1)
            enough &= ~nucleus_rows | (mass >= top_p_limits)
        if bool(enough.all()):
            return values, indices, normalizer
        size *= 4
    return None


def sample(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] and record it in that row's sampler.

    Returns a LongTensor [B] on the logits' device.
    """
    penalised = apply_penalties(logits, samplers)
    tokens = penalised.argmax(dim=-1)
    random_rows = [row for row, sampler in enumerate(samplers) if not sampler.params.greedy]
    if random_rows:
        candidates = penalised if len(random_rows) == len(samplers) else penalised[random_rows]
        values, indices = _warped_candidates(candidates, [samplers[row].params for row in random_rows])
        probs = values.softmax(dim=-1)
        for index, row in enumerate(random_rows):
            # The exponential race: argmax of p_i / E_i with E_i ~ Exp(1) picks i with
            # probability p_i, without the cumulative sums of torch.multinomial.
            race = torch.empty_like(probs[index]).exponential_(generator=samplers[row].generator(probs.device))
            choice = (probs[index] / race).argmax()
            tokens[row] = choice if indices is None else indices[index, choice]
    for sampler, token_id in zip(samplers, tokens.tolist()):
        sampler.record(token_id)
    return tokens


def _check_batch(logits: torch.Tensor, samplers: Sequence[Sampler]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(samplers):
        raise ValueError(f"{logits.shape[0]} rows of logits but {len(samplers)} samplers")
