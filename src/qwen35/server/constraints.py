"""Constrained decoding: a token mask from a byte grammar (JSON mode, JSON schema, forced tool call).

Each step the engine asks which tokens may come next. The answer walks a trie of the vocabulary's
byte strings with the grammar's parse positions, pruning a branch as soon as no position survives
its bytes; answers are cached per parse position, so a long string value costs one walk, not one
per token. With thinking on, the reasoning is free and the grammar starts after `</think>`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

from qwen35.server import grammar
from qwen35.server.errors import APIError

_MASK_CACHE_BYTES = 64 << 20


class TokenTrie:
    """The vocabulary's byte strings as a trie: node = (children by byte, token ids ending here)."""

    def __init__(self, tokenizer, vocab_size: int, excluded: set[int]):
        self.vocab_size = vocab_size
        self.root: tuple[dict, list] = ({}, [])
        self.tokens: list[tuple[int, bytes]] = []
        self._splits: dict[frozenset, tuple[torch.Tensor, list[tuple[int, bytes]]]] = {}
        for token_id in range(vocab_size):
            if token_id in excluded or tokenizer.is_special(token_id):
                continue
            data = tokenizer.token_bytes(token_id)
            if not data:
                continue
            self.tokens.append((token_id, data))
            node = self.root
            for byte in data:
                node = node[0].setdefault(byte, ({}, []))
            node[1].append(token_id)

    def split(self, unsafe: frozenset) -> tuple[torch.Tensor, list[tuple[int, bytes]]]:
        """Tokens free of `unsafe` bytes (a mask) and the others (to check one by one)."""
        if unsafe not in self._splits:
            pattern = bytes(sorted(unsafe))
            plain = torch.zeros(self.vocab_size, dtype=torch.bool)
            others = []
            for token_id, data in self.tokens:
                if data.translate(None, pattern) == data:
                    plain[token_id] = True
                else:
                    others.append((token_id, data))
            self._splits[unsafe] = (plain, others)
        return self._splits[unsafe]


_tries: dict[tuple[int, bool], TokenTrie] = {}
_tries_lock = threading.Lock()


def token_trie(tokenizer, vocab_size: int, tool_tokens: bool) -> TokenTrie:
    """One trie per tokenizer; control tokens left out (the tool-call tags only in tool grammars)."""
    key = (id(tokenizer), tool_tokens)
    with _tries_lock:
        if key not in _tries:
            control = {tokenizer.think_start_id, tokenizer.think_end_id, *tokenizer.eos_token_ids}
            if not tool_tokens:
                control |= {tokenizer.tool_call_start_id, tokenizer.tool_call_end_id}
            _tries[key] = TokenTrie(tokenizer, vocab_size, {i for i in control if i is not None})
        return _tries[key]


class CompiledGrammar:
    """A grammar bound to a vocabulary, with its masks cached by parse position."""

    def __init__(self, node, tokenizer, vocab_size: int, tool_tokens: bool):
        self.node = node
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._tool_tokens = tool_tokens
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._max_masks = max(16, _MASK_CACHE_BYTES // max(vocab_size, 1))

    def mask(self, stacks: list[tuple]) -> torch.Tensor:
        key = tuple(stacks)
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
            return cached
        unsafe = grammar.invariant_unsafe_bytes(stacks)
        allowed = self.mask_by_trie(stacks) if unsafe is None else self.mask_in_free_text(stacks, unsafe)
        self._masks[key] = allowed
        if len(self._masks) > self._max_masks:
            self._masks.popitem(last=False)
        return allowed


    def mask_by_trie(self, stacks: list[tuple]) -> torch.Tensor:
        """Walk the vocabulary's trie, pruning every branch whose bytes no position accepts."""
        trie = token_trie(self._tokenizer, self._vocab_size, self._tool_tokens)
        ids: list[int] = []

        def walk(node, positions):
            for byte, child in node[0].items():
                following = grammar.advance(positions, byte)
                if following:
                    ids.extend(child[1])
                    if child[0]:
                        walk(child, following)

        walk(trie.root, stacks)
        allowed = torch.zeros(self._vocab_size, dtype=torch.bool)
        allowed[ids] = True
        return allowed

    def mask_in_free_text(self, stacks: list[tuple], unsafe: frozenset) -> torch.Tensor:
        """Inside a string or raw value nearly every token fits, and those without an `unsafe` byte fit
        without checking: only the rest are run through the grammar (a trie walk would visit them all)."""
        trie = token_trie(self._tokenizer, self._vocab_size, self._tool_tokens)
        plain, others = trie.split(unsafe)
        allowed = plain.clone()
        for token_id, data in others:
            positions = stacks
            for byte in data:
                positions = grammar.advance(positions, byte)
                if not positions:
                    break
            else:
                allowed[token_id] = True
        return allowed


class GrammarConstraint:
    """One request's position in a grammar (the engine's TokenConstraint)."""

    def __init__(self, compiled: CompiledGrammar, tokenizer, eos_ids, wait_for_think_end: bool):
        self._compiled = compiled
        self._tokenizer = tokenizer
        self._eos_ids = [i for i in eos_ids if i < compiled._vocab_size]
        self._think_end_id = tokenizer.think_end_id if wait_for_think_end else None
        self._stacks = grammar.start(compiled.node)

    def prepare(self) -> None:
        """Build what the first mask needs (the vocabulary trie) ahead of decoding."""
        token_trie(self._tokenizer, self._compiled._vocab_size, self._compiled._tool_tokens)

    def allowed(self) -> torch.Tensor | None:
        if self._think_end_id is not None:
            return None
        mask = self._compiled.mask(self._stacks)
        if grammar.can_end(self._stacks):
            mask = mask.clone()
            mask[self._eos_ids] = True
        if not mask.any():  # cannot happen with a consistent grammar; never leave the sampler nothing
            mask = mask.clone()
            mask[self._eos_ids] = True
        return mask

    def advance(self, token_id: int) -> None:
        if self._think_end_id is not None:
            if token_id == self._think_end_id:
                self._think_end_id = None
            return
        if token_id in self._eos_ids:
            return
        for byte in self._tokenizer.token_bytes(token_id):
            self._stacks = grammar.advance(self._stacks, byte)

    @property
    def complete(self) -> bool:
        return self._think_end_id is None and grammar.done(self._stacks)


_compiled: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
_compiled_lock = threading.Lock()


def _compiled_grammar(key: str, build, tokenizer, vocab_size: int, tool_tokens: bool) -> CompiledGrammar:
    cache_key = (key, id(tokenizer), vocab_size, tool_tokens)
    with _compiled_lock:
        found = _compiled.get(cache_key)
        if found is not None:
            _compiled.move_to_end(cache_key)
            return found
    try:
        node = build()
    except grammar.SchemaError as error:
        raise APIError(400, f"The JSON schema cannot be used: {error}.", param="response_format") from None
    compiled = CompiledGrammar(node, tokenizer, vocab_size, tool_tokens)
    with _compiled_lock:
        _compiled[cache_key] = compiled
        while len(_compiled) > 32:
            _compiled.popitem(last=False)
    return compiled


def json_constraint(tokenizer, vocab_size: int, schema: dict | None, thinking: bool) -> GrammarConstraint:
    """JSON output: any object (schema None) or one that follows `schema`."""
    key = "json_object" if schema is None else "schema:" + json.dumps(schema, sort_keys=True)
    compiled = _compiled_grammar(
        key, lambda: grammar.compile_schema(schema) if schema is not None else
        ("object", (), grammar.ANY), tokenizer, vocab_size, tool_tokens=False)
    return GrammarConstraint(compiled, tokenizer, tokenizer.eos_token_ids, thinking)


def tool_call_constraint(tokenizer, vocab_size: int, tools: list[dict], name: str | None,
                         thinking: bool) -> GrammarConstraint:
    """A reply that is exactly one tool call: of `name`, or of any tool when name is None."""
    key = "tool:" + json.dumps([tools, name], sort_keys=True)
    compiled = _compiled_grammar(key, lambda: grammar.tool_call_grammar(tools, name), tokenizer, vocab_size,
                                 tool_tokens=True)
    return GrammarConstraint(compiled, tokenizer, tokenizer.eos_token_ids, thinking)


def constraint_for_chat(tokenizer, vocab_size: int, response_format, tools, forced_function: str | None,
                        thinking: bool):
    """The constraint an OpenAI chat request asks for, or None."""
    if forced_function is not None:
        return tool_call_constraint(tokenizer, vocab_size, tools, forced_function or None, thinking)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_constraint(tokenizer, vocab_size, None, thinking)
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema.", param="response_format")
    return json_constraint(tokenizer, vocab_size, spec.json_schema, thinking)


def constraint_for_ollama(tokenizer, vocab_size: int, output_format, thinking: bool):
    """Ollama's `format`: "json" for any JSON object, or a JSON schema."""
    if not output_format:
        return None
    return json_constraint(tokenizer, vocab_size, None if output_format == "json" else output_format, thinking)
