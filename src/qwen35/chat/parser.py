"""Split model output into reasoning, content and tool calls, as the text streams in.

The Qwen 3.5 template leaves the prompt inside `<think>` when thinking is on, so the
output starts as reasoning; `</think>` ends it, and so does a `<tool_call>` (models
sometimes call a tool before closing their reasoning). With thinking off everything
is content. Tool calls are Qwen's XML:

    <tool_call>
    <function=NAME>
    <parameter=P>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are converted by the tool's JSON schema (`qwen35.chat.arguments`); strings stay as
written, multi-line ones included.

Robustness, by decision:
- text before `<tool_call>` is content; several calls (in one block or several) are kept;
- stray or repeated closing tags (`</tool_call>`, `</function>`, `</parameter>`) are dropped;
- a call written without the `<tool_call>` wrapper (`<function=...>...</function>`) is a call;
- a call whose function is not among `tools` is kept with its name as written; the server
  decides what to do with it. Its values follow the no-schema rule: JSON objects and
  arrays are parsed, everything else stays a string (the text cannot tell 3 from "3");
- a call cut off by the end of the output, or a block with no parsable function, comes
  back as content, verbatim: nothing raises, nothing is silently lost;
- reasoning and content are stripped of surrounding whitespace (the template trims
  both when they go back into the history, so nothing the model sees is lost).

`OutputParser` is the incremental parser: `feed(text)` returns what became certain
(`ParsedDelta`), `finish()` flushes; any split of the text into chunks gives the same
result. `parse_output(text)` is the one-shot form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from qwen35.chat.arguments import convert_value, tool_parameter_schemas

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
FUNCTION_START, FUNCTION_END = "<function=", "</function>"
PARAMETER_START, PARAMETER_END = "<parameter=", "</parameter>"

REASONING, CONTENT, TOOL_CALL = "reasoning", "content", "tool_call"

_FUNCTION_HEAD = re.compile(r"<function=([^>\n<]*)>")
_PARAMETER_HEAD = re.compile(r"<parameter=([^>\n<]*)>")


@dataclass
class ParsedDelta:
    """What one `feed` made certain: text to append, and tool calls completed."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)


class OutputParser:
    """Incremental parser for one generated reply (see the module docstring)."""

    def __init__(self, tools=None, thinking: bool = True):
        self.thinking = thinking
        self._schemas = tool_parameter_schemas(tools)
        self._state = REASONING if thinking else CONTENT
        self._buffer = ""
        # Text of a long tool call is collected in pieces and joined once its end is in
        # sight, so a call written token by token costs linear, not quadratic, time.
        self._deferred: list[str] = []
        self._deferred_tail = ""
        self._tool_opener = ""
        self._started = {REASONING: False, CONTENT: False}
        self._after_call = False
        self._pending_space = {REASONING: "", CONTENT: ""}
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._tool_calls: list[dict] = []
        self._finished = False
        self._delta = ParsedDelta()

    # -- public ---------------------------------------------------------------------

    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise ValueError("this OutputParser has finished; make a new one per reply")
        if self._state == TOOL_CALL:
            end_marker = self._tool_end_marker()
            window = self._deferred_tail + text
            if end_marker not in window:
                self._deferred.append(text)
                self._deferred_tail = window[-(len(end_marker) - 1) :]
                return self._take_delta()
        self._join_deferred()
        self._buffer += text
        self._advance(final=False)
        return self._take_delta()

    def finish(self) -> ParsedDelta:
        """Flush at the end of the reply: an unfinished tool call becomes content."""
        if not self._finished:
            self._join_deferred()
            self._advance(final=True)
            self._finished = True
        return self._take_delta()

    @property
    def in_tool_call(self) -> bool:
        """Whether the text seen so far ends inside a tool call (nothing of it is out yet)."""
        return self._state == TOOL_CALL

    def result(self) -> dict:
        return {
            "reasoning_content": "".join(self._reasoning),
            "content": "".join(self._content),
            "tool_calls": list(self._tool_calls),
        }

    # -- the state machine ----------------------------------------------------------

    def _markers(self) -> tuple[str, ...]:
        if self._state == REASONING:
            return (THINK_END, TOOL_CALL_START, THINK_START)
        extra = (THINK_END,) if self.thinking else ()
        return (TOOL_CALL_START, FUNCTION_START, TOOL_CALL_END, *extra)

    def _advance(self, final: bool) -> None:
        while True:
            if self._state == TOOL_CALL:
                if not self._close_tool_call(final):
                    return
                continue
            markers = self._markers()
            index, marker = _earliest(self._buffer, markers)
            if marker is None:
                keep = 0 if final else _partial_marker_length(self._buffer, markers)
                self._emit(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return
            self._emit(self._buffer[:index])
            self._buffer = self._buffer[index + len(marker) :]
            self._on_marker(marker)

    def _on_marker(self, marker: str) -> None:
        if marker in (TOOL_CALL_START, FUNCTION_START):
            self._end_reasoning()
            self._state = TOOL_CALL
            self._tool_opener = marker
            if marker == FUNCTION_START:
                self._buffer = marker + self._buffer
            self._deferred_tail = self._buffer[-(len(self._tool_end_marker()) - 1) :]
        elif marker == THINK_END and self._state == REASONING:
            self._end_reasoning()
        # <think> inside reasoning, a stray </tool_call>, a late </think>: markup, dropped

    def _end_reasoning(self) -> None:
        if self._state == REASONING:
            self._pending_space[REASONING] = ""
            self._state = CONTENT

    def _close_tool_call(self, final: bool) -> bool:
        """Parse the tool-call block if its end is in the buffer; False to wait for more text."""
        end_marker = self._tool_end_marker()
        end = self._buffer.find(end_marker)
        if end < 0 and not final:
            self._deferred_tail = self._buffer[-(len(end_marker) - 1) :]
            return False
        if end < 0:  # the reply ended inside the call
            block, rest, complete = self._buffer, "", False
        else:
            stop = end + len(end_marker) if end_marker == FUNCTION_END else end
            block, rest, complete = self._buffer[:stop], self._buffer[end + len(end_marker) :], True
        calls, leftover = parse_tool_call_block(block, self._schemas, complete=complete)
        raw_opener = self._tool_opener if self._tool_opener == TOOL_CALL_START else ""
        if calls:
            self._tool_calls.extend(calls)
            self._delta.tool_calls.extend(calls)
            if leftover.strip():
                self._emit(leftover)
            self._after_call = True
        else:  # not a call after all: the text is content, as written
            closing = end_marker if complete and end_marker == TOOL_CALL_END else ""
            self._emit(raw_opener + block + closing)
        self._state = CONTENT
        self._buffer = rest
        return True

    def _tool_end_marker(self) -> str:
        return TOOL_CALL_END if self._tool_opener == TOOL_CALL_START else FUNCTION_END

    def _join_deferred(self) -> None:
        if self._deferred:
            self._buffer += "".join(self._deferred)
            self._deferred = []

    # -- output with whitespace trimming ----------------------------------------------

    def _emit(self, text: str) -> None:
        channel = REASONING if self._state == REASONING else CONTENT
        if not self._started[channel]:
            text = text.lstrip()
            if not text:
                return
            self._started[channel] = True
        if channel == CONTENT and self._after_call:
            # the whitespace around a call is one separator ("check.\n\n<call>\nDone." -> "check.\n\nDone.")
            if self._pending_space[CONTENT]:
                text = text.lstrip()
                if not text:
                    return
            self._after_call = False
        text = self._pending_space[channel] + text
        kept = text.rstrip()
        self._pending_space[channel] = text[len(kept) :]
        if kept:
            if channel == REASONING:
                self._reasoning.append(kept)
                self._delta.reasoning_content += kept
            else:
                self._content.append(kept)
                self._delta.content += kept

    def _take_delta(self) -> ParsedDelta:
        delta, self._delta = self._delta, ParsedDelta()
        return delta


def parse_output(text: str, tools=None, thinking: bool = True) -> dict:
    """{"reasoning_content", "content", "tool_calls": [{"name", "arguments"}]} of a finished reply."""
    parser = OutputParser(tools=tools, thinking=thinking)
    parser.feed(text)
    parser.finish()
    return parser.result()


def prompt_ends_in_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside `<think>`: the `thinking` to parse its
    reply with. Read from the prompt itself, so no template or flag can make the two disagree."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


# -- tool-call blocks -------------------------------------------------------------------


def parse_tool_call_block(block: str, schemas: dict, complete: bool = True) -> tuple[list[dict], str]:
    """The calls in the text between `<tool_call>` and `</tool_call>`, and any text left over.

    With `complete=False` (the reply stopped inside the block) only functions closed by
    `</function>` count; the unfinished rest is returned as left over.
    """
    stripped = block.strip()
    if stripped.startswith("{"):  # the JSON form of earlier Qwen releases
        call = _json_call(stripped) if complete else None
        return ([call], "") if call else ([], block)
    calls = []
    heads = list(_FUNCTION_HEAD.finditer(block))
    leftover = ""
    for number, head in enumerate(heads):
        body_end = heads[number + 1].start() if number + 1 < len(heads) else len(block)
        body = block[head.end() : body_end]
        close = body.find(FUNCTION_END)
        if close >= 0:
            body = body[:close]
        elif not complete:
            leftover = block[head.start() :]
            break
        name = head.group(1).strip()
        if not name:
            continue
        calls.append({"name": name, "arguments": _parameters(body, schemas.get(name, {}))})
    return calls, leftover


def _parameters(body: str, properties: dict) -> dict:
    arguments = {}
    heads = list(_PARAMETER_HEAD.finditer(body))
    for number, head in enumerate(heads):
        value_end = heads[number + 1].start() if number + 1 < len(heads) else len(body)
        value = body[head.end() : value_end]
        close = value.find(PARAMETER_END)
        if close >= 0:
            value = value[:close]
        # the template writes "\n" + value + "\n"; anything more is the value's own
        value = value.removeprefix("\n").removesuffix("\n")
        name = head.group(1).strip()
        if name:
            arguments[name] = convert_value(value, properties.get(name))
    return arguments


def _json_call(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"].strip():
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": data["name"].strip(), "arguments": arguments}


# -- marker search ----------------------------------------------------------------------


def _earliest(text: str, markers) -> tuple[int, str | None]:
    best, found = len(text), None
    for marker in markers:
        index = text.find(marker, 0, best + len(marker))
        if 0 <= index < best:
            best, found = index, marker
    return best, found


def _partial_marker_length(text: str, markers) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest
