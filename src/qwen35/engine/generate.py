"""The generation loop: chunked prefill, then one token per step until a stop.

Three layers, each built on the one below:

- ``generation_steps(model, token_ids, params)`` yields a ``Generation`` per sampled token
  (token, final text delta, running stats; the last one carries ``finish_reason``);
- ``stream_generations`` / ``stream_generate`` take keyword options merged over the
  model's own generation defaults and yield ``Generation``s / plain token ids;
- ``generate`` / ``generate_result`` fold a stream into a list / a ``GenerationResult``.

Stops: an end-of-sequence id of the model (unless ``ignore_eos``) or one of
``stop_token_ids`` ends generation with finish_reason "stop", and that token is not part
of the output; a stop string (matched on the decoded text, across token boundaries)
ends it too: the text stops before the stop string, while the token ids keep the token
that completed it, as vLLM and transformers report them. Reaching ``max_new_tokens``
(default: what is left of the context) gives finish_reason "length".
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwen35.engine.sampler import Sampler, SamplingParams, sample
from qwen35.engine.stopping import TextStream
from qwen35.errors import Qwen35Error

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "Generation",
    "GenerationResult",
    "generate",
    "generate_result",
    "generation_steps",
    "resolve_sampling",
    "stream_generate",
    "stream_generations",
]

DEFAULT_PREFILL_CHUNK = 512


@dataclass(slots=True)
class Generation:
    """One step of generation.

    ``token_id`` is the token this step added to the output, or None when the sampled
    token was a stop token (then ``stop_reason`` holds it). ``text`` is the newly final
    text ("" without a tokenizer). ``finish_reason`` is None until the last step, then
    "stop" or "length"; ``stop_reason`` is the stop token id or stop string that ended it.
    """

    token_id: int | None
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cached_tokens: int = 0  # how many of the prompt's tokens a given cache already held
    draft_tokens: int = 0  # speculative decoding: guesses checked so far
    accepted_tokens: int = 0  # ... and kept


@dataclass(slots=True)
class GenerationResult:
    """A whole generation: output ids, text (None without a tokenizer) and stats."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes out of the prefill; the decode steps make the rest.
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


def resolve_sampling(model, max_new_tokens: int | None = None, **sampling) -> SamplingParams:
    """The model's generation defaults overridden by the given options, validated."""
    return SamplingParams.from_options(model.generation_defaults, max_new_tokens=max_new_tokens, **sampling)


def generation_steps(
    model,
    token_ids,
    params: SamplingParams,
    tokenizer=None,
    prefill_chunk: int | None = None,
    images=None,
    cache=None,
    constraint=None,
    speculation=None,
    drafter=None,
) -> Iterator[Generation]:
    """Run one request: prefill ``token_ids`` in chunks, then sample until a stop.

    With ``images``, each ``<|image_pad|>`` placeholder in ``token_ids`` stands for the
    next image (``model.prepare_prompt``): the prompt is expanded, its image tokens take
    the vision features and M-RoPE positions, and decoding continues after them.
    The request is checked here, before the first step, so that a bad one fails at the
    call (a server can still answer it with an error status rather than a broken stream).

    ``cache``: a one-row cache that already holds the first tokens of ``token_ids`` (at least
    one token must be left to feed); only the rest is prefilled, and the cache is fed further.

    ``constraint``: the engine's TokenConstraint protocol (``allowed()`` mask or None, ``advance``,
    ``complete``), as the server's engine applies it: the mask before each sample, every sampled
    token advanced into it, and a complete constraint ends the reply with finish_reason "stop".

    ``speculation``: an ``engine.speculative.Speculation`` (the MTP layer or a draft model guesses tokens
    that one step checks; the output is the same token for token). Prompts with images decode plainly.
    ``drafter``: its drafter, when the given cache came with one that has read what the cache holds.
    """
    prompt = _prompt_list(token_ids, model.config.vocab_size)
    cached = _cached_length(cache, len(prompt), images)
    prepared = model.prepare_prompt(prompt, images) if images else None
    if prepared is not None:
        prompt = prepared.token_ids
    if prefill_chunk is None:  # the model's own: longer pieces on a GPU
        prefill_chunk = getattr(model, "prefill_chunk", DEFAULT_PREFILL_CHUNK)
    if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
        raise Qwen35Error(f"prefill_chunk must be a whole number >= 1, got {prefill_chunk!r}")
    if params.stop and tokenizer is None:
        raise Qwen35Error("stop strings need a tokenizer to decode the output; pass tokenizer=")
    max_new_tokens = _max_new_tokens(model, params, len(prompt))
    stop_token_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_token_ids.update(model.config.eos_token_ids)
    text_stream = TextStream(tokenizer, params.stop) if tokenizer is not None else None
    sampler = Sampler(params, prompt)
    if speculation is not None and prepared is None:
        speculation.check(model)
    else:
        speculation = None
    return _steps(model, prompt, sampler, prefill_chunk, max_new_tokens, stop_token_ids, text_stream, prepared,
                  cache, cached, constraint, speculation, drafter)


def _cached_length(cache, prompt_length: int, images) -> int:
    if cache is None:
        return 0
    if images:
        raise Qwen35Error("a prompt with images cannot continue a given cache")
    if cache.batch_size != 1:
        raise Qwen35Error(f"a given cache must have one row, not {cache.batch_size}")
    cached = int(cache.lengths[0])
    if cached >= prompt_length:
        raise Qwen35Error(f"the given cache holds {cached} tokens, which leaves none of the {prompt_length}-token "
                          "prompt to feed")
    return cached


def _steps(model, prompt, sampler, prefill_chunk, max_new_tokens, stop_token_ids, text_stream, prepared,
           cache=None, cached=0, constraint=None, speculation=None, drafter=None):
    started = time.perf_counter()
    if cache is None:
        cache = model.make_cache(1)
    speculative, decoder = None, None
    if speculation is not None:
        from qwen35.engine.speculative import SpeculativeDecoder

        speculative = SpeculativeDecoder(model, cache, speculation, prompt[:cached], stop_token_ids, drafter)
        logits = speculative.prefill(prompt, cached, prefill_chunk)
        token_id = _sample_one(logits, sampler, constraint)
    else:
        token_id = _prefill_and_sample(model, cache, prompt, prefill_chunk, sampler, prepared, cached, constraint)
    prefill_seconds = time.perf_counter() - started
    decode_started = time.perf_counter()
    if speculative is not None:
        def advance(token, room):
            return speculative.step(token, lambda logits: _sample_one(logits, sampler, constraint), room,
                                    finished=(lambda: constraint.complete) if constraint is not None else None)
    else:
        decoder = _graph_decoder(model, cache, len(prompt), max_new_tokens)

        def advance(token, room):
            return [_decode_and_sample(model, cache, token, sampler, decoder, constraint)]
    try:
        yield from _decode_steps(advance, token_id, prompt, max_new_tokens, stop_token_ids, text_stream,
                                 prefill_seconds, decode_started, cached, constraint, speculative)
    finally:
        if decoder is not None:
            decoder.release()
        if speculative is not None:
            speculative.release()


def _graph_decoder(model, cache, prompt_length: int, max_new_tokens: int):
    """A CUDA-graph decoder over `cache` where the model's device takes one (engine/cuda_graphs.py), else None."""
    from qwen35.engine.cuda_graphs import GraphDecoder, graphs_supported

    if max_new_tokens < 2 or not graphs_supported(model):
        return None
    # K/V room for the first stretch of the answer; the decoder doubles it if the answer goes on.
    capacity = prompt_length + min(max_new_tokens, 1024)
    return GraphDecoder(model, cache, -(-capacity // 256) * 256)


def _decode_steps(advance, token_id, prompt, max_new_tokens, stop_token_ids, text_stream, prefill_seconds,
                  decode_started, cached, constraint=None, speculative=None):
    """Yield each sampled token; `advance(token, room)` feeds one and gives the next ones (one, or with
    speculation up to the guesses kept + 1), at most `room`."""
    generated = 0
    pending = [token_id]
    while True:
        token_id = pending.pop(0)
        generated += 1
        text, finish_reason, stop_reason = "", None, None
        if token_id in stop_token_ids:
            finish_reason, stop_reason, output_id = "stop", token_id, None
            if text_stream is not None:
                text = text_stream.flush()
        else:
            output_id = token_id
            if text_stream is not None:
                text, stop_reason = text_stream.push(token_id)
            if stop_reason is not None:
                finish_reason = "stop"
            elif constraint is not None and constraint.complete:
                finish_reason = "stop"
                if text_stream is not None:
                    text += text_stream.flush()
            elif generated >= max_new_tokens:
                finish_reason = "length"
                if text_stream is not None:
                    text += text_stream.flush()
        yield Generation(
            token_id=output_id,
            text=text,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            prompt_tokens=len(prompt),
            generated_tokens=generated,
            prefill_seconds=prefill_seconds,
            decode_seconds=time.perf_counter() - decode_started,
            cached_tokens=cached,
            draft_tokens=speculative.drafted if speculative is not None else 0,
            accepted_tokens=speculative.accepted if speculative is not None else 0,
        )
        if finish_reason is not None:
            return
        if not pending:
            pending = advance(token_id, max_new_tokens - generated)


# Inference mode is entered per model call, never across a yield: a suspended generator
# must not leave the consumer's thread in inference mode.
@torch.inference_mode()
def _prefill_and_sample(model, cache, prompt: list[int], chunk: int, sampler: Sampler, prepared=None,
                        cached: int = 0, constraint=None) -> int:
    """Feed the prompt in chunks of at most ``chunk`` tokens; sample after its last token.

    A prepared (image) prompt brings its own embeddings and positions; the cache then
    continues from its last position, which is what decoding needs after an image.
    The first ``cached`` tokens are already in the cache.
    """
    # Only the prompt's last position needs logits: the output head runs there alone.
    for start in range(cached, len(prompt), chunk):
        if prepared is not None:
            logits = model.forward_prompt(prepared, cache, start, min(start + chunk, len(prompt)), last_only=True)
        else:
            logits = model.forward(torch.tensor([prompt[start : start + chunk]], dtype=torch.long), cache,
                                   last_only=True)
    return _sample_one(logits[:, -1, :], sampler, constraint)


@torch.inference_mode()
def _decode_and_sample(model, cache, token_id: int, sampler: Sampler, decoder=None, constraint=None) -> int:
    if decoder is not None:
        logits = decoder.step([token_id])[:, -1, :]
    else:
        logits = model.forward(torch.tensor([[token_id]], dtype=torch.long), cache)[:, -1, :]
    return _sample_one(logits, sampler, constraint)


def _sample_one(logits: torch.Tensor, sampler: Sampler, constraint) -> int:
    """Sample a [1, vocab] row, within the constraint's mask when it has one, and advance the constraint."""
    allowed = constraint.allowed() if constraint is not None else None
    if allowed is not None:
        allowed = allowed.to(logits.device)
        width = min(allowed.numel(), logits.shape[-1])
        logits = logits.clone()
        logits[0, :width].masked_fill_(~allowed[:width], float("-inf"))
        logits[0, width:] = float("-inf")
    token_id = int(sample(logits, [sampler])[0])
    if constraint is not None:
        constraint.advance(token_id)
    return token_id


def stream_generations(
    model,
    token_ids,
    max_new_tokens: int | None = None,
    tokenizer=None,
    prefill_chunk: int | None = None,
    images=None,
    speculation=None,
    **sampling,
) -> Iterator[Generation]:
    """``generation_steps`` with options merged over ``model.generation_defaults``."""
    params = resolve_sampling(model, max_new_tokens, **sampling)
    return generation_steps(model, token_ids, params, tokenizer=tokenizer, prefill_chunk=prefill_chunk, images=images,
                            speculation=speculation)


def stream_generate(
    model,
    token_ids,
    max_new_tokens: int | None = None,
    tokenizer=None,
    prefill_chunk: int | None = None,
    images=None,
    speculation=None,
    **sampling,
) -> Iterator[int]:
    """Yield the output token ids one by one (stop tokens are not output)."""
    steps = stream_generations(model, token_ids, max_new_tokens, tokenizer, prefill_chunk, images, speculation,
                               **sampling)
    return (step.token_id for step in steps if step.token_id is not None)


def generate(
    model,
    token_ids,
    max_new_tokens: int | None = None,
    tokenizer=None,
    prefill_chunk: int | None = None,
    images=None,
    speculation=None,
    **sampling,
) -> list[int]:
    """The output token ids of one generation."""
    return list(stream_generate(model, token_ids, max_new_tokens, tokenizer, prefill_chunk, images, speculation,
                                **sampling))


def generate_result(
    model,
    token_ids,
    max_new_tokens: int | None = None,
    tokenizer=None,
    prefill_chunk: int | None = None,
    images=None,
    speculation=None,
    **sampling,
) -> GenerationResult:
    """One generation folded into a GenerationResult (ids, text, finish reason, timings)."""
    output_ids: list[int] = []
    pieces: list[str] = []
    steps = stream_generations(model, token_ids, max_new_tokens, tokenizer, prefill_chunk, images, speculation,
                               **sampling)
    for step in steps:
        if step.token_id is not None:
            output_ids.append(step.token_id)
        pieces.append(step.text)
        last = step
    return GenerationResult(
        token_ids=output_ids,
        text="".join(pieces) if tokenizer is not None else None,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        prompt_tokens=last.prompt_tokens,
        generated_tokens=last.generated_tokens,
        prefill_seconds=last.prefill_seconds,
        decode_seconds=last.decode_seconds,
    )


def _prompt_list(token_ids, vocab_size: int) -> list[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise Qwen35Error(f"the prompt must be one sequence of token ids, got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes)):
        raise Qwen35Error("the prompt must be token ids, not text: tokenize it first")
    try:
        prompt = [operator.index(token_id) for token_id in token_ids]
    except (TypeError, ValueError):
        raise Qwen35Error("the prompt must be a sequence of integer token ids") from None
    if not prompt:
        raise Qwen35Error("the prompt is empty: generation needs at least one token")
    bad = next((token_id for token_id in prompt if not 0 <= token_id < vocab_size), None)
    if bad is not None:
        raise Qwen35Error(f"token id {bad} in the prompt is outside the model's vocabulary (0..{vocab_size - 1})")
    return prompt


def _max_new_tokens(model, params: SamplingParams, prompt_length: int) -> int:
    context_length = model.config.max_position_embeddings
    room = context_length - prompt_length
    if room < 1:
        raise Qwen35Error(
            f"the prompt has {prompt_length} tokens, which leaves no room in the model's context of {context_length}"
        )
    if params.max_new_tokens is None:
        return room
    return min(params.max_new_tokens, room)
