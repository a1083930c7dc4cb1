"""The chat's `/commands` (Ollama's set, with llama.cpp's and the API's option names) and the
triple-quoted multi-line messages, apart from the session they change (`run_command(session, line)`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qwen35.chat.attachments import message_images
from qwen35.engine.reasoning_budget import check_budget
from qwen35.engine.sampler import InvalidSamplingError, SamplingParams
from qwen35.errors import Qwen35Error

MULTILINE_QUOTE = '"""'

HELP = """Available commands:
  /set think on|off       turn the model's reasoning on or off (also /set think, /set nothink)
  /set system TEXT        set the system message (empty: none); /clear keeps it
  /set temperature X      sampling temperature (0 = greedy); likewise top_k, top_p, min_p,
                          seed (-1 = random), num_predict (-1 = no limit), repeat_penalty,
                          presence_penalty, frequency_penalty, num_ctx
  /set hidethinking       hide the reasoning (/set showthinking shows it again)
  /set reasoning_budget N at most N reasoning tokens, then </think> (-1 = unlimited, 0 = no thinking)
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


@dataclass
class CommandResult:
    text: str = ""
    exit: bool = False


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


def run_command(session, line: str) -> CommandResult:
    """Run one `/command` line of `session` (a ChatSession)."""
    name, _, rest = line.strip().partition(" ")
    name, rest = name.lower(), rest.strip()
    if name in ("/bye", "/exit", "/quit"):
        return CommandResult(exit=True)
    if name in ("/?", "/help"):
        return CommandResult(HELP)
    if name == "/clear":
        unsent = session.clear()
        unsent_note = f" and {_images(unsent)} not yet sent" if unsent else ""
        return CommandResult(f"Cleared session context{unsent_note}.")
    if name == "/image":
        return CommandResult(_attach(session, rest))
    if name == "/set":
        return CommandResult(_set(session, rest))
    if name == "/show":
        return CommandResult(_show(session, rest.lower()))
    return CommandResult(f"Unknown command '{name}'. Type /? for help")

def _attach(session, rest: str) -> str:
    if not rest:
        waiting = f" ({_images(len(session.pending_images))} attached for the next message)" \
            if session.pending_images else ""
        return f"Usage: /image PATH{waiting}"
    typed = rest[1:-1] if len(rest) > 1 and rest[0] == rest[-1] and rest[0] in "'\"" else rest
    if not Path(typed).expanduser().exists():
        typed = typed.replace("\\ ", " ")  # a shell-escaped path, as drag and drop types it
    try:
        image = session.attach_image(Path(typed).expanduser(), name=typed)
    except Qwen35Error as error:
        return f"Couldn't add image: {error}"
    waiting = len(session.pending_images)
    return (f"Added image '{typed}' ({image.num_tokens} tokens); it goes with your next message"
            + (f", with {waiting - 1} other{'s' if waiting > 2 else ''}." if waiting > 1 else "."))

def _set(session, rest: str) -> str:
    key, _, value = rest.partition(" ")
    key, value = key.lower().replace("-", "_"), value.strip()
    if key == "parameter":  # Ollama's long form: /set parameter NAME VALUE
        key, _, value = value.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
    if key == "system":
        session.settings.system = value or None
        return "Set system message." if value else "Cleared system message."
    if key in ("think", "nothink"):
        on = key == "think"
        if value:
            if value.lower() not in _ON | _OFF:
                return "Usage: /set think on|off"
            on = on == (value.lower() in _ON)
        session.settings.think = on
        return f"Set thinking {'on' if on else 'off'}."
    if key in ("hidethinking", "showthinking"):
        session.settings.hide_thinking = key == "hidethinking"
        return "Reasoning will be hidden." if session.settings.hide_thinking else "Reasoning will be shown."
    if not key:
        return "Usage: /set NAME VALUE (see /? for the names)"
    if not value:
        return f"Usage: /set {key} VALUE"
    try:
        return _set_number(session, key, value)
    except (ValueError, InvalidSamplingError, Qwen35Error) as error:
        return f"Couldn't set '{key}': {error}"

def _set_number(session, key: str, value: str) -> str:
    if key in _MAX_TOKENS_NAMES:
        count = _number(value, integer=True)
        if count == 0 or count < -1:
            raise ValueError("use a number of tokens >= 1, or -1 for no limit")
        session.settings.max_new_tokens = None if count == -1 else count
    elif key in ("reasoning_budget", "thinking_budget"):
        session.settings.reasoning_budget = check_budget(_number(value, integer=True), "reasoning budget")
    elif key in _CONTEXT_NAMES:
        session.settings.context_size = session.checked_context(_number(value, integer=True))
    elif key in _SAMPLING_NAMES:
        option = _SAMPLING_NAMES[key]
        number = _number(value, integer=option in _INTEGER_OPTIONS)
        if option == "seed" and number == -1:
            number = None  # llama.cpp's -1: a fresh random seed each answer
        trial = {**session.settings.sampling, option: number}
        SamplingParams.from_options(session.model.generation_defaults, **trial)  # validates
        session.settings.sampling = trial
    else:
        return f"Unknown parameter '{key}'. Type /? for help"
    return f"Set parameter '{key}' to '{value}'"

def _show(session, what: str) -> str:
    system = session.settings.system
    if what == "system":
        return system if system else "No system message was specified."
    params = session.sampling_params()
    lines = [
        f"context {session.settings.context_size} tokens"
        f", answers up to {session.settings.max_new_tokens or 'the end of the context'}"
        + (" tokens" if session.settings.max_new_tokens else ""),
        f"temperature {params.temperature:g}, top_k {params.top_k}, top_p {params.top_p:g}, "
        f"min_p {params.min_p:g}, repeat_penalty {params.repetition_penalty:g}, "
        f"seed {'random' if params.seed is None else params.seed}",
    ]
    if what == "parameters":
        return "\n".join(lines)
    think = {None: "template default", True: "on", False: "off"}[session.settings.think]
    budget = session.settings.reasoning_budget
    budget_note = f", at most {budget} tokens" if budget > 0 else (", budget 0 (off)" if budget == 0 else "")
    lines.append(f"thinking {think}{budget_note}{', hidden' if session.settings.hide_thinking else ''}")
    if session.settings.template_kwargs:
        lines.append(f"template options {json.dumps(session.settings.template_kwargs)}")
    lines.append(f"system message: {system!r}" if system else "no system message")
    turns = sum(message["role"] == "user" for message in session.messages)
    images = len(message_images(session.messages))
    lines.append(f"{turns} turn{'' if turns == 1 else 's'} in the history"
                 + (f", with {_images(images)}" if images else ""))
    if session.pending_images:
        lines.append(f"{_images(len(session.pending_images))} attached for the next message")
    return "\n".join(lines)
