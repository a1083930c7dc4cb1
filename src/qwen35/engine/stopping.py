"""Streaming text out of tokens: incremental detokenizing and stop strings.

Both pieces hold text back rather than take it back: the decoder waits while the last
tokens end inside a UTF-8 character, and the stop matcher waits while the end of the
text could be the start of a stop string. What they emit is final, so a server can send
it to a client at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDecoder", "StopStringMatcher", "TextStream"]

_REPLACEMENT_CHARACTER = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDecoder:
    """Text deltas for a growing list of token ids, one token at a time.

    Byte-level BPE splits characters across tokens and a token's text can depend on its
    neighbour, so each step decodes a short window of recent tokens and emits what it
    adds beyond the window's already-emitted part; while the window ends in an
    incomplete character (decoded as U+FFFD) nothing is emitted.
    """

    __slots__ = ("_tokenizer", "_ids", "_prefix_offset", "_read_offset")

    def __init__(self, tokenizer: Decoder):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded as context
        self._read_offset = 0  # tokens before this are emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (maybe empty)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of the stream (incomplete bytes included)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        emitted = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if not final and (len(window) <= len(emitted) or window.endswith(_REPLACEMENT_CHARACTER)):
            return ""
        delta = window[len(emitted) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta


class StopStringMatcher:
    """Finds the first stop string in streamed text; emits only text before it.

    ``feed`` returns ``(text, stop)``: the text safe to show now, and the stop string that
    matched (None while none has). After a match the text past it is dropped and the
    matcher ignores further input. Text that ends with the start of a stop string is held
    until it is known not to be one; ``flush`` releases it when the stream ends otherwise.
    """

    __slots__ = ("stop_strings", "_held", "_matched")

    def __init__(self, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        for text in stop_strings:
            if not isinstance(text, str) or not text:
                raise ValueError(f"each stop string must be a non-empty string, got {text!r}")
        self.stop_strings = tuple(stop_strings)
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        return self._matched

    def feed(self, text: str) -> tuple[str, str | None]:
        if self._matched is not None:
            return "", self._matched
        pending = self._held + text
        first_start, first_stop = len(pending) + 1, None
        for stop in self.stop_strings:
            start = pending.find(stop)
            if start != -1 and start < first_start:
                first_start, first_stop = start, stop
        if first_stop is not None:
            self._held = ""
            self._matched = first_stop
            return pending[:first_start], first_stop
        held_length = self._partial_match_length(pending)
        self._held = pending[len(pending) - held_length :]
        return pending[: len(pending) - held_length], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - length :]):
                    longest = length
                    break
        return longest


class TextStream:
    """Token ids in, final text out: an IncrementalDecoder feeding a StopStringMatcher."""

    __slots__ = ("_decoder", "_matcher")

    def __init__(self, tokenizer: Decoder, stop_strings: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = StopStringMatcher(stop_strings)

    @property
    def matched(self) -> str | None:
        return self._matcher.matched

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Text to emit after this token, and the stop string it completed (or None)."""
        return self._matcher.feed(self._decoder.push(token_id))

    def flush(self) -> str:
        """Everything held back, when the stream ends for another reason than a stop string."""
        if self._matcher.matched is not None:
            return ""
        text, _ = self._matcher.feed(self._decoder.flush())
        if self._matcher.matched is not None:
            return text
        return text + self._matcher.flush()
