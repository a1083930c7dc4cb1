"""The one generation path of the server: tokens from the engine -> text -> parsed deltas.

Every endpoint, streamed or not, reads the same async stream of `Delta`s and a final `End`; a
non-streamed reply is that stream folded (`fold`). Stop strings are cut here (the engine works on
tokens), the client's disconnect cancels the engine's work, and a stop string cancels it too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request

from qwen35.chat.parser import OutputParser as ChatOutputParser
from qwen35.engine.service import EngineService, GenerationRequest, TokenOutput
from qwen35.engine.stopping import StopStringMatcher


@dataclass(slots=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(slots=True)
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    logprobs: list[TokenOutput] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.logprobs)


@dataclass(slots=True)
class End:
    finish_reason: str  # "stop" | "length" | "tool_calls" | "error" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the reply, if one did


class OutputParser(Protocol):
    """Splits streamed model text into content, reasoning and tool calls."""

    def feed(self, text: str) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...


class PlainText:
    """Text completions: all text is content."""

    def feed(self, text: str) -> list[Delta]:
        return [Delta(content=text)] if text else []

    def finish(self) -> list[Delta]:
        return []


class ChatText:
    """Chat replies: reasoning, content and tool calls split by the chat parser.

    With `calls_allowed` False (tool_choice "none") a call the model writes anyway stays text, in the
    template's XML, instead of becoming a tool call the client did not ask for; past `max_calls`
    (parallel_tool_calls false: one) further calls are dropped. With `reasoning_inline`
    (--reasoning-format none) the reasoning is not split off: the content is the reply as written,
    `<think>` (which the prompt opened) and `</think>` included."""

    def __init__(self, tools=None, thinking: bool = True, calls_allowed: bool = True, max_calls: int | None = None,
                 reasoning_inline: bool = False):
        self._parser = ChatOutputParser(tools=tools, thinking=thinking and not reasoning_inline)
        self._calls_allowed = calls_allowed
        self._calls_left = max_calls
        self._opener = "<think>\n" if thinking and reasoning_inline else ""

    def feed(self, text: str) -> list[Delta]:
        return self._convert(self._parser.feed(text)) if text else []

    def finish(self) -> list[Delta]:
        return self._convert(self._parser.finish())

    def _convert(self, parsed) -> list[Delta]:
        content = parsed.content
        calls = []
        for call in parsed.tool_calls:
            if self._calls_allowed and self._calls_left is not None and self._calls_left <= 0:
                continue
            if self._calls_allowed:
                if self._calls_left is not None:
                    self._calls_left -= 1
                calls.append(ParsedToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"],
                                            json.dumps(call["arguments"], ensure_ascii=False)))
            else:
                content += _call_as_text(call)
        if content and self._opener:
            content, self._opener = self._opener + content, ""
        delta = Delta(content=content, reasoning=parsed.reasoning_content, tool_calls=calls)
        return [delta] if delta else []


def _call_as_text(call: dict) -> str:
    parameters = "".join(
        f"<parameter={name}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}"
        f"\n</parameter>\n" for name, value in call["arguments"].items())
    return f"<tool_call>\n<function={call['name']}>\n{parameters}</function>\n</tool_call>"


async def _cancel_on_disconnect(request: Request, cancel) -> None:
    # The body was read before generation started, so the next message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel()
            return


def generate(service: EngineService, tokenizer, job: GenerationRequest, parser: OutputParser,
             stop_strings: list[str], request: Request | None = None) -> AsyncIterator[Delta | End]:
    """Submit one request now (so a full queue raises QueueFullError before any reply starts) and
    return its stream: Deltas, then exactly one End."""
    handle = service.submit(job)
    return _run(handle, tokenizer, parser, stop_strings, request)


async def _run(handle, tokenizer, parser: OutputParser, stop_strings: list[str],
               request: Request | None) -> AsyncIterator[Delta | End]:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle.cancel)) if request is not None else None
    decoder = tokenizer.stream_decoder(skip_special_tokens=False)
    matcher = StopStringMatcher(stop_strings)
    stopped_by_string = False
    produced = 0
    try:
        async for step in handle:
            if not stopped_by_string:
                text_parts, logprobs = [], []
                for token in step.tokens:
                    produced += 1
                    visible, matched = matcher.feed(decoder.feed([token.token_id]))
                    text_parts.append(visible)
                    if token.logprob is not None:
                        logprobs.append(token)
                    if matched is not None:
                        stopped_by_string = True
                        handle.cancel()
                        break
                if step.finish is not None and not stopped_by_string:
                    text_parts.append(matcher.feed(decoder.flush())[0])
                    if matcher.matched is None:
                        text_parts.append(matcher.flush())
                for delta in _with_logprobs(parser.feed("".join(text_parts)), logprobs):
                    yield delta
            if step.finish is not None:
                for delta in parser.finish():
                    yield delta
                finish = step.finish
                reason = "stop" if stopped_by_string else finish.reason
                yield End(reason, finish.prompt_tokens, produced if stopped_by_string else finish.completion_tokens,
                          finish.cached_tokens, finish.error, matcher.matched)
                return
    finally:
        if watcher is not None:
            watcher.cancel()
        handle.cancel()  # a no-op when finished; frees the slot when the client went away


def _with_logprobs(deltas: list[Delta], logprobs: list[TokenOutput]) -> list[Delta]:
    if not logprobs:
        return deltas
    if not deltas:
        return [Delta(logprobs=logprobs)]
    deltas[-1].logprobs = logprobs
    return deltas


@dataclass
class Folded:
    content: str
    reasoning: str
    tool_calls: list[ParsedToolCall]
    logprobs: list[TokenOutput]
    end: End


async def fold(stream: AsyncIterator[Delta | End]) -> Folded:
    """A non-streamed reply: the same stream, collected."""
    content, reasoning, tool_calls, logprobs = [], [], [], []
    async for item in stream:
        if isinstance(item, End):
            return Folded("".join(content), "".join(reasoning), tool_calls, logprobs, item)
        content.append(item.content)
        reasoning.append(item.reasoning)
        tool_calls.extend(item.tool_calls)
        logprobs.extend(item.logprobs)
    raise RuntimeError("generation ended without an End")
