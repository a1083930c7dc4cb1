"""Output parsing: reasoning, content and Qwen XML tool calls, whole or piece by piece."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen35
from qwen35.chat.arguments import convert_value
from qwen35.chat.parser import OutputParser, prompt_ends_in_reasoning

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "ratio": {"type": ["number", "null"]},
                    "options": {"type": "object"},
                    "tags": {"type": "array"},
                    "unit": {"enum": ["c", "f"]},
                    "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                },
            },
        },
    },
    {"name": "ping", "parameters": {"type": "object", "properties": {"host": {"type": "string"}}}},
]

CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
PARIS = {"name": "get_weather", "arguments": {"city": "Paris"}}

# (name, text, thinking, expected reasoning, expected content, expected tool calls)
TABLE = [
    ("empty", "", True, "", "", []),
    ("content only, thinking off", "Hello there.", False, "", "Hello there.", []),
    ("reasoning then content", "Let me see.\n</think>\n\nParis.", True, "Let me see.", "Paris.", []),
    ("reasoning never closed", "Still thinking about", True, "Still thinking about", "", []),
    ("repeated <think> dropped", "<think>\nHmm.\n</think>\n\nYes.", True, "Hmm.", "Yes.", []),
    ("thinking off keeps think tags as content", "a </think> b", False, "", "a </think> b", []),
    ("empty reasoning", "\n\n</think>\n\nHi", True, "", "Hi", []),
    ("late </think> after content dropped", "r</think>c</think>d", True, "r", "cd", []),
    ("a call, thinking off", CALL, False, "", "", [PARIS]),
    ("text before the call", "r\n</think>\n\nChecking.\n\n" + CALL, True, "r", "Checking.", [PARIS]),
    ("call ends the reasoning", "I should call.\n" + CALL + "\n</think>\n\nDone.", True, "I should call.", "Done.", [PARIS]),
    ("whitespace around a call is one separator", "Checking.\n\n" + CALL + "\nDone.", False, "", "Checking.\n\nDone.", [PARIS]),
    ("call glued to the text", "a" + CALL + " b", False, "", "a b", [PARIS]),
    (
        "two blocks",
        CALL + "\n" + CALL.replace("Paris", "Rome"),
        False,
        "",
        "",
        [PARIS, {"name": "get_weather", "arguments": {"city": "Rome"}}],
    ),
    (
        "two functions in one block",
        "<tool_call>\n<function=ping>\n<parameter=host>\na\n</parameter>\n</function>\n"
        "<function=ping>\n<parameter=host>\nb\n</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [{"name": "ping", "arguments": {"host": "a"}}, {"name": "ping", "arguments": {"host": "b"}}],
    ),
    (
        "duplicated closing tags",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</parameter>\n"
        "</function>\n</function>\n</tool_call>\n</tool_call>\nok",
        False,
        "",
        "ok",
        [PARIS],
    ),
    (
        "missing </parameter>",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n</function>\n</tool_call>",
        False,
        "",
        "",
        [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}],
    ),
    (
        "truncated inside a call",
        "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        False,
        "",
        "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        [],
    ),
    ("truncated right after the opener", "x <tool_call>", False, "", "x <tool_call>", []),
    (
        "truncated after </function>",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n",
        False,
        "",
        "",
        [PARIS],
    ),
    (
        "truncated in a second function",
        "<tool_call>\n<function=ping>\n<parameter=host>\na\n</parameter>\n</function>\n<function=ping>\n<para",
        False,
        "",
        "<function=ping>\n<para",
        [{"name": "ping", "arguments": {"host": "a"}}],
    ),
    (
        "no function inside the block",
        "<tool_call>\nnot a call\n</tool_call>",
        False,
        "",
        "<tool_call>\nnot a call\n</tool_call>",
        [],
    ),
    (
        "unknown function kept as written",
        "<tool_call>\n<function=launch_rocket>\n<parameter=count>\n3\n</parameter>\n"
        "<parameter=cfg>\n{\"a\": [1]}\n</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [{"name": "launch_rocket", "arguments": {"count": "3", "cfg": {"a": [1]}}}],
    ),
    (
        "bare function without <tool_call>",
        "Calling.\n<function=ping>\n<parameter=host>\nh\n</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "Calling.",
        [{"name": "ping", "arguments": {"host": "h"}}],
    ),
    (
        "JSON call of earlier Qwen releases",
        '<tool_call>\n{"name": "ping", "arguments": {"host": "h", "n": 2}}\n</tool_call>',
        False,
        "",
        "",
        [{"name": "ping", "arguments": {"host": "h", "n": 2}}],
    ),
    (
        "typed values",
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\n  two\n  lines  \n</parameter>\n"
        "<parameter=days>\n-7\n</parameter>\n"
        "<parameter=metric>\nTrue\n</parameter>\n"
        "<parameter=ratio>\nNone\n</parameter>\n"
        "<parameter=options>\n{\"x\": {\"y\": null}}\n</parameter>\n"
        "<parameter=tags>\n[\"a\", 2]\n</parameter>\n"
        "<parameter=unit>\nc\n</parameter>\n"
        "<parameter=limit>\n10\n</parameter>\n"
        "</function>\n</tool_call>",
        False,
        "",
        "",
        [
            {
                "name": "get_weather",
                "arguments": {
                    "city": "  two\n  lines  ",
                    "days": -7,
                    "metric": True,
                    "ratio": None,
                    "options": {"x": {"y": None}},
                    "tags": ["a", 2],
                    "unit": "c",
                    "limit": 10,
                },
            }
        ],
    ),
    (
        "values that do not fit their schema stay text",
        "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
        "<parameter=options>\n{broken\n</parameter>\n<parameter=city>\n42\n</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [{"name": "get_weather", "arguments": {"days": "three", "options": "{broken", "city": "42"}}],
    ),
]


def parse_in_pieces(text, cuts, tools=TOOLS, thinking=True):
    parser = OutputParser(tools=tools, thinking=thinking)
    deltas = []
    start = 0
    for cut in sorted(cuts) + [len(text)]:
        deltas.append(parser.feed(text[start:cut]))
        start = cut
    deltas.append(parser.finish())
    result = parser.result()
    assert "".join(d.reasoning_content for d in deltas) == result["reasoning_content"]
    assert "".join(d.content for d in deltas) == result["content"]
    assert [call for d in deltas for call in d.tool_calls] == result["tool_calls"]
    return result


@pytest.mark.parametrize("case", TABLE, ids=[case[0] for case in TABLE])
def test_table(case):
    _, text, thinking, reasoning, content, calls = case
    expected = {"reasoning_content": reasoning, "content": content, "tool_calls": calls}
    assert qwen35.parse_output(text, tools=TOOLS, thinking=thinking) == expected
    assert parse_in_pieces(text, list(range(1, len(text))), thinking=thinking) == expected  # char by char


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_chunking_gives_the_same_result(data):
    _, text, thinking, *_ = data.draw(st.sampled_from(TABLE))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert parse_in_pieces(text, cuts, thinking=thinking) == qwen35.parse_output(text, tools=TOOLS, thinking=thinking)


FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<function=ping>", "<function=", "</function>",
    "<parameter=host>", "</parameter>", "\n", " ", "text", "{\"name\": \"ping\"}", "<", ">", "=", "1", "é", "</",
]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=30),
    cuts=st.lists(st.integers(0, 400), max_size=10),
    thinking=st.booleans(),
)
def test_arbitrary_markup_never_raises_and_is_chunking_invariant(pieces, cuts, thinking):
    text = "".join(pieces)
    cuts = [cut for cut in cuts if cut <= len(text)]
    whole = qwen35.parse_output(text, tools=TOOLS, thinking=thinking)
    assert parse_in_pieces(text, cuts, thinking=thinking) == whole
    for call in whole["tool_calls"]:
        assert isinstance(call["name"], str) and isinstance(call["arguments"], dict)


def test_markup_is_never_streamed_early():
    parser = OutputParser(tools=TOOLS, thinking=False)
    assert parser.feed("Checking <tool").content == "Checking"
    assert not parser.feed("_call>\n<function=get_weather>\n<parameter=city>\nParis\n")
    assert parser.in_tool_call
    delta = parser.feed("</parameter>\n</function>\n</tool_call>")
    assert delta.tool_calls == [PARIS] and not delta.content


def test_the_templates_own_tool_calls_parse_back():
    """Assistant turns rendered by transformers (tests/data) parse back to the messages they came from."""
    cases = json.loads((Path(__file__).parent / "data" / "template_cases.json").read_text(encoding="utf-8"))
    checked = 0
    for case in cases["cases"]:
        if "expected" not in case:
            continue
        turns = case["expected"].split("<|im_start|>assistant\n")[1:]
        messages = [message for message in case["messages"] if message["role"] == "assistant"]
        for turn, message in zip(turns, messages):
            if not message.get("tool_calls"):
                continue
            reply = turn.split("<|im_end|>")[0]
            parsed = qwen35.parse_output(reply, tools=case["tools"], thinking=reply.startswith("<think>"))
            expected_calls = [
                {"name": call.get("function", call)["name"], "arguments": call.get("function", call)["arguments"]}
                for call in message["tool_calls"]
            ]
            assert parsed["tool_calls"] == expected_calls
            assert parsed["content"] == (message.get("content") or "").strip()
            assert parsed["reasoning_content"] == (message.get("reasoning_content") or "").strip()
            checked += 1
    assert checked >= 3


def test_thinking_is_read_from_the_prompt():
    cases = json.loads((Path(__file__).parent / "data" / "template_cases.json").read_text(encoding="utf-8"))
    for case in cases["cases"]:
        if "expected" in case and case["add_generation_prompt"]:
            thinking = case["template_kwargs"].get("enable_thinking", True)
            assert prompt_ends_in_reasoning(case["expected"]) == thinking, case["name"]


@pytest.mark.parametrize(
    ("raw", "schema", "expected"),
    [
        ("007", {"type": "string"}, "007"),
        ("1.5e3", {"type": "number"}, 1500.0),
        ("12", {"type": "number"}, 12),
        ("4.0", {"type": "integer"}, 4),
        ("nan", {"type": "number"}, "nan"),
        ("1" * 2000, {"type": "integer"}, "1" * 2000),
        ("false", {"type": "boolean"}, False),
        ("null", {"type": ["string", "null"]}, None),
        ("[1, 2]", None, [1, 2]),
        ("3", None, "3"),
        ("true", {"type": "array"}, "true"),
        ("5", {"type": 5, "anyOf": "integer", "enum": 3}, "5"),
        ("5", {"anyOf": [{"anyOf": [{"type": "integer"}]}]}, 5),
    ],
)
def test_convert_value(raw, schema, expected):
    assert convert_value(raw, schema) == expected


def test_finished_parser_refuses_more_text():
    parser = OutputParser()
    parser.finish()
    with pytest.raises(ValueError, match="finished"):
        parser.feed("more")
