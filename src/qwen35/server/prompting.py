"""From an API request to an engine job: the prompt's tokens, sampling, limits, the output parser.

Both APIs (OpenAI and Ollama) end here, so context checks, sampling defaults and the thinking
toggle behave the same whichever a client speaks.

The reasoning budget is applied here too, for every API: the request's own (chat completions'
`thinking_budget`, Anthropic's `thinking.budget_tokens`) over the server's `--reasoning-budget`.
It applies to chat replies that open inside `<think>`: a budget N > 0 wraps the job's constraint
in an `engine.reasoning_budget.ReasoningBudget`; a request's budget of 0 closes the reasoning in the
prompt itself ("<think>\n" + "\n</think>\n\n" is exactly what the template renders with
`enable_thinking: false`), and tells the parser and a grammar that the reasoning is over. The
server's 0 is not applied here: it is a template default (thinking off, `ServerState`), which a
request may override, as llama-server's; a request that turns thinking on under it is not capped.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from qwen35.chat.parser import THINK_END, prompt_ends_in_reasoning
from qwen35.engine.reasoning_budget import budget_constraint
from qwen35.engine.sampler import SamplingParams
from qwen35.engine.service import GenerationRequest
from qwen35.server.errors import APIError
from qwen35.server.stream import ChatText, OutputParser, PlainText, generate

# A prompt-length check happens before any work; a prompt longer than this many characters is
# refused before tokenizing, so a huge body cannot keep the tokenizer busy.
_CHARS_PER_TOKEN_BOUND = 16

# Appended to a prompt that ends inside `<think>\n` to close the reasoning, as thinking off renders it.
_CLOSED_REASONING = "\n" + THINK_END + "\n\n"


@dataclass
class Conversation:
    """A chat request as it was rendered: kept to render the next turn's history once the reply is known."""

    messages: list[dict[str, Any]]
    tools: list[dict] | None = None
    template_kwargs: dict[str, Any] | None = None
    has_images: bool = False


@dataclass
class Job:
    request: GenerationRequest
    parser: OutputParser
    stop_strings: list[str]
    prompt_text: str
    conversation: Conversation | None = None
    images: list[bytes] | None = None  # encoded images, one per <|image_pad|> placeholder in order
    max_tokens: int | None = None  # as requested (None: up to the context)


async def start_job(state, job: Job, request=None):
    """Submit a job to the engine; its stream. A grammar's vocabulary trie (seconds for a real
    vocabulary, once) and the images' features are computed off the event loop and off the engine's
    thread, so nobody waits for them."""
    if job.request.constraint is not None:
        await asyncio.to_thread(job.request.constraint.prepare)
    if job.images:
        from qwen35.server.images import attach_images

        await attach_images(state, job)
    return generate(state.service, state.tokenizer, job.request, job.parser, job.stop_strings, request)


def check_text(value, where: str = "") -> None:
    """Refuse strings that are not valid Unicode (JSON can carry lone surrogates; no tokenizer takes them)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"'{where or 'body'}' holds text that is not valid Unicode (a lone surrogate).",
                           param=where or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_text(item, f"{where}.{index}")


def check_request(state, body) -> None:
    """Checks every generating route makes first: valid text, a model this server serves."""
    check_text(body.model_dump())
    check_model_name(state, body.model)
    if getattr(body, "n", 1) != 1:
        raise APIError(400, f"n={body.n}: this server returns one choice per request; send {body.n} requests "
                            f"instead (they run in parallel).", param="n", code="unsupported_parameter")


def check_model_name(state, name: str) -> None:
    if name not in state.model_names:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'.",
                       param="model", code="model_not_found")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages as the chat template reads them (tool-call arguments as dicts)."""
    rendered = []
    for index, message in enumerate(messages):
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        calls = []
        for call in message.get("tool_calls") or []:
            function = dict(call.get("function") or {})
            function["arguments"] = tool_arguments(function.get("arguments"), f"messages[{index}]",
                                                   f"messages.{index}.tool_calls")
            calls.append({**call, "function": function})
        if calls:
            message["tool_calls"] = calls
        rendered.append({key: value for key, value in message.items() if value is not None})
    return rendered


def tool_arguments(arguments, where: str, param: str) -> dict:
    """A tool call's arguments as the template takes them: a JSON object, sent as one or as its text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise APIError(400, f"{where}: the tool call's arguments are not valid JSON.", param=param) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}: the tool call's arguments must be a JSON object.", param=param)
    return arguments


def render_chat(state, messages, tools=None, template_kwargs=None) -> str:
    try:
        return state.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                   **(template_kwargs or {}))
    except APIError:
        raise
    except Exception as error:  # the template's raise_exception() and bad message shapes
        raise APIError(400, f"The conversation cannot be rendered with the chat template: {error}",
                       param="messages") from None


# Stands for the message a client sends after a reply; its text never reaches the model.
_NEXT_MESSAGE = "\u2063qwen35: the next message\u2063"


def next_turn_ids(tokenizer, conversation: Conversation, reply: dict[str, Any]) -> list[int] | None:
    """The tokens the next request of this conversation starts with: its messages and `reply`, rendered
    as the template renders them once another message follows (a plain reply loses its reasoning
    then; a tool call keeps it), up to the end of the reply's turn. None if that cannot be found."""
    if tokenizer.im_end_id is None:
        return None
    follow = {"role": "tool" if reply.get("tool_calls") else "user", "content": _NEXT_MESSAGE}
    text = tokenizer.apply_chat_template([*conversation.messages, reply, follow], tools=conversation.tools or None,
                                         add_generation_prompt=False, **(conversation.template_kwargs or {}))
    turn_end = tokenizer.id_to_token(tokenizer.im_end_id)
    end = text.rfind(turn_end, 0, max(text.find(_NEXT_MESSAGE), 0))
    if end < 0:
        return None
    end += len(turn_end)
    if text[end:end + 1] == "\n":  # the newline between turns is part of the history the next prompt repeats
        end += 1
    return tokenizer.encode(text[:end])


async def prepare_next_turn(state, conversation: Conversation | None, content: str, reasoning: str,
                            tool_calls: list[tuple[str, dict]]) -> None:
    """Ask the engine to prefill this conversation's history with its reply, as the next turn will send
    it, while it has time to spare: the next turn then finds its whole history cached. Best effort."""
    if conversation is None or conversation.has_images or state.service.prefix_store.budget_bytes <= 0:
        return  # (an image's tokens are keyed by its pixels, which a history of token ids cannot say)
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        reply["reasoning_content"] = reasoning
    if tool_calls:
        reply["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": arguments}}
                               for name, arguments in tool_calls]
    try:
        ids = await asyncio.to_thread(next_turn_ids, state.tokenizer, conversation, reply)
    except Exception:  # a template that cannot render this history: nothing to prepare
        return
    if ids:
        state.service.prepare_prefix(ids)


def sampling_params(state, options: dict[str, Any]) -> SamplingParams:
    return SamplingParams.from_options(state.generation_defaults, **{k: v for k, v in options.items()
                                                                    if v is not None})


def make_job(state, prompt_text: str, *, max_tokens: int | None, sampling: SamplingParams, stop,
             parser: OutputParser | None = None, top_logprobs: int | None = None, constraint=None,
             prompt_ids: list[int] | None = None, reasoning_budget: int | None = None) -> Job:
    """`reasoning_budget`: the request's own (None: the server's; see the module docstring)."""
    limit = state.context_length
    budget = reasoning_budget
    if budget is None:
        budget = getattr(state, "reasoning_budget", -1)
        budget = -1 if budget == 0 else budget
    thinking = prompt_ids is None and isinstance(parser, ChatText) and prompt_ends_in_reasoning(prompt_text)
    if thinking and budget == 0:
        prompt_text += _CLOSED_REASONING
        parser.feed(THINK_END)  # the reply starts after the reasoning: all it writes is content
        if constraint is not None:
            constraint.advance(state.tokenizer.think_end_id)
    elif thinking and budget > 0:
        constraint = budget_constraint(state.tokenizer, state.vocab_size, budget, inner=constraint)
    if prompt_ids is None:
        if len(prompt_text) > limit * _CHARS_PER_TOKEN_BOUND:
            raise APIError(400, f"The prompt is {len(prompt_text)} characters long, far more than this server's "
                                f"context of {limit} tokens holds.", param="messages", code="context_length_exceeded")
        prompt_ids = state.tokenizer.encode(prompt_text)
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt")
    vocab = state.vocab_size
    if any(not 0 <= token_id < vocab for token_id in prompt_ids):
        raise APIError(400, f"The prompt holds token ids outside the vocabulary (0..{vocab - 1}).", param="prompt")
    prompt_tokens = len(prompt_ids)
    check_context(limit, prompt_tokens, max_tokens)
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not text for text in stop_strings):
        raise APIError(400, "Stop strings must not be empty.", param="stop")
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=sampling,
        max_new_tokens=max_tokens if max_tokens is not None else limit - prompt_tokens,
        stop_token_ids=frozenset(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        top_logprobs=top_logprobs,
        constraint=constraint,
        snapshot_points=turn_boundaries(state.tokenizer, prompt_ids),
    )
    return Job(request, parser or PlainText(), stop_strings, prompt_text, max_tokens=max_tokens)


def check_context(limit: int, prompt_tokens: int, max_tokens: int | None) -> None:
    if prompt_tokens >= limit:
        raise APIError(400, f"This server's context is {limit} tokens, but the prompt has {prompt_tokens} tokens. "
                            f"Shorten the prompt or restart the server with a larger -c.",
                       param="messages", code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > limit:
        raise APIError(400, f"This server's context is {limit} tokens, but {prompt_tokens + max_tokens} were "
                            f"requested ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
                            f"Lower max_tokens to at most {limit - prompt_tokens}.",
                       param="max_tokens", code="context_length_exceeded")


def turn_boundaries(tokenizer, prompt_ids: list[int], keep: int = 2) -> tuple[int, ...]:
    """Positions just after the last `keep` rendered turns (`<|im_end|>` and its newline).

    A later request that repeats this conversation and adds to it starts with exactly these tokens,
    whatever the template appends for the new turn, so they are where state snapshots pay off.
    """
    end_id = tokenizer.im_end_id
    points = [index + 2 for index in range(len(prompt_ids) - 1) if prompt_ids[index] == end_id]
    return tuple(point for point in points[-keep:] if point < len(prompt_ids))
