"""OpenAI's Responses API, its reply side: output items, the stream's events, the response object.

The generation stream's `Delta`s become output items in the order the model writes them: a
`reasoning` item (its text as `reasoning_text` content; no summaries, Qwen writes none), a
`message` item (`output_text`), `function_call` items. `OutputBuilder` yields the SSE events that
build each item as it streams; a non-streamed reply is the same builder with its events dropped.
"""

from __future__ import annotations

import uuid
from typing import Any

from qwen35.server.responses_input import ResponsesRequest
from qwen35.server.stream import Delta, End, ParsedToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(kind: str, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item(kind: str, item_id: str, status: str, parts: list[dict]) -> dict[str, Any]:
    if kind == "reasoning":
        return {"id": item_id, "type": "reasoning", "summary": [], "content": parts, "status": status}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def _call_item(call: ParsedToolCall, item_id: str, status: str, arguments: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name, "arguments": arguments,
            "status": status}


class OutputBuilder:
    """Deltas -> output items, and the events (without sequence numbers) that stream them; function calls
    past `max_calls` (the request's max_tool_calls) are dropped."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.items: list[dict[str, Any]] = []
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[ParsedToolCall] = []
        self._open: tuple[str, str, list[str]] | None = None  # (kind, item id, text so far)

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        events = []
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
            events += self._text("reasoning", delta.reasoning)
        if delta.content:
            self.content.append(delta.content)
            events += self._text("message", delta.content)
        for call in delta.tool_calls:
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                continue
            self.calls.append(call)
            events += self.close("completed")
            events += self._call(call)
        return events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open[0] != kind:
            events += self.close("completed")
            item_id = new_id("rs" if kind == "reasoning" else "msg")
            self._open = (kind, item_id, [])
            where = {"output_index": len(self.items)}
            events.append({"type": "response.output_item.added", **where,
                           "item": _item(kind, item_id, "in_progress", [])})
            events.append({"type": "response.content_part.added", "item_id": item_id, **where, "content_index": 0,
                           "part": _text_part(kind, "")})
        kind, item_id, parts = self._open
        parts.append(text)
        event = {"type": "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta",
                 "item_id": item_id, "output_index": len(self.items), "content_index": 0, "delta": text}
        if kind == "message":
            event["logprobs"] = []
        return events + [event]

    def close(self, status: str) -> list[dict[str, Any]]:
        """Finish the item being written (status "incomplete" when the output was cut short)."""
        if self._open is None:
            return []
        kind, item_id, parts = self._open
        self._open = None
        text = "".join(parts)
        part = _text_part(kind, text)
        item = _item(kind, item_id, status, [part])
        where = {"item_id": item_id, "output_index": len(self.items), "content_index": 0}
        done = {"type": "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done",
                **where, "text": text}
        if kind == "message":
            done["logprobs"] = []
        self.items.append(item)
        return [done, {"type": "response.content_part.done", **where, "part": part},
                {"type": "response.output_item.done", "output_index": where["output_index"], "item": item}]

    def _call(self, call: ParsedToolCall) -> list[dict[str, Any]]:
        item_id = new_id("fc")
        where = {"item_id": item_id, "output_index": len(self.items)}
        item = _call_item(call, item_id, "completed", call.arguments)
        self.items.append(item)
        return [{"type": "response.output_item.added", "output_index": where["output_index"],
                 "item": _call_item(call, item_id, "in_progress", "")},
                {"type": "response.function_call_arguments.delta", **where, "delta": call.arguments},
                {"type": "response.function_call_arguments.done", **where, "name": call.name,
                 "arguments": call.arguments},
                {"type": "response.output_item.done", "output_index": where["output_index"], "item": item}]


def usage(end: End, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": end.prompt_tokens,
            "input_tokens_details": {"cached_tokens": end.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": end.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def reasoning_tokens(tokenizer, builder: OutputBuilder) -> int:
    """The reasoning's share of the output tokens: its text re-encoded (the stream counts tokens, not
    which part of the reply each went to)."""
    text = "".join(builder.reasoning)
    return len(tokenizer.encode(text)) if text else 0


def echo_tools(body: ResponsesRequest) -> list[dict[str, Any]]:
    return [{"type": "function", "name": tool.get("name"), "description": tool.get("description"),
             "parameters": tool.get("parameters"), "strict": tool.get("strict")} for tool in body.tools or []]


def response_object(body: ResponsesRequest, response_id: str, created_at: int, state, *, status: str,
                    output: list[dict[str, Any]], usage_data: dict | None = None, error: dict | None = None,
                    incomplete_reason: str | None = None) -> dict[str, Any]:
    """The response object; the request's settings echoed as OpenAI echoes them (sampling values as used)."""
    defaults = state.generation_defaults
    text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) \
        if body.text is not None and body.text.format is not None else {"type": "text"}
    text = {"format": text_format}
    if body.text is not None and body.text.verbosity is not None:
        text["verbosity"] = body.text.verbosity
    effort = body.reasoning.effort if body.reasoning is not None else None
    summary = body.reasoning.summary if body.reasoning is not None else None
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "model": body.model, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": effort, "summary": summary},
        "store": body.store,
        "temperature": body.temperature if body.temperature is not None else defaults.get("temperature", 1.0),
        "text": text, "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": echo_tools(body),
        "top_p": body.top_p if body.top_p is not None else defaults.get("top_p", 1.0),
        "truncation": body.truncation or "disabled", "usage": usage_data, "user": body.user,
        "metadata": body.metadata or {}, "prompt_cache_key": body.prompt_cache_key,
        "safety_identifier": body.safety_identifier, "service_tier": body.service_tier or "default",
        "top_logprobs": body.top_logprobs,
    }
