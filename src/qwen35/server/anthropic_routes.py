"""Anthropic's Messages API: POST /v1/messages (a Message, or its SSE events when stream is true) and
POST /v1/messages/count_tokens, for the `anthropic` SDK, Claude Code and agents built on them.

A request becomes the OpenAI-shaped conversation the chat template reads (system blocks joined, a
user turn's tool_result blocks as tool messages, an assistant turn's thinking as its
reasoning_content and tool_use as tool_calls) and then the same engine job as /v1/chat/completions.
Where Anthropic and Qwen differ:
- any model name is served (Claude Code asks for claude-* names); the reply repeats the name asked for;
- thinking is off unless the request enables it (`thinking: {type: enabled | adaptive}`), as Anthropic's
  default; budget_tokens caps the reasoning (then `</think>` is inserted and the model answers; see
  engine/reasoning_budget.py), without Anthropic's limits (>= 1024, < max_tokens): a local model may
  well want a smaller budget, and max_tokens still cuts the whole reply. Without budget_tokens the
  server's --reasoning-budget applies; the thinking and its closing tag count against max_tokens;
- max_tokens past the room the context leaves is capped there, and a reply that fills the context ends
  with stop_reason "model_context_window_exceeded", as Anthropic's newer models do;
- usage.input_tokens counts the prompt tokens not found in the prefix cache, cache_read_input_tokens
  those found, as Anthropic counts prompt caching;
- thinking blocks carry an empty signature; a tool_result with is_error gets "Error: " before its text.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen35.chat.parser import prompt_ends_in_reasoning
from qwen35.server.anthropic_schemas import (Base64ImageSource, CountTokensRequest, ImageBlock, MessagesRequest,
                                             PromptFields, TextBlock, ToolResultBlock)
from qwen35.server.app import ServerState, get_state
from qwen35.server.constraints import json_constraint, tool_call_constraint
from qwen35.server.errors import APIError, AnthropicErrorBody, anthropic_error_body
from qwen35.server.images import check_vision, openai_image_bytes
from qwen35.server.prompting import (Conversation, check_text, make_job, prepare_next_turn, render_chat,
                                     sampling_params, start_job)
from qwen35.server.stream import ChatText, Delta, End, fold

_ERRORS = {400: "Bad request: a malformed body or field, a prompt over the context, ...",
           401: "Missing or wrong API key", 404: "Unknown route", 413: "Request body too large",
           429: "Queue full: retry after Retry-After seconds", 500: "Generation failed",
           529: "Shutting down or still loading"}
router = APIRouter(responses={status: {"model": AnthropicErrorBody, "description": meaning}
                              for status, meaning in _ERRORS.items()})

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class RenderedRequest:
    """An Anthropic request as the chat template renders it."""

    prompt_text: str
    messages: list[dict]  # OpenAI-shaped, as the template reads them
    images: list[bytes] = field(default_factory=list)  # in the order of their placeholders
    tools: list[dict] | None = None
    forced_tool: str | None = None  # "" any tool, a name that tool, None free choice
    template_kwargs: dict = field(default_factory=dict)
    prefill: str | None = None  # a final assistant message's text, which the reply continues
    calls_allowed: bool = True  # tool_choice none: a call the model writes anyway stays text


# --- request -> template messages ------------------------------------------------------------


def _joined(parts: list[dict]) -> str | list[dict]:
    """A message's content: its text when it is all text (the template concatenates text parts as they
    are), else the parts."""
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _image_bytes(block: ImageBlock, where: str) -> bytes:
    source = block.source
    if isinstance(source, Base64ImageSource):
        return openai_image_bytes(f"data:{source.media_type};base64,{source.data}", f"{where}.source")
    return openai_image_bytes(source.url, f"{where}.source.url")


def _user_messages(blocks, images: list[bytes]) -> list[dict]:
    """A user turn: its tool_result blocks as tool messages, its text and images as user messages, in order."""
    messages, parts = [], []

    def flush():
        if parts:
            messages.append({"role": "user", "content": _joined(list(parts))})
            parts.clear()

    for where, block in blocks:
        if block.type == "text":
            parts.append({"type": "text", "text": block.text})
        elif block.type == "image":
            images.append(_image_bytes(block, where))
            parts.append({"type": "image"})
        elif block.type == "tool_result":
            flush()
            messages.append({"role": "tool", "content": _tool_result(block, where, images)})
        else:
            raise APIError(400, f"{where}: a {block.type} block belongs in an assistant message, not a user one.",
                           param=where)
    flush()
    return messages


def _tool_result(block: ToolResultBlock, where: str, images: list[bytes]) -> str | list[dict]:
    content = block.content if block.content is not None else ""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
    for index, item in enumerate([] if isinstance(content, str) else content):
        if isinstance(item, TextBlock):
            parts.append({"type": "text", "text": item.text})
        else:
            images.append(_image_bytes(item, f"{where}.content.{index}"))
            parts.append({"type": "image"})
    if block.is_error:  # the template has no field for it; the model reads it
        parts.insert(0, {"type": "text", "text": "Error: "})
    return _joined(parts)


def _assistant_message(blocks) -> dict:
    text, reasoning, calls = [], [], []
    for where, block in blocks:
        if block.type == "text":
            text.append(block.text)
        elif block.type == "thinking":
            reasoning.append(block.thinking)
        elif block.type == "tool_use":
            calls.append({"type": "function", "function": {"name": block.name, "arguments": block.input}})
        elif block.type != "redacted_thinking":
            raise APIError(400, f"{where}: a {block.type} block belongs in a user message, not an assistant one.",
                           param=where)
    message = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _turns(body: PromptFields) -> list[tuple[str, list]]:
    """The messages as turns of (role, [(where, block)]): consecutive messages of one role are one turn,
    as Anthropic combines them."""
    turns: list[tuple[str, list]] = []
    for index, message in enumerate(body.messages):
        content = message.content
        blocks = [TextBlock(type="text", text=content)] if isinstance(content, str) else content
        located = [(f"messages.{index}.content.{number}", block) for number, block in enumerate(blocks)]
        if turns and turns[-1][0] == message.role:
            turns[-1][1].extend(located)
        else:
            turns.append((message.role, located))
    return turns


def _tools(body: PromptFields) -> tuple[list[dict] | None, str | None, bool]:
    """The tools the template shows, the tool the reply must call ("" any, None free) and whether calls
    are allowed, from `tools` and `tool_choice` (auto / any / tool / none, as OpenAI's auto / required /
    named / none)."""
    tools = []
    for index, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise APIError(400, f"tools.{index}: the tool type '{tool.type}' is one of Anthropic's server tools, "
                                f"which this server does not run; define it as a custom tool (name, description, "
                                f"input_schema) and run it in the client.", param=f"tools.{index}.type")
        if tool.input_schema is None:
            raise APIError(400, f"tools.{index}: a custom tool needs an input_schema.",
                           param=f"tools.{index}.input_schema")
        function = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = tool.input_schema
        tools.append({"type": "function", "function": function})
    choice = body.tool_choice
    if choice is None or choice.type == "auto":
        return tools or None, None, True
    if choice.type == "none":
        return None, None, False
    if not tools:
        raise APIError(400, f"tool_choice '{choice.type}' asks for a tool call, but the request has no tools.",
                       param="tool_choice")
    if choice.type == "any":
        return tools, "", True
    names = [tool["function"]["name"] for tool in tools]
    if choice.name not in names:
        raise APIError(400, f"tool_choice names the tool '{choice.name}', which is not among the request's tools "
                            f"({', '.join(sorted(names))}).", param="tool_choice.name")
    return tools, choice.name, True


def render_request(state, body: PromptFields) -> RenderedRequest:
    """The prompt of an Anthropic request, as the chat template renders its OpenAI-shaped equivalent."""
    check_text(body.model_dump())
    thinking = body.thinking is not None and body.thinking.type != "disabled"
    messages, images = [], []
    if body.system:
        system = body.system if isinstance(body.system, str) else "".join(block.text for block in body.system)
        messages.append({"role": "system", "content": system})
    turns = _turns(body)
    prefill = None
    if turns[-1][0] == "assistant":  # a prefilled reply: the model continues it
        final = _assistant_message(turns.pop()[1])
        if final.get("tool_calls") or final.get("reasoning_content"):
            raise APIError(400, "A final assistant message (a prefilled reply) can hold text only, not tool_use "
                                "or thinking blocks.", param="messages")
        if thinking:
            raise APIError(400, "A final assistant message (a prefilled reply) cannot be combined with thinking; "
                                "disable thinking or end the messages with a user turn.", param="messages")
        prefill = final["content"]
        if not turns:
            raise APIError(400, "The messages need a user turn before the final assistant message (a prefilled "
                                "reply).", param="messages")
    for role, blocks in turns:
        if role == "user":
            messages.extend(_user_messages(blocks, images))
        else:
            messages.append(_assistant_message(blocks))
    tools, forced_tool, calls_allowed = _tools(body)
    template_kwargs = {"enable_thinking": thinking}
    prompt_text = render_chat(state, messages, tools, template_kwargs) + (prefill or "")
    return RenderedRequest(prompt_text, messages, images, tools, forced_tool, template_kwargs, prefill,
                           calls_allowed)


# --- routes ----------------------------------------------------------------------------------


def _constraint(state, body: MessagesRequest, rendered: RenderedRequest, thinking: bool):
    if rendered.forced_tool is not None:
        return tool_call_constraint(state.tokenizer, state.vocab_size, rendered.tools, rendered.forced_tool or None,
                                    thinking)
    output_format = body.output_config.format if body.output_config else None
    if output_format is not None:
        return json_constraint(state.tokenizer, state.vocab_size, output_format.json_schema, thinking)
    return None


def _context_error(error: APIError) -> APIError:
    """Claude Code compacts a conversation when an error says "prompt is too long", as Anthropic's does."""
    if error.code == "context_length_exceeded" and error.param == "messages":
        return APIError(400, f"prompt is too long: {error.message}", param=error.param, code=error.code)
    return error


async def _start(state: ServerState, body: MessagesRequest, request: Request):
    rendered = render_request(state, body)
    check_vision(state, len(rendered.images), "messages")
    thinking = prompt_ends_in_reasoning(rendered.prompt_text)
    tools = rendered.tools
    disable_parallel = bool(body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    sampling = sampling_params(state, {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k})
    try:
        job = make_job(state, rendered.prompt_text, max_tokens=None, sampling=sampling, stop=body.stop_sequences,
                       parser=ChatText(tools=tools, thinking=thinking, calls_allowed=rendered.calls_allowed,
                                       max_calls=1 if disable_parallel else None),
                       constraint=_constraint(state, body, rendered, thinking),
                       reasoning_budget=body.thinking.budget_tokens if body.thinking is not None else None)
        # Claude Code asks for more tokens than a local context holds: the reply may fill what is left.
        job.request.max_new_tokens = min(job.request.max_new_tokens, body.max_tokens)
        if rendered.prefill is None:
            job.conversation = Conversation(rendered.messages, tools, rendered.template_kwargs,
                                            has_images=bool(rendered.images))
        job.images = rendered.images or None
        stream = await start_job(state, job, request)
    except APIError as error:
        raise _context_error(error) from None
    return job, stream


def _usage(end: End) -> dict:
    return {"input_tokens": end.prompt_tokens - end.cached_tokens, "output_tokens": end.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": end.cached_tokens}


def _stop_reason(end: End, saw_tool_use: bool, max_tokens: int) -> tuple[str, str | None]:
    if end.stop_sequence is not None:
        return "stop_sequence", end.stop_sequence
    if end.finish_reason == "length":
        return ("max_tokens" if end.completion_tokens >= max_tokens else "model_context_window_exceeded"), None
    return ("tool_use" if saw_tool_use else "end_turn"), None


def _tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


@router.post("/v1/messages", summary="Anthropic Messages API (SSE events when stream is true)")
async def create_message(body: MessagesRequest, request: Request):
    state = get_state(request)
    job, stream = await _start(state, body, request)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(_events(state, stream, message_id, body, len(job.request.prompt_ids),
                                         job.conversation),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    folded = await fold(stream)
    end = folded.end
    if end.error is not None:
        raise APIError(500, f"Generation failed: {end.error}")
    calls = [(call.name, json.loads(call.arguments)) for call in folded.tool_calls]
    await prepare_next_turn(state, job.conversation, folded.content, folded.reasoning, calls)
    content = []
    if folded.reasoning:
        content.append({"type": "thinking", "thinking": folded.reasoning, "signature": ""})
    if folded.content:
        content.append({"type": "text", "text": folded.content})
    content += [{"type": "tool_use", "id": _tool_use_id(), "name": name, "input": arguments}
                for name, arguments in calls]
    stop_reason, stop_sequence = _stop_reason(end, bool(calls), body.max_tokens)
    return {"id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": _usage(end)}


def _event(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload}, ensure_ascii=False)}\n\n"


async def _events(state, stream: AsyncIterator[Delta | End], message_id: str, body: MessagesRequest,
                  prompt_tokens: int, conversation: Conversation | None) -> AsyncIterator[str]:
    """Anthropic's stream: message_start, each content block as start / deltas / stop, message_delta
    (stop_reason, usage), message_stop; an `error` event if generation fails."""
    yield _event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0}}})
    yield _event("ping", {})
    index, open_kind = -1, None
    content, reasoning, calls = [], [], []  # the reply, for the next turn's prefix

    def close() -> list[str]:
        nonlocal open_kind
        events = []
        if open_kind == "thinking":
            events.append(_event("content_block_delta", {"index": index, "delta": {
                "type": "signature_delta", "signature": ""}}))
        if open_kind is not None:
            events.append(_event("content_block_stop", {"index": index}))
        open_kind = None
        return events

    def open_block(kind: str, block: dict) -> list[str]:
        nonlocal index, open_kind
        events = close()
        index += 1
        open_kind = kind
        return events + [_event("content_block_start", {"index": index, "content_block": block})]

    async for item in stream:
        if isinstance(item, End):
            if item.error is not None:
                yield _event("error", {"error": anthropic_error_body(500, f"Generation failed: {item.error}")["error"]})
                return
            for event in close():
                yield event
            stop_reason, stop_sequence = _stop_reason(item, bool(calls), body.max_tokens)
            yield _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": _usage(item)})
            await prepare_next_turn(state, conversation, "".join(content), "".join(reasoning), calls)
            yield _event("message_stop", {})
            return
        if item.reasoning:
            reasoning.append(item.reasoning)
            if open_kind != "thinking":
                for event in open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                    yield event
            yield _event("content_block_delta", {"index": index, "delta": {
                "type": "thinking_delta", "thinking": item.reasoning}})
        if item.content:
            content.append(item.content)
            if open_kind != "text":
                for event in open_block("text", {"type": "text", "text": ""}):
                    yield event
            yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta",
                                                                           "text": item.content}})
        for call in item.tool_calls:
            calls.append((call.name, json.loads(call.arguments)))
            for event in open_block("tool_use", {"type": "tool_use", "id": _tool_use_id(), "name": call.name,
                                                 "input": {}}):
                yield event
            yield _event("content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": call.arguments}})
            for event in close():
                yield event


@router.post("/v1/messages/count_tokens", summary="Anthropic: the prompt's token count")
async def count_tokens(body: CountTokensRequest, request: Request):
    state = get_state(request)
    rendered = render_request(state, body)
    check_vision(state, len(rendered.images), "messages")
    ids = await asyncio.to_thread(state.tokenizer.encode, rendered.prompt_text)
    count = len(ids)
    if rendered.images:  # each image's one placeholder becomes its patches' tokens
        from qwen35.chat.images import preprocess_image

        for image in rendered.images:
            processed = await asyncio.to_thread(preprocess_image, image, state.model.image_settings)
            count += processed.num_tokens - 1
    return {"input_tokens": count}
