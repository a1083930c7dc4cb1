"""No request makes the server fail (5xx): hypothesis-made bodies for every generating endpoint, and a
schemathesis run against /openapi.json."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_server_fakes import ScriptedModel, live_server

FUZZ = settings(max_examples=int(os.environ.get("QWEN35_FUZZ_EXAMPLES", "25")), deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))

# Lone surrogates included: JSON can carry them, and no tokenizer can take them.
text = st.text(max_size=24) | st.text(st.characters(categories=["Cs", "Ll"]), max_size=4)
numbers = st.one_of(st.none(), st.integers(-3, 5), st.integers(-(2**70), 2**70), st.floats(),
                    st.booleans(), text)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), text)
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(text, inner, max_size=3), max_leaves=8)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])
content = st.one_of(text, st.none(), st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": text})}),
    json_any), max_size=2), json_any)
tool_calls = st.lists(st.fixed_dictionaries({"id": text, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text, "arguments": st.one_of(text, json_any)})}), max_size=2)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": content},
                                          optional={"tool_calls": tool_calls, "reasoning_content": text}),
                    min_size=0, max_size=3)
tools = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "x", ""])}, optional={"parameters": json_any})}), max_size=2)
schemas = st.one_of(json_any, st.just({"type": "object", "properties": {"a": {"type": "integer"}}}))
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny:latest", "other"]), "messages": messages},
    optional={"max_tokens": numbers, "max_completion_tokens": numbers, "temperature": numbers, "top_p": numbers,
              "top_k": numbers, "min_p": numbers, "presence_penalty": numbers, "frequency_penalty": numbers,
              "repetition_penalty": numbers, "seed": numbers, "stop": st.one_of(text, st.lists(text, max_size=3)),
              "stream": st.booleans(), "logprobs": st.booleans(), "top_logprobs": numbers, "tools": tools,
              "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", "bogus"]), json_any,
                                       st.just({"type": "function", "function": {"name": "get_weather"}})),
              "chat_template_kwargs": st.one_of(json_any, st.fixed_dictionaries({"enable_thinking": json_any})),
              "response_format": st.one_of(json_any, st.fixed_dictionaries(
                  {"type": st.sampled_from(["text", "json_object", "json_schema"])},
                  optional={"json_schema": st.fixed_dictionaries({"name": text, "schema": schemas})})),
              "n": numbers, "stream_options": json_any})
completion_bodies = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": st.one_of(text, st.lists(text, max_size=2),
                                                   st.lists(st.integers(-5, 10**6), max_size=4), json_any)},
    optional={"max_tokens": numbers, "logprobs": numbers, "echo": st.booleans(), "stream": st.booleans(),
              "stop": st.one_of(text, st.lists(text, max_size=2))})
ollama_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "nope"])},
    optional={"messages": messages, "prompt": text, "system": text, "raw": st.booleans(), "stream": st.booleans(),
              "think": st.one_of(st.booleans(), st.sampled_from(["low", "high", "x"])),
              "format": st.one_of(st.just("json"), st.just(""), schemas, text), "keep_alive": json_any,
              "options": st.one_of(json_any, st.fixed_dictionaries({}, optional={
                  "num_predict": numbers, "temperature": numbers, "top_k": numbers, "seed": numbers,
                  "stop": st.one_of(text, st.lists(text, max_size=2)), "repeat_penalty": numbers}))})


@pytest.fixture(scope="module")
def url(fixtures):
    from qwen35 import load_tokenizer

    tokenizer = load_tokenizer(fixtures / "tiny" / "dense-Q4_K_M.gguf")
    with live_server(ScriptedModel(tokenizer), tokenizer, context_length=256, max_waiting=64) as (base, _):
        yield base


def _no_server_error(url: str, path: str, body) -> None:
    # json.dumps writes NaN and Infinity as bare words: bodies that are not strict JSON are part of the test.
    response = httpx.post(url + path, content=json.dumps(body).encode(), timeout=30,
                          headers={"content-type": "application/json"})
    body_text = response.read().decode("utf-8", errors="replace")
    assert response.status_code < 500, (path, body, body_text)
    if response.status_code >= 400:
        assert "error" in response.json()
    assert '"error"' not in body_text or response.status_code >= 400 or "Generation failed" not in body_text


@FUZZ
@given(body=chat_bodies)
def test_chat_bodies_never_fail(url, body):
    _no_server_error(url, "/v1/chat/completions", body)


@FUZZ
@given(body=completion_bodies)
def test_completion_bodies_never_fail(url, body):
    _no_server_error(url, "/v1/completions", body)


@FUZZ
@given(body=ollama_bodies, path=st.sampled_from(["/api/chat", "/api/generate", "/api/show"]))
def test_ollama_bodies_never_fail(url, body, path):
    _no_server_error(url, path, body)


def test_schemathesis_finds_no_server_error(url):
    import schemathesis
    loader = getattr(getattr(schemathesis, "openapi", None), "from_url", None) or schemathesis.from_uri
    schema = loader(url + "/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=url)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)

        check()
