"""The byte grammars behind constrained decoding, judged by Python's `json` and by pydantic:
what the grammar finishes must parse (and validate), and what they produce must be accepted."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError

from qwen35.server import grammar

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) |
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)


def feed(node, text: str):
    positions = grammar.start(node)
    for byte in text.encode():
        positions = grammar.advance(positions, byte)
        if not positions:
            return None
    return positions


def accepts(node, text: str) -> bool:
    positions = feed(node, text)
    return positions is not None and grammar.can_end(positions)


@settings(max_examples=150, deadline=None)
@given(json_values, st.booleans())
def test_any_json_text_json_writes_is_accepted(value, pretty):
    text = json.dumps(value, indent=1 if pretty else None, ensure_ascii=False)
    assert accepts(grammar.ANY, text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.eE+-tfnrulsa \\', max_size=14))
def test_what_the_grammar_completes_is_json(text):
    if accepts(grammar.ANY, text):
        json.loads(text)  # raises if the grammar let through something that is not JSON


class Address(BaseModel):
    street: str
    number: int


class Person(BaseModel):
    name: str
    age: int = Field(ge=0)
    height: float
    kind: Literal["human", "robot"]
    nickname: str | None = None
    tags: list[str]
    address: Address


PERSON = Person(name="Ada \"A\" L.", age=36, height=1.65, kind="human", tags=["math", "é"],
                address=Address(street="St James's Square", number=12))


def test_schema_grammar_accepts_what_pydantic_writes_and_rejects_other_shapes():
    node = grammar.compile_schema(Person.model_json_schema())
    assert accepts(node, PERSON.model_dump_json())
    assert accepts(node, json.dumps(PERSON.model_dump(), indent=2))
    wrong = PERSON.model_dump()
    for key, value in [("age", "36"), ("kind", "alien"), ("tags", "math"), ("address", {"street": "x"})]:
        text = json.dumps({**wrong, key: value})
        assert not accepts(node, text)
        with pytest.raises(ValidationError):
            Person.model_validate_json(text, strict=True)
    missing = {key: value for key, value in PERSON.model_dump().items() if key != "name"}
    assert not accepts(node, json.dumps(missing))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.-abcdefghijklmnopqrstuvwxyz "', max_size=40))
def test_what_the_schema_grammar_completes_validates(suffix):
    node = grammar.compile_schema(Address.model_json_schema())
    text = '{"street": ' + suffix
    if accepts(node, text):
        Address.model_validate_json(text, strict=True)


def test_tool_call_grammar_matches_the_template_layout():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}}]
    node = grammar.tool_call_grammar(tools, "get_weather")
    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n{}</function>\n</tool_call>"
    assert accepts(node, call.format(""))
    assert accepts(node, call.format("<parameter=days>\n3\n</parameter>\n"))
    assert not accepts(node, call.format("<parameter=days>\nthree\n</parameter>\n"))
    assert not accepts(node, "<tool_call>\n<function=get_weather>\n</function>\n</tool_call>")
    with pytest.raises(grammar.SchemaError):
        grammar.tool_call_grammar(tools, "other")
    # Strings are written bare by the template, enums of strings too; other values as JSON.
    tools[0]["function"]["parameters"]["properties"]["city"] = {"enum": ["Paris", "Rome"]}
    node = grammar.tool_call_grammar(tools, None)
    assert accepts(node, call.format(""))
    assert not accepts(node, call.format("").replace("Paris", '"Paris"'))
    assert not accepts(node, call.format("").replace("Paris", "Lyon"))


@pytest.mark.parametrize("schema", [{"type": "wat"}, {"$ref": "http://x"}, {"enum": []},
                                    {"type": "object", "properties": {}, "required": ["a"]}, [1]])
def test_unusable_schemas_are_refused_with_a_reason(schema):
    with pytest.raises(grammar.SchemaError):
        grammar.compile_schema(schema)


def test_free_text_shortcut_gives_the_trie_walks_mask(fixtures):
    from qwen35 import load_tokenizer
    from qwen35.server.constraints import CompiledGrammar

    tokenizer = load_tokenizer(fixtures / "tiny" / "dense-hf")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
    cases = [(grammar.compile_schema({"type": "object", "properties": {"a": {"type": "string"}}}), '{"a": "ab'),
             (grammar.ANY, '["x\\u00e'), (grammar.tool_call_grammar(tools, "f"),
                                          "<tool_call>\n<function=f>\n<parameter=text>\nhello")]
    for node, prefix in cases:
        compiled = CompiledGrammar(node, tokenizer, tokenizer.vocab_size, tool_tokens=True)
        positions = feed(node, prefix)
        if prefix.endswith("e"):  # inside a \u escape: not free text, the trie walk decides
            assert grammar.invariant_unsafe_bytes(positions) is None
            continue
        unsafe = grammar.invariant_unsafe_bytes(positions)
        assert unsafe is not None
        fast = compiled.mask_in_free_text(positions, unsafe)
        assert torch.equal(fast, compiled.mask_by_trie(positions))
        assert 0 < int(fast.sum()) < tokenizer.vocab_size
