"""A thinking budget: at most N reasoning tokens, then the reasoning is closed for the model.

As llama.cpp's `--reasoning-budget N`, Qwen's `thinking_budget` and Anthropic's
`thinking.budget_tokens`: a reply that starts inside `<think>` may write N tokens of reasoning.
If it has not closed the reasoning by then, the next tokens are forced, one per step (a mask
that allows exactly one token), to the end sequence, and the model answers from there.

Decisions:
- The end sequence is `REASONING_END` = "\\n</think>\\n\\n": the closing tag in the shape the chat
  template renders a finished thought in (reasoning, newline, `</think>`, blank line, answer), so
  the model continues from a prompt shape it was trained on. Qwen's docs also put a sentence
  before the tag ("Considering the limited time by the user, ..."); `end_text=` takes that text
  where wanted (`QWEN_BUDGET_MESSAGE`), but by default only the tag is inserted, as llama.cpp's
  newer builds do, so no words the model did not write appear in its reasoning.
- The budget counts generated reasoning tokens, not the `<think>\\n` the prompt ends with; the
  forced tokens are not counted against it (they are the model's output, though, and count
  against max_tokens like any other).
- Another constraint (a JSON grammar, which waits for `</think>` itself) goes inside: it sees
  every token, forced ones included, and decides the mask whenever the budget does not force.
- A budget of 0 is "no thinking"; callers render the prompt with thinking off instead (the
  same tokens `enable_thinking: false` gives), since forcing the end after `<think>\\n` would
  give a slightly different token sequence from the one the template writes.
"""

from __future__ import annotations

import torch

from qwen35.errors import Qwen35Error

__all__ = ["QWEN_BUDGET_MESSAGE", "REASONING_END", "ReasoningBudget", "budget_constraint", "check_budget"]

REASONING_END = "\n</think>\n\n"
QWEN_BUDGET_MESSAGE = ("\n\nConsidering the limited time by the user, I have to give the solution based on the "
                       "thinking directly now.\n</think>\n\n")


def check_budget(value, where: str = "reasoning budget") -> int:
    """A budget as a whole number: -1 for unlimited, 0 for no thinking, N > 0 for at most N tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise Qwen35Error(f"the {where} must be a whole number, -1 (unlimited), 0 (no thinking) or more, "
                          f"got {value!r}")
    return value


class ReasoningBudget:
    """The engine's TokenConstraint for a reply that starts inside `<think>` (see the module docstring)."""

    def __init__(self, budget: int, end_ids: list[int], think_end_id: int, vocab_size: int, inner=None):
        if budget < 1:
            raise Qwen35Error(f"a reasoning budget constraint needs a budget of at least 1 token, got {budget}")
        if think_end_id not in end_ids:
            raise Qwen35Error("the reasoning's end sequence must contain the </think> token")
        if any(not 0 <= token_id < vocab_size for token_id in end_ids):
            raise Qwen35Error("the reasoning's end sequence holds token ids outside the vocabulary")
        self.budget = budget
        self.end_ids = list(end_ids)
        self.think_end_id = think_end_id
        self.inner = inner
        self._vocab_size = vocab_size
        self.reasoning_tokens = 0
        self._forced = 0  # how many of end_ids have been forced so far
        self._reasoning = True  # still inside <think>, by the model's choice

    @property
    def forcing(self) -> bool:
        """Whether the next token is forced (the budget is spent and the end sequence is not yet out)."""
        return self._reasoning and self.reasoning_tokens >= self.budget and self._forced < len(self.end_ids)

    def prepare(self) -> None:
        """What the inner constraint builds ahead of decoding (the server calls this off its event loop)."""
        prepare = getattr(self.inner, "prepare", None)
        if prepare is not None:
            prepare()

    def allowed(self) -> torch.Tensor | None:
        if self.forcing:
            mask = torch.zeros(self._vocab_size, dtype=torch.bool)
            mask[self.end_ids[self._forced]] = True
            return mask
        return self.inner.allowed() if self.inner is not None else None

    def advance(self, token_id: int) -> None:
        if self.forcing:
            self._forced += 1
            if self._forced == len(self.end_ids):
                self._reasoning = False
        elif self._reasoning:
            if token_id == self.think_end_id:
                self._reasoning = False
            else:
                self.reasoning_tokens += 1
        if self.inner is not None:
            self.inner.advance(token_id)

    @property
    def complete(self) -> bool:
        return self.inner is not None and not self.forcing and self.inner.complete


def budget_constraint(tokenizer, vocab_size: int, budget: int, inner=None, end_text: str = REASONING_END):
    """The constraint for a reply that starts inside `<think>` under `budget` (-1: unlimited, the
    inner constraint alone; N > 0: a ReasoningBudget around it). Budget 0 is the prompt's business
    (render it with thinking off): asking for it here is an error."""
    budget = check_budget(budget)
    if budget == -1:
        return inner
    if budget == 0:
        raise Qwen35Error("a reasoning budget of 0 means no thinking: render the prompt with thinking off")
    if tokenizer.think_end_id is None:
        raise Qwen35Error("this model's tokenizer has no </think> token, so a reasoning budget cannot apply")
    end_ids = tokenizer.encode(end_text)
    return ReasoningBudget(budget, end_ids, tokenizer.think_end_id, vocab_size, inner)
