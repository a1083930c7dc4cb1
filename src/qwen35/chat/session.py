"""A chat with a model, apart from any terminal: history, settings, /commands, the context.

`ChatSession.answer(text)` adds a user message, renders the whole conversation with the
chat template, generates the reply and yields it as `ParsedDelta`s (reasoning, content,
tool calls) and `Notice`s; `ChatSession.command(line)` runs one `/command` and says what
to show (`chat.slash_commands`, which also joins Ollama's multi-line messages). The terminal side
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

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from qwen35.chat.attachments import (
    ChatImage,
    encode_image,
    image_paths_in,
    message_images,
    prepare_with_images,
    user_message,
)
from qwen35.chat.parser import OutputParser, ParsedDelta, parse_output, prompt_ends_in_reasoning
from qwen35.chat.slash_commands import CommandResult, run_command
from qwen35.chat.turn_cache import TurnCache
from qwen35.engine.generate import generation_steps
from qwen35.engine.reasoning_budget import budget_constraint, check_budget
from qwen35.engine.sampler import SamplingParams
from qwen35.errors import Qwen35Error

MIN_CONTEXT = 16

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
    reasoning_budget: int = -1  # reasoning tokens per answer: -1 unlimited, 0 no thinking (engine.reasoning_budget)
    speculation: object | None = None  # engine.speculative.Speculation: guesses checked a step at a time


@dataclass
class Notice:
    """Something the person should be told, apart from the answer itself."""

    text: str


@dataclass
class ImageAdded(Notice):
    """An image found in a message and attached to it."""


@dataclass
class TurnStats:
    """One answer's numbers; kept up to date while it streams, so an interrupted one has them too."""

    prompt_tokens: int = 0  # read this turn; the cached ones are not counted
    cached_tokens: int = 0  # restored from the previous turn's cache
    generated_tokens: int = 0
    prefill_seconds: float | None = None  # None until the prompt has been read
    decode_seconds: float = 0.0
    finish_reason: str | None = None  # "stop", "length", "context" (filled it), "interrupted"
    draft_tokens: int = 0  # speculative decoding: guesses checked
    accepted_tokens: int = 0  # ... and kept

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
        if self.draft_tokens:
            parts.append(f"{self.accepted_tokens}/{self.draft_tokens} guesses kept")
        if self.finish_reason == "interrupted":
            parts.append("stopped")
        return " · ".join(parts)


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
        settings.context_size = self.checked_context(settings.context_size)
        check_budget(settings.reasoning_budget, "--reasoning-budget")
        self.sampling_params()  # refuse bad flags before the first message

    # -- settings ---------------------------------------------------------------------

    def sampling_params(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams.from_options(self.model.generation_defaults, max_new_tokens=max_new_tokens,
                                           **self.settings.sampling)

    def checked_context(self, size: int) -> int:
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
        if self.settings.reasoning_budget == 0:  # as llama.cpp's --reasoning-budget 0: no thinking at all
            kwargs["enable_thinking"] = False
        return kwargs

    # -- commands ---------------------------------------------------------------------

    def command(self, line: str) -> CommandResult:
        """Run one `/command` line."""
        return run_command(self, line)

    def clear(self) -> int:
        """Forget the conversation and the images not yet sent (how many there were)."""
        self.messages.clear()
        self._turn_cache.clear()
        unsent, self.pending_images = len(self.pending_images), []
        return unsent

    def attach_image(self, source, name: str | None = None) -> ChatImage:
        """Encode an image (a path, bytes, ...) for the next message; a bad one raises a one-line Qwen35Error."""
        image = encode_image(self.model, source, name)
        self.pending_images.append(image)
        return image

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
            cache, turn.cached_tokens, drafter = self._turn_cache.cache_for(prompt_ids, key, history, prepared,
                                                                             self.settings.speculation)
            history_seconds = time.perf_counter() - started
            turn.prompt_tokens = length - turn.cached_tokens
            budget = self.settings.reasoning_budget if thinking else -1
            constraint = budget_constraint(self.tokenizer, self.model.config.vocab_size, budget) if budget > 0 else None
            steps = generation_steps(self.model, prompt_ids, self.sampling_params(limit), tokenizer=self.tokenizer,
                                     cache=cache, constraint=constraint, speculation=self.settings.speculation,
                                     drafter=drafter)
            for step in steps:
                turn.generated_tokens = step.generated_tokens
                turn.draft_tokens, turn.accepted_tokens = step.draft_tokens, step.accepted_tokens
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
