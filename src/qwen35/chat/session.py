"""A chat with a model, apart from any terminal: history, settings, /commands, the context.

`ChatSession.answer(text)` adds a user message, renders the whole conversation with the
chat template, generates the reply and yields it as `ParsedDelta`s (reasoning, content,
tool calls) and `Notice`s; `ChatSession.command(line)` runs one `/command` and says what
to show. `LineAssembler` joins Ollama's `\"\"\"` multi-line messages. The terminal side
lives in `qwen35.chat.command`.

Decisions:
- Every turn renders the whole conversation again, as the template expects it (earlier
  assistant turns carry their reasoning as `reasoning_content`; the Qwen 3.5 template
  drops the reasoning of turns before the last user message). The system prompt is not
  part of the history: `/clear` keeps it, `/set system` changes it for the next turn.
- The context (-c) holds prompt and answer together. When a conversation outgrows it,
  the oldest turns are dropped, with a notice, until the prompt leaves room for an answer
  (a quarter of the context, or -n if smaller). A message that does not fit even alone
  is refused with `ContextFullError` and is not kept. An answer that fills the context
  stops there, with a notice.
- The cache carries over between turns (`chat.turn_cache`): after each prompt's history (up
  to the end of the new user message, the part the next turn's prompt repeats token for
  token), the session keeps a snapshot of the cache, and the next turn restores it and reads
  only what follows. A recurrent state cannot be rolled back, so a prompt that does not start
  with those exact tokens (a changed system message or setting, dropped turns, /clear) is
  read in full.
- An interrupted answer (Ctrl-C, or the caller closing the generator) stays in the
  history with what was produced so far: the user saw it, and a follow-up ("go on")
  refers to it. If nothing was produced yet, the whole exchange is dropped.
- Images (`attach_image`, `/image PATH`, or a path typed in the message when the model can
  read images; see `chat.attachments`) go with the next message and stay in it: every turn's
  prompt re-renders them, expanded into their vision features, and dropping the turn drops
  them. Counts of tokens are of the expanded prompt (an image takes hundreds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qwen35.chat.attachments import (
    ChatImage,
    encode_image,
    image_paths_in,
    message_images,
    prepare_with_images,
    user_message,
)
from qwen35.chat.parser import OutputParser, ParsedDelta, parse_output, prompt_ends_in_reasoning
from qwen35.chat.turn_cache import TurnCache
from qwen35.engine.generate import generation_steps
from qwen35.engine.sampler import InvalidSamplingError, SamplingParams
from qwen35.errors import Qwen35Error

MIN_CONTEXT = 16
MULTILINE_QUOTE = '"""'

HELP = """Available commands:
  /set think on|off       turn the model's reasoning on or off (also /set think, /set nothink)
  /set system TEXT        set the system message (empty: none); /clear keeps it
  /set temperature X      sampling temperature (0 = greedy); likewise top_k, top_p, min_p,
                          seed (-1 = random), num_predict (-1 = no limit), repeat_penalty,
                          presence_penalty, frequency_penalty, num_ctx
  /set hidethinking       hide the reasoning (/set showthinking shows it again)
  /show                   the current settings (/show system, /show parameters)
  /image PATH             attach an image to your next message (a model that reads images)
  /clear                  forget the conversation (and images not yet sent)
  /bye                    exit (also /exit, or Ctrl + d)
  /?, /help               this help

Use \"\"\" to begin and end a multi-line message. Ctrl + c stops an answer.
In a message, a path to an existing image file (starting with /, ./, ../ or ~; quoted, or with
"\\ " for spaces; ending .png .jpg .jpeg .webp .gif or .bmp) attaches the image and is taken out
of the text, when the model reads images."""

# /set NAME -> the sampling option it sets; spellings of Ollama, llama.cpp and the API.
_SAMPLING_NAMES = {
    "temperature": "temperature", "temp": "temperature",
    "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
    "repeat_penalty": "repetition_penalty", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}
_INTEGER_OPTIONS = {"top_k", "seed"}
_MAX_TOKENS_NAMES = {"num_predict", "n_predict", "max_tokens", "max_new_tokens"}
_CONTEXT_NAMES = {"num_ctx", "ctx_size", "context"}
_ON, _OFF = {"on", "true", "yes", "1"}, {"off", "false", "no", "0"}


class ContextFullError(Qwen35Error):
    """The message cannot fit the context even without the earlier turns."""


@dataclass
class ChatSettings:
    """What shapes the next turn; `sampling` overrides the model's generation defaults."""

    context_size: int
    system: str | None = None
    think: bool | None = None  # None: the template's own default (Qwen 3.5 thinks)
    hide_thinking: bool = False
    max_new_tokens: int | None = None  # None: until the context is full
    sampling: dict = field(default_factory=dict)
    template_kwargs: dict = field(default_factory=dict)


@dataclass
class Notice:
    """Something the person should be told, apart from the answer itself."""

    text: str


@dataclass
class ImageAdded(Notice):
    """An image found in a message and attached to it."""


@dataclass
class CommandResult:
    text: str = ""
    exit: bool = False


@dataclass
class TurnStats:
    """One answer's numbers; kept up to date while it streams, so an interrupted one has them too."""

    prompt_tokens: int = 0  # read this turn; the cached ones are not counted
    cached_tokens: int = 0  # restored from the previous turn's cache
    generated_tokens: int = 0
    prefill_seconds: float | None = None  # None until the prompt has been read
    decode_seconds: float = 0.0
    finish_reason: str | None = None  # "stop", "length", "context" (filled it), "interrupted"

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def answer_tokens_per_second(self) -> float:
        # The first answer token comes out of the prompt's pass; decode steps make the rest.
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def speed_line(self) -> str:
        parts = []
        if self.prefill_seconds is not None:
            cached = f" (+{self.cached_tokens} cached)" if self.cached_tokens else ""
            parts.append(f"prompt {self.prompt_tokens} tok{cached}, {self.prompt_tokens_per_second:.1f} tok/s")
            parts.append(f"answer {self.generated_tokens} tok, {self.answer_tokens_per_second:.1f} tok/s")
        if self.finish_reason == "interrupted":
            parts.append("stopped")
        return " · ".join(parts)


class LineAssembler:
    """Joins the lines of a `\"\"\"` message: a line starting with `\"\"\"` opens one, a line
    ending with `\"\"\"` closes it (text on those lines is kept); any other line is a message."""

    def __init__(self):
        self._lines: list[str] | None = None

    @property
    def pending(self) -> bool:
        return self._lines is not None

    def reset(self) -> None:
        self._lines = None

    def feed(self, line: str) -> str | None:
        """The finished message, or None while a multi-line message is still open."""
        if self._lines is None:
            if not line.startswith(MULTILINE_QUOTE):
                return line
            line = line[len(MULTILINE_QUOTE):]
            self._lines = []
            if line.endswith(MULTILINE_QUOTE):
                return self._close(line)
            self._lines.append(line)
            return None
        if line.endswith(MULTILINE_QUOTE):
            return self._close(line)
        self._lines.append(line)
        return None

    def _close(self, last_line: str) -> str:
        lines = [*self._lines, last_line[: -len(MULTILINE_QUOTE)]]
        self._lines = None
        return "\n".join(lines).strip("\n")


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def _number(text: str, integer: bool) -> int | float:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'a whole number' if integer else 'a number'}") from None


class ChatSession:
    """One conversation with a loaded model; see the module docstring for its rules."""

    def __init__(self, model, tokenizer, settings: ChatSettings, template=None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template if template is not None else tokenizer.chat_template
        self.settings = settings
        self.messages: list[dict] = []
        self.last_turn = TurnStats()
        self._turn_cache = TurnCache(model)
        self.pending_images: list[ChatImage] = []  # attached, for the next message
        self.max_context = model.config.max_position_embeddings
        settings.context_size = self._checked_context(settings.context_size)
        self.sampling_params()  # refuse bad flags before the first message

    # -- settings ---------------------------------------------------------------------

    def sampling_params(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams.from_options(self.model.generation_defaults, max_new_tokens=max_new_tokens,
                                           **self.settings.sampling)

    def _checked_context(self, size: int) -> int:
        if size == 0:
            return self.max_context
        if size < MIN_CONTEXT:
            raise Qwen35Error(
                f"the context must be at least {MIN_CONTEXT} tokens (or 0 for the model's own), got {size}"
            )
        return min(size, self.max_context)

    def template_kwargs(self) -> dict:
        kwargs = dict(self.settings.template_kwargs)
        if self.settings.think is not None:
            kwargs["enable_thinking"] = self.settings.think
        return kwargs

    # -- commands ---------------------------------------------------------------------

    def command(self, line: str) -> CommandResult:
        """Run one `/command` line."""
        name, _, rest = line.strip().partition(" ")
        name, rest = name.lower(), rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return CommandResult(exit=True)
        if name in ("/?", "/help"):
            return CommandResult(HELP)
        if name == "/clear":
            self.messages.clear()
            self._turn_cache.clear()
            unsent, self.pending_images = len(self.pending_images), []
            unsent_note = f" and {_images(unsent)} not yet sent" if unsent else ""
            return CommandResult(f"Cleared session context{unsent_note}.")
        if name == "/image":
            return CommandResult(self._attach(rest))
        if name == "/set":
            return CommandResult(self._set(rest))
        if name == "/show":
            return CommandResult(self._show(rest.lower()))
        return CommandResult(f"Unknown command '{name}'. Type /? for help")

    def attach_image(self, source, name: str | None = None) -> ChatImage:
        """Encode an image (a path, bytes, ...) for the next message; a bad one raises a one-line Qwen35Error."""
        image = encode_image(self.model, source, name)
        self.pending_images.append(image)
        return image

    def _attach(self, rest: str) -> str:
        if not rest:
            waiting = f" ({_images(len(self.pending_images))} attached for the next message)" \
                if self.pending_images else ""
            return f"Usage: /image PATH{waiting}"
        typed = rest[1:-1] if len(rest) > 1 and rest[0] == rest[-1] and rest[0] in "'\"" else rest
        if not Path(typed).expanduser().exists():
            typed = typed.replace("\\ ", " ")  # a shell-escaped path, as drag and drop types it
        try:
            image = self.attach_image(Path(typed).expanduser(), name=typed)
        except Qwen35Error as error:
            return f"Couldn't add image: {error}"
        waiting = len(self.pending_images)
        return (f"Added image '{typed}' ({image.num_tokens} tokens); it goes with your next message"
                + (f", with {waiting - 1} other{'s' if waiting > 2 else ''}." if waiting > 1 else "."))

    def _set(self, rest: str) -> str:
        key, _, value = rest.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if key == "parameter":  # Ollama's long form: /set parameter NAME VALUE
            key, _, value = value.partition(" ")
            key, value = key.lower().replace("-", "_"), value.strip()
        if key == "system":
            self.settings.system = value or None
            return "Set system message." if value else "Cleared system message."
        if key in ("think", "nothink"):
            on = key == "think"
            if value:
                if value.lower() not in _ON | _OFF:
                    return "Usage: /set think on|off"
                on = on == (value.lower() in _ON)
            self.settings.think = on
            return f"Set thinking {'on' if on else 'off'}."
        if key in ("hidethinking", "showthinking"):
            self.settings.hide_thinking = key == "hidethinking"
            return "Reasoning will be hidden." if self.settings.hide_thinking else "Reasoning will be shown."
        if not key:
            return "Usage: /set NAME VALUE (see /? for the names)"
        if not value:
            return f"Usage: /set {key} VALUE"
        try:
            return self._set_number(key, value)
        except (ValueError, InvalidSamplingError, Qwen35Error) as error:
            return f"Couldn't set '{key}': {error}"

    def _set_number(self, key: str, value: str) -> str:
        if key in _MAX_TOKENS_NAMES:
            count = _number(value, integer=True)
            if count == 0 or count < -1:
                raise ValueError("use a number of tokens >= 1, or -1 for no limit")
            self.settings.max_new_tokens = None if count == -1 else count
        elif key in _CONTEXT_NAMES:
            self.settings.context_size = self._checked_context(_number(value, integer=True))
        elif key in _SAMPLING_NAMES:
            option = _SAMPLING_NAMES[key]
            number = _number(value, integer=option in _INTEGER_OPTIONS)
            if option == "seed" and number == -1:
                number = None  # llama.cpp's -1: a fresh random seed each answer
            trial = {**self.settings.sampling, option: number}
            SamplingParams.from_options(self.model.generation_defaults, **trial)  # validates
            self.settings.sampling = trial
        else:
            return f"Unknown parameter '{key}'. Type /? for help"
        return f"Set parameter '{key}' to '{value}'"

    def _show(self, what: str) -> str:
        system = self.settings.system
        if what == "system":
            return system if system else "No system message was specified."
        params = self.sampling_params()
        lines = [
            f"context {self.settings.context_size} tokens"
            f", answers up to {self.settings.max_new_tokens or 'the end of the context'}"
            + (" tokens" if self.settings.max_new_tokens else ""),
            f"temperature {params.temperature:g}, top_k {params.top_k}, top_p {params.top_p:g}, "
            f"min_p {params.min_p:g}, repeat_penalty {params.repetition_penalty:g}, "
            f"seed {'random' if params.seed is None else params.seed}",
        ]
        if what == "parameters":
            return "\n".join(lines)
        think = {None: "template default", True: "on", False: "off"}[self.settings.think]
        lines.append(f"thinking {think}{', hidden' if self.settings.hide_thinking else ''}")
        if self.settings.template_kwargs:
            lines.append(f"template options {json.dumps(self.settings.template_kwargs)}")
        lines.append(f"system message: {system!r}" if system else "no system message")
        turns = sum(message["role"] == "user" for message in self.messages)
        images = len(message_images(self.messages))
        lines.append(f"{turns} turn{'' if turns == 1 else 's'} in the history"
                     + (f", with {_images(images)}" if images else ""))
        if self.pending_images:
            lines.append(f"{_images(len(self.pending_images))} attached for the next message")
        return "\n".join(lines)

    # -- answering --------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return self.template.render(system + messages, add_generation_prompt=add_generation_prompt,
                                    **self.template_kwargs())

    def answer(self, text: str) -> Iterator[ParsedDelta | Notice]:
        """Add `text` as the user's message, with the attached images and those it names, and stream
        the reply; the reply joins the history when the generator ends, however it ends (see the
        module docstring)."""
        self.last_turn = turn = TurnStats()
        images, found = list(self.pending_images), []
        if self.model.vision is not None:
            text, paths = image_paths_in(text)
            found = [encode_image(self.model, path, name=typed) for typed, path in paths]
        self.messages.append(user_message(text, images + found))
        try:
            prompt, prompt_ids, kept = self._fit_prompt(self.messages)
            prepared = self._prepare(prompt_ids, kept)
        except BaseException:
            self.messages.pop()
            raise
        self.pending_images.clear()
        dropped = sum(m["role"] == "user" for m in self.messages) - sum(m["role"] == "user" for m in kept)
        self.messages[:] = kept
        length = len(prepared) if prepared is not None else len(prompt_ids)
        room = self.settings.context_size - length
        limit = min(room, self.settings.max_new_tokens or room)
        thinking = prompt_ends_in_reasoning(prompt)
        parser = OutputParser(thinking=thinking)
        produced: list[str] = []
        turn.prompt_tokens = length
        try:
            for image in found:
                yield ImageAdded(f"Added image '{image.name}'.")
            if dropped:
                yield Notice(f"The conversation outgrew the context of {self.settings.context_size} tokens: "
                             f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}.")
            started = time.perf_counter()
            history = self._history_length(prompt_ids, kept)
            key = prompt_ids if prepared is None else prepared.cache_key
            prompt_ids = prompt_ids if prepared is None else prepared.token_ids
            cache, turn.cached_tokens = self._turn_cache.cache_for(prompt_ids, key, history, prepared)
            history_seconds = time.perf_counter() - started
            turn.prompt_tokens = length - turn.cached_tokens
            steps = generation_steps(self.model, prompt_ids, self.sampling_params(limit), tokenizer=self.tokenizer,
                                     cache=cache)
            for step in steps:
                turn.generated_tokens = step.generated_tokens
                turn.prefill_seconds = history_seconds + step.prefill_seconds
                turn.decode_seconds = step.decode_seconds
                turn.finish_reason = step.finish_reason
                if step.text:
                    produced.append(step.text)
                    delta = parser.feed(step.text)
                    if delta:
                        yield delta
            delta = parser.finish()
            if delta:
                yield delta
            if turn.finish_reason == "length" and limit == room:
                turn.finish_reason = "context"
                yield Notice(f"The answer filled the context of {self.settings.context_size} tokens; "
                             "the oldest turns will be dropped to make room (or /clear to start over).")
        finally:
            if turn.finish_reason is None:
                turn.finish_reason = "interrupted"
            self._keep_reply("".join(produced), thinking)

    def _prepare(self, prompt_ids: list[int], messages: list[dict]):
        """The prompt with its images' placeholders expanded into their features; None without images."""
        images = message_images(messages)
        return prepare_with_images(self.model, prompt_ids, images) if images else None

    def _history_length(self, prompt_ids: list[int], messages: list[dict]) -> int | None:
        """How many of the prompt's first tokens (images expanded) the next turn's prompt will repeat: the
        history as it renders it, this turn's messages without the answer's opening (None: not a prefix)."""
        history_ids = self.tokenizer.encode(self.render(messages, add_generation_prompt=False))
        if prompt_ids[:len(history_ids)] != history_ids:
            return None
        return self._expanded_length(history_ids, messages)

    def _expanded_length(self, rendered_ids: list[int], messages: list[dict]) -> int:
        """How long `rendered_ids` (a prefix of this prompt) are once their image placeholders are expanded."""
        placeholders = rendered_ids.count(self.model.image_token_id) if self.model.image_token_id is not None else 0
        images = message_images(messages)[:placeholders]
        return len(rendered_ids) + sum(image.num_tokens - 1 for image in images)

    def _keep_reply(self, text: str, thinking: bool) -> None:
        if not text and self.last_turn.finish_reason == "interrupted":
            self.messages.pop()  # nothing to show for it: as if it was never asked
            return
        parsed = parse_output(text, thinking=thinking)
        message = {"role": "assistant", "content": parsed["content"]}
        if parsed["reasoning_content"]:
            message["reasoning_content"] = parsed["reasoning_content"]
        if parsed["tool_calls"]:
            message["tool_calls"] = [{"type": "function", "function": call} for call in parsed["tool_calls"]]
        self.messages.append(message)

    def _fit_prompt(self, messages: list[dict]) -> tuple[str, list[int], list[dict]]:
        """The rendered prompt, its token ids and the messages it holds: the latest ones, without as many of
        the oldest turns as it takes to leave room for an answer (measured with the images expanded)."""
        context = self.settings.context_size
        wanted_room = max(1, min(self.settings.max_new_tokens or context, context // 4))
        while True:
            prompt = self.render(messages)
            prompt_ids = self.tokenizer.encode(prompt)
            length = self._expanded_length(prompt_ids, messages)
            turn_starts = [index for index, message in enumerate(messages) if message["role"] == "user"]
            if length + wanted_room <= context or len(turn_starts) < 2:
                break
            messages = messages[turn_starts[1]:]
        if length >= context:
            raise ContextFullError(
                f"this message needs {length} tokens with the chat markup and the context holds {context}: "
                "shorten it, or start with a larger -c"
            )
        return prompt, prompt_ids, messages
