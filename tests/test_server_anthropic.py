"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) driven by the official `anthropic`
client: over the scripted model (tests/test_server_fakes.py), whose replies (thinking, text, tool
calls) are known in advance, and over the real tiny model, whose replies must be token for token those
of /v1/chat/completions for the same conversation (that route is itself tested against the generation
loop and transformers). Prompts are checked against transformers' renderings (tests/data/template_cases.json)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_server_fakes import ScriptedModel, live_server, wait_for_prefix_jobs

from qwen35.server.anthropic_routes import render_request
from qwen35.server.anthropic_schemas import MessagesRequest
from qwen35.server.errors import APIError, error_payload

MODEL = "claude-sonnet-4-6"  # any name is served
THINK = {"type": "enabled", "budget_tokens": 1024}
GREEDY = {"temperature": 0.0}  # anthropic 2.x's create() has no sampling arguments; the API still takes them
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CASES = json.loads((Path(__file__).parent / "data" / "template_cases.json").read_text(encoding="utf-8"))["cases"]
# Cases with an Anthropic equivalent: a generation prompt, no template flags but thinking, no video.
CASE_NAMES = ["user, thinking on", "user, thinking off", "user, thinking explicitly on", "system and user",
              "multi-turn", "multi-turn, earlier reasoning dropped", "tools",
              "tools with system", "tools, thinking off", "tool call and result",
              "tool call with text before it and reasoning", "several tool calls with typed arguments",
              "tool results then an answer then a new question", "image", "image, thinking off, system as parts",
              "unicode and markup in content"]


def _blocks(content) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(b"pixels").decode()}
    return [{"type": "text", "text": part["text"]} if part["type"] == "text" else {"type": "image", "source": image}
            for part in content or []]


def anthropic_request(case: dict) -> dict:
    """The Anthropic request equivalent to an OpenAI-shaped template case (the test's own translation)."""
    request = {"model": MODEL, "max_tokens": 16, "messages": []}
    messages = list(case["messages"])
    if messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        request["system"] = system if isinstance(system, str) else _blocks(system)
    if case["template_kwargs"].get("enable_thinking", True):
        request["thinking"] = THINK
    if case["tools"]:
        request["tools"] = [{"name": tool["function"]["name"], "description": tool["function"]["description"],
                             "input_schema": tool["function"]["parameters"]} for tool in case["tools"]]
    calls = 0
    for message in messages:
        if message["role"] == "assistant":
            blocks = [{"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}] \
                if "reasoning_content" in message else []
            blocks += _blocks(message["content"])
            for call in message.get("tool_calls") or []:
                function = call.get("function", call)
                blocks.append({"type": "tool_use", "id": f"toolu_{calls}", "name": function["name"],
                               "input": function["arguments"]})
                calls += 1
            request["messages"].append({"role": "assistant", "content": blocks})
        elif message["role"] == "tool":
            result = {"type": "tool_result", "tool_use_id": "toolu_x", "content": message["content"]}
            previous = request["messages"][-1]
            if previous["role"] == "user":
                previous["content"].append(result)
            else:
                request["messages"].append({"role": "user", "content": [result]})
        else:
            request["messages"].append({"role": "user", "content": _blocks(message["content"])})
    return request


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    from qwen35 import load_tokenizer

    return load_tokenizer(fixtures / "tiny" / "dense-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def server(tokenizer):
    with live_server(ScriptedModel(tokenizer), tokenizer, max_running=4, max_waiting=32) as (url, state):
        yield url, state


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=30)


def _ask(client, content, **options):
    options.setdefault("max_tokens", 200)
    return client.messages.create(model=MODEL, messages=[{"role": "user", "content": content}], **options)


def _streamed(client, content, **options):
    options.setdefault("max_tokens", 200)
    with client.messages.stream(model=MODEL, messages=[{"role": "user", "content": content}], **options) as stream:
        events = [event.type for event in stream]
        return stream.get_final_message(), events


def _shape(message) -> list[tuple]:
    return [(block.type, getattr(block, "text", None) or getattr(block, "thinking", None),
             getattr(block, "name", None), getattr(block, "input", None)) for block in message.content]


# --- prompts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_prompt_is_transformers_rendering_of_the_equivalent_openai_messages(name, tokenizer, server):
    case = next(case for case in CASES if case["name"] == name)
    request = anthropic_request(case)
    rendered = render_request(SimpleNamespace(tokenizer=tokenizer), MessagesRequest.model_validate(request))
    assert rendered.prompt_text == case["expected"]
    if "image" not in name:  # the fake model has no vision tower
        counted = httpx.post(server[0] + "/v1/messages/count_tokens", json=request).json()
        assert counted == {"input_tokens": len(case["expected_ids"])}


# --- replies over the scripted model --------------------------------------------------------------


def test_thinking_reply_streamed_and_not(client, tokenizer):
    reply = _ask(client, "hello", thinking=THINK)
    assert reply.model == MODEL and reply.id.startswith("msg_") and reply.role == "assistant"
    assert _shape(reply) == [("thinking", "Thinking about hello", None, None), ("text", "Answer: hello", None, None)]
    assert reply.content[0].signature == ""
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == len(tokenizer.encode(prompt))
    reply_text = "Thinking about hello\n</think>\n\nAnswer: hello<|im_end|>"
    assert usage.output_tokens == len(tokenizer.encode(reply_text))
    final, events = _streamed(client, "hello", thinking=THINK)
    assert _shape(final) == _shape(reply) and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == len(tokenizer.encode(prompt))
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]


def test_thinking_is_off_unless_asked(client):
    assert _shape(_ask(client, "bonjour")) == [("text", "Answer: bonjour", None, None)]
    assert _shape(_ask(client, "bonjour", thinking={"type": "disabled"})) == [("text", "Answer: bonjour", None, None)]
    assert _shape(_ask(client, "bonjour", thinking={"type": "adaptive"}))[0] == \
        ("thinking", "Thinking about bonjour", None, None)


def test_wire_format_of_the_event_stream(server):
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "thinking": THINK, "tools": [WEATHER],
            "messages": [{"role": "user", "content": "call Oslo"}]}
    response = httpx.post(server[0] + "/v1/messages", json=body, timeout=30)
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[len("data: "):])
        assert data["type"] == name_line[len("event: "):]
        events.append(data)
    names = [event["type"] for event in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    starts = [event for event in events if event["type"] == "content_block_start"]
    assert [event["content_block"]["type"] for event in starts] == ["thinking", "tool_use"]
    assert [event["index"] for event in starts] == [0, 1]
    deltas = {event["delta"]["type"] for event in events if event["type"] == "content_block_delta"}
    assert deltas == {"thinking_delta", "signature_delta", "input_json_delta"}
    partial = "".join(event["delta"]["partial_json"] for event in events
                      if event["type"] == "content_block_delta" and event["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Oslo"}
    assert [event["type"] for event in events[names.index("content_block_start"):]].count("content_block_stop") == 2
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None


def test_tool_use_round_trip_with_thinking_reuses_the_cached_history(server, client):
    messages = [{"role": "user", "content": "call Paris"}]
    first = client.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=[WEATHER], thinking=THINK)
    assert _shape(first) == [("thinking", "Thinking about call Paris", None, None),
                             ("tool_use", None, "get_weather", {"city": "Paris"})]
    assert first.stop_reason == "tool_use" and first.content[1].id.startswith("toolu_")
    final, _ = _streamed(client, "call Paris", tools=[WEATHER], thinking=THINK)
    assert _shape(final) == _shape(first) and final.stop_reason == "tool_use"
    wait_for_prefix_jobs(server[1])
    messages += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[1].id,
                                               "content": [{"type": "text", "text": "sunny"}]}]}]
    second = client.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=[WEATHER], thinking=THINK)
    assert second.content[-1].text == "The weather is sunny" and second.stop_reason == "end_turn"
    # The history (the first prompt, the reply as the template writes it back, the newline after its end)
    # was prefilled after the first reply: the client's echo of our blocks renders it exactly.
    first_prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens == first_prompt + first.usage.output_tokens + 1
    errored = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages[:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[1].id, "is_error": True,
                                      "content": "timeout"}]}])
    assert errored.content[-1].text == "The weather is Error: timeout"


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("stream", [False, True])
def test_second_turn_echoing_the_blocks_finds_its_whole_history_cached(server, client, tokenizer, thinking, stream):
    question = f"anthropic question with thinking {thinking} and stream {stream}"
    options = {"thinking": THINK} if thinking else {}
    first = _streamed(client, question, **options)[0] if stream else _ask(client, question, **options)
    assert [block.type for block in first.content] == (["thinking", "text"] if thinking else ["text"])
    assert first.content[-1].text == f"Answer: {question}"
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
                {"role": "user", "content": "second question"}]
    wait_for_prefix_jobs(server[1])
    second = client.messages.create(model=MODEL, max_tokens=200, messages=messages, **options)
    assert second.content[-1].text == "Answer: second question"
    # The template writes the first reply back without its thinking; that history, up to the newline
    # after its end token, was prefilled after the first reply and is all read from the cache.
    history = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\nAnswer: {question}<|im_end|>\n"
    assert second.usage.cache_read_input_tokens == len(tokenizer.encode(history))


def test_parallel_calls_and_tool_choice(client):
    both = _ask(client, "call Oslo and Rome", tools=[WEATHER])
    assert [block.input for block in both.content] == [{"city": "Oslo"}, {"city": "Rome"}]
    one = _ask(client, "call Oslo and Rome", tools=[WEATHER],
               tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [block.input for block in one.content] == [{"city": "Oslo"}]
    # tool_choice none: the tools are not offered, and a call the model writes anyway stays text.
    none = _ask(client, "call Oslo", tools=[WEATHER], tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and "<function=get_weather>" in none.content[0].text


def test_stop_sequences_max_tokens_and_the_context_limit(server, client, tokenizer):
    stopped = _ask(client, "hello", stop_sequences=["zz", "ell"])
    assert (stopped.content[0].text, stopped.stop_reason, stopped.stop_sequence) == ("Answer: h", "stop_sequence",
                                                                                     "ell")
    final, _ = _streamed(client, "hello", stop_sequences=["ell"])
    assert (final.content[0].text, final.stop_reason, final.stop_sequence) == ("Answer: h", "stop_sequence", "ell")
    short = _ask(client, "hello", max_tokens=2)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    # Claude Code asks for 32000 tokens: the reply may fill the context, and then says so.
    words = "json " + " ".join(f"w{index}" for index in range(180))
    filled = _ask(client, words, max_tokens=32000)
    prompt = filled.usage.input_tokens + filled.usage.cache_read_input_tokens
    assert filled.stop_reason == "model_context_window_exceeded"
    assert prompt + filled.usage.output_tokens == server[1].context_length


def test_prefilled_reply_continues(client):
    reply = client.messages.create(model=MODEL, max_tokens=50, messages=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Answer: "}])
    assert reply.content[0].text == "hello"
    with pytest.raises(anthropic.BadRequestError, match="prefilled"):
        client.messages.create(model=MODEL, max_tokens=50, thinking=THINK, messages=[
            {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Answer: "}])


def test_fields_anthropic_clients_send_are_accepted(client):
    reply = client.messages.create(
        model="whatever-name", max_tokens=100, metadata={"user_id": "u1"},
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "hel", "cache_control": {"type": "ephemeral"}},
                                               {"type": "text", "text": "lo"}]}],
        extra_body={"a_field_from_the_future": 1, "temperature": 0.0, "top_p": 0.9, "top_k": 5},
        extra_headers={"anthropic-beta": "something-2025"})
    assert reply.model == "whatever-name" and reply.content[0].text == "Answer: hello"
    # Consecutive turns of one role are one turn, as Anthropic combines them.
    combined = client.messages.create(model=MODEL, max_tokens=100, messages=[
        {"role": "user", "content": "hel"}, {"role": "user", "content": "lo"}])
    assert combined.content[0].text == "Answer: hello"


# --- errors --------------------------------------------------------------------------------------


def test_bad_requests_get_anthropic_errors_and_the_server_keeps_serving(server, client):
    url = server[0]
    responses = [
        (httpx.post(url + "/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
         400, "max_tokens"),
        (httpx.post(url + "/v1/messages", content=b"{not json", headers={"content-type": "application/json"}),
         400, "JSON"),
        (httpx.get(url + "/v1/messages/batches"), 404, "Unknown route"),
        (httpx.post(url + "/v1/messages", content=b"{" + b" " * (33 << 20) + b"}"), 413, "MiB"),
    ]
    for response, status, words in responses:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"type", "error"} and body["type"] == "error" and set(body["error"]) == {"type", "message"}
        assert words in body["error"]["message"]
    assert [response.json()["error"]["type"] for response, _, _ in responses] == [
        "invalid_request_error", "invalid_request_error", "not_found_error", "request_too_large"]
    bad = [
        ([{"role": "system", "content": "x"}], {}, "role"),
        ([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}], {},
         "belongs in an assistant message"),
        ([{"role": "assistant", "content": "only me"}], {}, "user turn"),
        ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}], {},
         "No user query"),
        ([{"role": "user", "content": "word " * 2000}], {}, "prompt is too long"),
        ([{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}], {}, "vision"),
        ([{"role": "user", "content": "x"}], {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
         "not among"),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
         "server tools"),
        ([{"role": "user", "content": [{"type": "document", "source": {}}]}], {}, "document"),
    ]
    for messages, options, words in bad:
        with pytest.raises(anthropic.BadRequestError, match=words) as raised:
            client.messages.create(model=MODEL, max_tokens=10, messages=messages, **options)
        assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert _ask(client, "still there").content[0].text == "Answer: still there"


def test_an_engine_failure_is_an_api_error_streamed_or_not(client):
    with pytest.raises(anthropic.InternalServerError, match="told to fail") as raised:
        _ask(client, "EXPLODE now")
    assert raised.value.body["error"]["type"] == "api_error"
    with pytest.raises(anthropic.APIStatusError, match="told to fail"):
        _streamed(client, "EXPLODE again")
    assert _ask(client, "fine after that").content[0].text == "Answer: fine after that"


def test_api_key_as_x_api_key_or_bearer(tokenizer):
    with live_server(ScriptedModel(tokenizer), tokenizer, api_key="sesame") as (url, _):
        wrong = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as raised:
            _ask(wrong, "hello")
        assert raised.value.body["error"]["type"] == "authentication_error"
        assert _ask(anthropic.Anthropic(base_url=url, api_key="sesame", max_retries=0),
                    "hello").content[0].text == "Answer: hello"
        assert _ask(anthropic.Anthropic(base_url=url, auth_token="sesame", max_retries=0),
                    "hello").content[0].text == "Answer: hello"


_text = st.text(max_size=16) | st.text(st.characters(categories=["Cs", "Ll"]), max_size=3)
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), _text)
_json = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=6)
_source = st.one_of(_json, st.fixed_dictionaries({"type": st.sampled_from(["base64", "url"]), "url": _text,
                                                  "data": _text, "media_type": _text}))
_block = st.one_of(_json, st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
                   st.fixed_dictionaries({"type": st.just("image"), "source": _source}),
                   st.fixed_dictionaries({"type": st.just("tool_use"), "id": _text, "name": _text, "input": _json}),
                   st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": _text},
                                         optional={"content": _json, "is_error": _json}),
                   st.fixed_dictionaries({"type": st.just("thinking"), "thinking": _text, "signature": _text}))
_bodies = st.fixed_dictionaries(
    {"model": _text, "messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "system"]),
        "content": st.one_of(_text, st.lists(_block, max_size=3), _json)}), max_size=3)},
    optional={"max_tokens": st.one_of(st.integers(-2, 40), _json), "system": st.one_of(_text, st.lists(_block)),
              "stream": st.booleans(), "stop_sequences": st.one_of(st.lists(_text, max_size=2), _json),
              "temperature": _leaf, "top_k": _leaf, "tools": st.lists(st.one_of(_json, st.fixed_dictionaries(
                  {"name": st.sampled_from(["get_weather", ""])}, optional={"input_schema": _json, "type": _text})),
                  max_size=2),
              "tool_choice": st.one_of(_json, st.fixed_dictionaries({"type": st.sampled_from(
                  ["auto", "any", "tool", "none", "x"])}, optional={"name": _text})),
              "thinking": st.one_of(_json, st.fixed_dictionaries({"type": st.sampled_from(
                  ["enabled", "disabled", "adaptive"])}, optional={"budget_tokens": _leaf})),
              "output_config": _json})


FUZZ = settings(max_examples=int(os.environ.get("QWEN35_FUZZ_EXAMPLES", "25")), deadline=None,
                phases=[Phase.generate], suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=_bodies, path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
def test_no_body_makes_the_server_fail(server, body, path):
    # json.dumps writes NaN and Infinity as bare words: bodies that are not strict JSON are part of the test.
    response = httpx.post(server[0] + path, content=json.dumps(body).encode(), timeout=30)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["type"] == "error" and response.json()["error"]["message"]
    else:
        assert "event: error" not in response.text


@pytest.mark.parametrize("status,error_class", [
    (422, anthropic.BadRequestError), (429, anthropic.RateLimitError), (500, anthropic.InternalServerError),
    (503, anthropic.OverloadedError)])
def test_each_status_reads_as_the_sdks_typed_error(status, error_class):
    import httpx2  # the anthropic SDK's own HTTP client

    body, code = error_payload("/v1/messages", APIError(status, "what happened"))
    transport = httpx2.MockTransport(lambda request: httpx2.Response(code, json=body))
    client = anthropic.Anthropic(base_url="http://server", api_key="unused", max_retries=0,
                                 http_client=httpx2.Client(transport=transport))
    with pytest.raises(error_class, match="what happened") as raised:
        _ask(client, "hello")
    assert type(raised.value) is error_class


def test_openapi_documents_the_routes_and_their_error_body(server):
    document = httpx.get(server[0] + "/openapi.json").json()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = document["paths"][path]["post"]["responses"]
        for status in ("400", "401", "413", "429", "500", "529"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicErrorBody")


# --- the real tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(fixtures):
    from qwen35 import load_model, load_tokenizer

    path = fixtures / "tiny" / "dense-hf"
    model, tokenizer = load_model(path, precision="reference"), load_tokenizer(path)
    with live_server(model, tokenizer, name="dense", max_running=4, context_length=1024) as (url, state):
        yield (url, tokenizer, anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120),
               openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120))


def _openai_reply(client, messages, thinking, **options):
    reply = client.chat.completions.create(model="dense", messages=messages, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
                                           **options)
    message = reply.choices[0].message
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls or []]
    return (message.model_extra.get("reasoning_content") or "", message.content or "", calls,
            reply.usage.prompt_tokens)


def _anthropic_reply(message):
    text = "".join(block.text for block in message.content if block.type == "text")
    thinking = "".join(block.thinking for block in message.content if block.type == "thinking")
    calls = [(block.name, block.input) for block in message.content if block.type == "tool_use"]
    return thinking, text, calls, message.usage.input_tokens + message.usage.cache_read_input_tokens


TOOL_HISTORY = (
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
         "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 C"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                        "input": {"city": "Paris"}}]},
     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 25 C"}]}])
CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."}]


@pytest.mark.parametrize("conversation,thinking", [("system and turns", False), ("system and turns", True),
                                                   ("tool round trip", False)])
def test_greedy_replies_equal_the_chat_completions_route(real, conversation, thinking):
    _, _, client, openai_client = real
    if conversation == "tool round trip":
        openai_messages, messages = TOOL_HISTORY
        options = {"tools": [WEATHER]}
        openai_options = {"tools": [{"type": "function", "function": {
            "name": WEATHER["name"], "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}}]}
    else:
        openai_messages, messages = [{"role": "system", "content": "You are terse."}] + CHAT, CHAT
        options, openai_options = {"system": "You are terse."}, {}
    if thinking:
        options["thinking"] = THINK
    expected = _openai_reply(openai_client, openai_messages, thinking, max_tokens=16, **openai_options)
    reply = client.messages.create(model="dense", max_tokens=16, extra_body=GREEDY, messages=messages, **options)
    assert _anthropic_reply(reply) == expected and (expected[0] or expected[1] or expected[2])
    assert bool(expected[0]) == thinking
    with client.messages.stream(model="dense", max_tokens=16, extra_body=GREEDY, messages=messages,
                                **options) as stream:
        assert _anthropic_reply(stream.get_final_message()) == expected
    assert client.messages.count_tokens(model="dense", messages=messages, **options).input_tokens == expected[3]


def test_forced_tool_equals_the_chat_completions_route(real):
    _, _, client, openai_client = real
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]}}
    expected = _openai_reply(openai_client, messages, False, max_tokens=60, tools=[tool],
                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    reply = client.messages.create(model="dense", max_tokens=60, extra_body=GREEDY, messages=messages,
                                   tools=[{"name": "get_weather", "input_schema": WEATHER["input_schema"]}],
                                   tool_choice={"type": "tool", "name": "get_weather"})
    assert _anthropic_reply(reply) == expected and expected[2][0][0] == "get_weather"
    assert reply.stop_reason == "tool_use"


def test_output_format_equals_the_chat_completions_json_schema(real):
    _, _, client, openai_client = real
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
              "required": ["name", "legs"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]
    expected = _openai_reply(openai_client, messages, False, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "pet", "schema": schema}})
    reply = client.messages.create(model="dense", max_tokens=60, extra_body=GREEDY, messages=messages,
                                   output_config={"format": {"type": "json_schema", "schema": schema}})
    # The same grammar-constrained tokens (the random model pads its JSON with whitespace past 60 tokens).
    assert _anthropic_reply(reply) == expected and reply.content[0].text.startswith("{")


def test_an_image_block_answers_as_the_chat_completions_route(real, fixtures):
    _, _, client, openai_client = real
    reference = json.loads((fixtures / "ref" / "dense.vision.json").read_text())
    data = base64.b64encode((fixtures / "ref" / reference["image"]).read_bytes()).decode()
    question = "What is in this picture?"
    expected = _openai_reply(openai_client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
        {"type": "text", "text": question}]}], False, max_tokens=12)
    messages = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": question}]}]
    reply = client.messages.create(model="dense", max_tokens=12, extra_body=GREEDY, messages=messages)
    assert _anthropic_reply(reply) == expected
    # The prompt is transformers' processor's: one placeholder per merged patch block.
    assert expected[3] == len(reference["ids"])
    assert client.messages.count_tokens(model="dense", messages=messages).input_tokens == len(reference["ids"])
    for source, words in (({"type": "url", "url": "https://example.com/cat.png"}, "inline"),
                          ({"type": "base64", "media_type": "image/png", "data": "%%%"}, "base64"),
                          ({"type": "base64", "media_type": "image/png",
                            "data": base64.b64encode(b"not an image").decode()}, "image")):
        with pytest.raises(anthropic.BadRequestError, match=words):
            client.messages.create(model="dense", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image", "source": source}, {"type": "text", "text": "what?"}]}])


def test_both_clients_list_the_served_model(server, client):
    """GET /v1/models answers OpenAI's and Anthropic's clients alike (each reads its own fields)."""
    import openai

    url, state = server
    listed = client.models.list()
    assert [model.id for model in listed.data] == [state.model_name] and listed.has_more is False
    assert listed.data[0].type == "model" and listed.data[0].display_name == state.model_name
    assert client.models.retrieve(state.model_name).id == state.model_name
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")
    openai_client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert [model.id for model in openai_client.models.list().data] == [state.model_name]
    assert openai_client.models.retrieve(state.model_name).owned_by == "qwen35"
