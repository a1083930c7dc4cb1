"""`qwen35 serve`'s Responses API (/v1/responses) through the official `openai` client.

References: transformers' `apply_chat_template` for the prompt a Responses input renders to; the chat
completions route (itself tested against the generation loop and transformers) for the tokens the
real tiny model answers; the scripted model's known replies (tests/test_server_fakes.py) for the
wire format of reasoning, tool calls, usage, cut-off replies and streamed events.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Literal

import httpx
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from test_server_fakes import ScriptedModel, live_server, wait_for_prefix_jobs

from qwen35.server.responses_input import ResponsesRequest, input_items
from qwen35.server.responses_routes import ResponseStore, StoredResponse, responses_job

GREEDY = {"temperature": 0.0}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _chat_tool(tool: dict) -> dict:
    return {"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}}


# --- the scripted model: wire format ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    from qwen35 import load_tokenizer

    return load_tokenizer(fixtures / "tiny" / "dense-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def scripted(tokenizer):
    with live_server(ScriptedModel(tokenizer), tokenizer, context_length=1024) as (url, state):
        yield url, state


@pytest.fixture
def client(scripted):
    return openai.OpenAI(base_url=scripted[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def _types(items) -> list[str]:
    return [item.type for item in items]


def test_reply_parsed_by_the_openai_client(client, tokenizer):
    response = client.responses.create(model="tiny", input="hello", metadata={"k": "v"}, user="u1")
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    assert _types(response.output) == ["reasoning", "message"]
    reasoning, message = response.output
    assert reasoning.summary == [] and [part.text for part in reasoning.content] == ["Thinking about hello"]
    assert message.role == "assistant" and message.status == "completed"
    assert response.output_text == "Answer: hello"
    assert response.metadata == {"k": "v"} and response.user == "u1" and response.store is True
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    reply = "Thinking about hello\n</think>\n\nAnswer: hello<|im_end|>"
    usage = response.usage
    assert usage.input_tokens == len(tokenizer.encode(prompt))
    assert usage.output_tokens == len(tokenizer.encode(reply))
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == len(tokenizer.encode("Thinking about hello"))
    off = client.responses.create(model="tiny", input="hello", reasoning={"effort": "none"})
    assert _types(off.output) == ["message"] and off.output_text == "Answer: hello"
    assert off.usage.output_tokens_details.reasoning_tokens == 0 and off.reasoning.effort == "none"


def test_function_calls_and_their_outputs(client):
    first = client.responses.create(model="tiny", input="call Rome and Paris", tools=[WEATHER])
    assert _types(first.output) == ["reasoning", "function_call", "function_call"]
    calls = first.output[1:]
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Paris"})]
    assert len({call.call_id for call in calls}) == 2 and first.output_text == ""
    assert first.tools[0].name == "get_weather" and first.tool_choice == "auto"
    one = client.responses.create(model="tiny", input="call Rome and Paris", tools=[WEATHER],
                                  parallel_tool_calls=False)
    assert _types(one.output) == ["reasoning", "function_call"] and one.parallel_tool_calls is False
    capped = client.responses.create(model="tiny", input="call Rome and Paris", tools=[WEATHER], max_tool_calls=1)
    assert _types(capped.output) == ["reasoning", "function_call"] and capped.max_tool_calls == 1
    # The client sends the calls' results back, with the whole conversation or by previous_response_id.
    results = [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}]
    whole = client.responses.create(model="tiny", tools=[WEATHER], input=[
        {"role": "user", "content": "call Rome and Paris"}, *[item.model_dump() for item in first.output], *results])
    chained = client.responses.create(model="tiny", tools=[WEATHER], previous_response_id=first.id, input=results)
    assert whole.output_text == chained.output_text == "The weather is sunny"
    assert whole.usage.input_tokens == chained.usage.input_tokens
    text_only = client.responses.create(model="tiny", input="call Rome", tools=[WEATHER], tool_choice="none")
    assert _types(text_only.output) == ["reasoning", "message"] and "<tool_call>" in text_only.output_text


def _event_kinds(events) -> list[str]:
    kinds = []
    for event in events:
        if not (kinds and kinds[-1] == event.type and event.type.endswith(".delta")):
            kinds.append(event.type)
    return kinds


def test_streamed_events_follow_openai_and_fold_to_the_reply(client):
    with client.responses.stream(model="tiny", input="hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [event.sequence_number for event in events] == list(range(len(events)))
    part = ["response.output_item.added", "response.content_part.added"]
    assert _event_kinds(events) == [
        "response.created", "response.in_progress",
        *part, "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        *part, "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    reasoning = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert (reasoning, text) == ("Thinking about hello", "Answer: hello")
    assert final.output_text == "Answer: hello" and final.output[0].content[0].text == "Thinking about hello"
    once = client.responses.create(model="tiny", input="hello")
    assert final.usage == once.usage
    unparsed = {"id": True, "content": {"__all__": {"parsed"}}}  # (the stream helper adds `parsed`)
    assert [item.model_dump(exclude=unparsed) for item in final.output] == \
        [item.model_dump(exclude=unparsed) for item in once.output]
    # The raw events (stream=True) carry function calls' arguments.
    events = list(client.responses.create(model="tiny", input="call Oslo", tools=[WEATHER], stream=True))
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Oslo"} and done[0].name == "get_weather"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[-1].arguments == done[0].arguments


def test_a_reply_cut_short_is_incomplete(client, tokenizer):
    response = client.responses.create(model="tiny", input="hello", max_output_tokens=3,
                                       reasoning={"effort": "minimal"})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == tokenizer.decode(tokenizer.encode("Answer: hello")[:3])
    assert response.output[-1].status == "incomplete" and response.usage.output_tokens == 3
    events = list(client.responses.create(model="tiny", input="hello", max_output_tokens=3,
                                          reasoning={"effort": "none"}, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == response.output_text


def test_json_modes_end_the_reply_with_the_object(client):
    words = 'json {"a": [1, 2.5], "b": "x"} and then some words'
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}},
                                               "b": {"type": "string"}}}
    assert client.responses.create(model="tiny", input=words, reasoning={"effort": "none"}).output_text == \
        words.removeprefix("json ")
    for text_format in ({"type": "json_object"}, {"type": "json_schema", "name": "r", "schema": schema}):
        response = client.responses.create(model="tiny", input=words, reasoning={"effort": "none"},
                                           text={"format": text_format})
        assert response.output_text == '{"a": [1, 2.5], "b": "x"}'
        assert response.text.format.type == text_format["type"]


def test_stored_responses(client, scripted):
    response = client.responses.create(model="tiny", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "keep "}, {"type": "input_text", "text": "me"}]}])
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    items = client.responses.input_items.list(response.id)
    assert [item.role for item in items.data] == ["user"]
    assert [part.text for part in items.data[0].content] == ["keep ", "me"]
    three = client.responses.create(model="tiny", instructions="Be brief.", input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "3"}])
    listed = client.responses.input_items.list(three.id)  # newest first, as OpenAI's default order
    assert [item.content[0].text if isinstance(item.content, list) else item.content for item in listed.data] == \
        ["3", "two", "one"]
    page = client.responses.input_items.list(three.id, order="asc", limit=1, after=listed.data[-1].id)
    assert [item.id for item in page.data] == [listed.data[1].id] and page.has_more
    client.responses.delete(response.id)
    other = client.responses.create(model="tiny", input="hello")
    deleted = httpx.delete(f"{scripted[0]}/v1/responses/{other.id}").json()
    assert deleted == {"id": other.id, "object": "response.deleted", "deleted": True}  # as OpenAI's reference
    for call in (lambda: client.responses.retrieve(response.id),
                 lambda: client.responses.create(model="tiny", input="again", previous_response_id=response.id)):
        with pytest.raises(openai.NotFoundError, match=response.id):
            call()
    unstored = client.responses.create(model="tiny", input="hello", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    missing = httpx.delete(scripted[0] + "/v1/responses/resp_nope").json()["error"]
    assert set(missing) == {"message", "type", "param", "code"} and missing["type"] == "not_found_error"


def test_the_store_forgets_the_least_recently_used_first():
    def entry(size):
        return StoredResponse({}, [], [], size)

    store = ResponseStore(max_entries=2, max_bytes=100)
    store.put("a", entry(10))
    store.put("b", entry(10))
    assert store.get("a") is not None  # now b is the least recently used
    store.put("c", entry(10))
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    store.put("d", entry(85))  # 105 bytes with a and c: the least recently used (a) goes
    assert store.get("a") is None and store.get("c") is not None and store.nbytes == 95
    store.put("e", entry(101))  # larger than the whole budget: not kept, nothing else lost
    assert store.get("e") is None and store.get("d") is not None and store.nbytes == 95


def test_previous_response_id_drops_the_instructions_as_openai_does(client, tokenizer):
    first = client.responses.create(model="tiny", instructions="Be brief.", input="hello",
                                    reasoning={"effort": "none"})
    second = client.responses.create(model="tiny", input="and more", previous_response_id=first.id,
                                     reasoning={"effort": "none"})
    assert second.output_text == "Answer: and more" and second.previous_response_id == first.id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"},
                                            {"role": "assistant", "content": "Answer: hello"},
                                            {"role": "user", "content": "and more"}], enable_thinking=False)
    assert second.usage.input_tokens == len(tokenizer.encode(prompt))


def test_truncation_auto_drops_the_fewest_oldest_turns_that_make_it_fit(client, tokenizer):
    long = "word " * 200  # ~200 tokens a turn; the server's context is 1024
    history = []
    for index in range(6):
        history += [{"role": "user", "content": f"{index} {long}"},
                    {"role": "assistant", "content": f"answer {index}"}]
    items = [{"role": "developer", "content": "Be brief."}, *history, {"role": "user", "content": "last one"}]
    with pytest.raises(openai.BadRequestError, match="1024") as error:
        client.responses.create(model="tiny", input=items)
    assert error.value.body["code"] == "context_length_exceeded" and error.value.body["param"] == "input"
    response = client.responses.create(model="tiny", input=items, truncation="auto", reasoning={"effort": "none"})
    assert response.output_text == "Answer: last one" and response.truncation == "auto"
    system = {"role": "system", "content": "Be brief."}
    lengths = [len(tokenizer.encode(tokenizer.apply_chat_template([system, *history[2 * dropped:], items[-1]],
                                                                  enable_thinking=False)))
               for dropped in range(7)]
    assert response.usage.input_tokens == next(length for length in lengths if length < 1024)
    assert lengths[0] > 1024 and response.usage.input_tokens < lengths[0]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, scripted):
    image = {"type": "input_image", "file_id": "file-123"}
    cases = [
        (openai.BadRequestError, "web_search", {"input": "hi", "tools": [{"type": "web_search"}]}),
        (openai.BadRequestError, "file_id", {"input": [{"role": "user", "content": [image]}]}),
        (openai.BadRequestError, "inline", {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}),
        (openai.BadRequestError, "not valid JSON", {"input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{oops"}]}),
        (openai.BadRequestError, "beginning", {"input": [{"role": "user", "content": "hi"},
                                                         {"role": "developer", "content": "late"}]}),
        (openai.BadRequestError, "computer_call", {"input": [{"type": "computer_call", "call_id": "c"}]}),
        (openai.BadRequestError, "no tools", {"input": "hi", "tool_choice": "required"}),
        (openai.BadRequestError, "schema", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "r",
                                                                             "schema": {"type": "wat"}}}}),
        (openai.BadRequestError, "background", {"input": "hi", "background": True}),
        (openai.BadRequestError, "empty", {"input": []}),
        (openai.BadRequestError, "max_output_tokens", {"input": "hi", "max_output_tokens": 5000}),
        (openai.UnprocessableEntityError, "temperature", {"input": "hi", "temperature": "hot"}),
        (openai.NotFoundError, "other", {"input": "hi", "model": "other"}),
    ]
    for error_type, words, body in cases:
        with pytest.raises(error_type, match=words) as error:
            client.responses.create(**{"model": "tiny", **body})
        assert set(error.value.body) == {"message", "type", "param", "code"}
    arguments = httpx.post(scripted[0] + "/v1/responses", json={"model": "tiny", **cases[3][2]}).json()["error"]
    assert arguments["param"] == "input.1.arguments"
    assert client.responses.create(model="tiny", input="still there").output_text == "Answer: still there"


def test_an_engine_failure_fails_that_response_only(client):
    with pytest.raises(openai.InternalServerError, match="told to fail"):
        client.responses.create(model="tiny", input="EXPLODE now")
    events = list(client.responses.create(model="tiny", input="EXPLODE again", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert events[-1].response.error.message.endswith("told to fail")
    assert client.responses.create(model="tiny", input="fine").output_text == "Answer: fine"


# --- prompts: transformers' rendering of the equivalent chat ---------------------------------------


@pytest.fixture(scope="module")
def real(fixtures):
    from qwen35 import load_model, load_tokenizer

    path = fixtures / "tiny" / "dense-hf"
    model, tokenizer = load_model(path, precision="reference"), load_tokenizer(path)
    with live_server(model, tokenizer, name="dense", max_running=8, context_length=1024) as (url, state):
        yield url, state


def _image_url(fixtures) -> str:
    reference = json.loads((fixtures / "ref" / "dense.vision.json").read_text())
    image = (fixtures / "ref" / reference["image"]).read_bytes()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def _render_cases(image_url: str):
    """(Responses request fields, the chat messages they mean, chat tools, template kwargs)."""
    reasoned_call = {"role": "assistant", "content": "", "reasoning_content": "The user wants Paris.",
                     "tool_calls": [{"id": "c1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    return [
        ({"instructions": "You are terse.", "input": [
            {"role": "user", "content": "Name a colour."},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Another one."}]}]},
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one."}], None, {}),
        ({"instructions": "Rule one.", "input": [{"role": "developer", "content": "Rule two."},
                                                 {"role": "user", "content": "hi"}], "reasoning": {"effort": "none"}},
         [{"role": "system", "content": "Rule one.\n\nRule two."}, {"role": "user", "content": "hi"}], None,
         {"enable_thinking": False}),
        ({"tools": [WEATHER], "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "The user wants Paris."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]},
         [{"role": "user", "content": "Weather in Paris?"}, reasoned_call,
          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], [_chat_tool(WEATHER)], {}),
        ({"input": [{"role": "user", "content": "Why?"},
                    {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Think it over."}]},
                    {"role": "assistant", "content": "Because."}]},
         [{"role": "user", "content": "Why?"},
          {"role": "assistant", "content": "Because.", "reasoning_content": "Think it over."}], None, {}),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": image_url},
                                                 {"type": "input_text", "text": "What is this?"}]}],
          "reasoning": {"effort": "minimal"}},
         [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                       {"type": "text", "text": "What is this?"}]}], None,
         {"enable_thinking": False}),
    ]


def test_prompts_equal_transformers_render_of_the_equivalent_chat(real, hf_tokenizer, fixtures):
    state = real[1]
    for fields, messages, tools, template_kwargs in _render_cases(_image_url(fixtures)):
        body = ResponsesRequest(model="dense", **fields)
        job = responses_job(state, body, input_items(body))
        expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                    **template_kwargs)
        assert job.prompt_text == expected
        assert job.request.prompt_ids == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]


# --- the real model: the same tokens as the chat route ---------------------------------------------


@pytest.fixture
def real_client(real):
    return openai.OpenAI(base_url=real[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat_parts(reply) -> tuple[str, str]:
    message = reply.choices[0].message
    return (message.model_extra.get("reasoning_content") or ""), (message.content or "")


def _response_parts(response) -> tuple[str, str]:
    reasoning = "".join(part.text for item in response.output if item.type == "reasoning" for part in item.content)
    return reasoning, response.output_text


@pytest.mark.parametrize("thinking", [True, False])
def test_greedy_answers_equal_the_chat_route(real_client, thinking):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one."}]
    chat = real_client.chat.completions.create(model="dense", messages=messages, max_tokens=12,
                                               reasoning_effort=None if thinking else "none", **GREEDY)
    options = {"model": "dense", "instructions": "You are terse.", "input": messages[1:], "max_output_tokens": 12,
               "reasoning": {"effort": "medium" if thinking else "none"}, **GREEDY}
    response = real_client.responses.create(**options)
    assert _response_parts(response) == _chat_parts(chat)
    assert bool(_chat_parts(chat)[0]) == thinking
    assert (response.usage.input_tokens, response.usage.output_tokens) == \
        (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    events = list(real_client.responses.create(**options, stream=True))
    assert events[-1].type == f"response.{response.status}"  # (incomplete when cut at 12 tokens)
    assert _response_parts(events[-1].response) == _chat_parts(chat)
    deltas = [event.delta for event in events if event.type.endswith("_text.delta")]
    assert "".join(deltas) == "".join(_chat_parts(chat))


def test_a_continued_response_equals_the_whole_input_sent_again(real, real_client):
    options = {"model": "dense", "instructions": "You are terse.", "max_output_tokens": 10, **GREEDY}
    first = real_client.responses.create(input="Tell me about the sea.", **options)
    assert _types(first.output) == ["reasoning"] and first.status == "incomplete"
    wait_for_prefix_jobs(real[1])
    chained = real_client.responses.create(input="And the sky?", previous_response_id=first.id, **options)
    whole = real_client.responses.create(input=[{"role": "user", "content": "Tell me about the sea."},
                                                *[item.model_dump() for item in first.output],
                                                {"role": "user", "content": "And the sky?"}], **options)
    chat = real_client.chat.completions.create(model="dense", max_tokens=10, **GREEDY, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."},
        {"role": "assistant", "content": "", "reasoning_content": _response_parts(first)[0]},
        {"role": "user", "content": "And the sky?"}])
    assert _response_parts(chained) == _response_parts(whole) == _chat_parts(chat)
    assert chained.usage.input_tokens == whole.usage.input_tokens == chat.usage.prompt_tokens
    assert chained.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_forced_function_call_round_trip_equals_the_chat_route(real_client):
    tool = {"type": "function", "name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
        "required": ["city", "days"], "additionalProperties": False}}
    options = {"model": "dense", "tools": [tool], "reasoning": {"effort": "none"}, **GREEDY}
    first = real_client.responses.create(input="Weather in Paris for 2 days?", max_output_tokens=200,
                                         tool_choice={"type": "function", "name": "get_weather"}, **options)
    assert _types(first.output) == ["function_call"]
    call = first.output[0]
    arguments = json.loads(call.arguments)
    assert arguments["city"] in ("Paris", "Rome") and isinstance(arguments["days"], int)
    second = real_client.responses.create(previous_response_id=first.id, max_output_tokens=8, **options, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 25 C"}])
    chat = real_client.chat.completions.create(
        model="dense", tools=[_chat_tool(tool)], max_tokens=8, reasoning_effort="none", **GREEDY, messages=[
            {"role": "user", "content": "Weather in Paris for 2 days?"},
            {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 25 C"}])
    assert _response_parts(second) == _chat_parts(chat)
    assert second.usage.input_tokens == chat.usage.prompt_tokens


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int
    friendly: bool
    weights: list[float]


def test_json_schema_output_validates(real_client):
    response = real_client.responses.create(
        model="dense", input="Describe a pet as JSON.", max_output_tokens=200, reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "pet", "schema": Pet.model_json_schema()}}, **GREEDY)
    assert response.status == "completed"
    Pet.model_validate_json(response.output_text, strict=True)
    # The client's own structured-output helper: a strict schema it derives, parsed back into the model.
    parsed = real_client.responses.parse(model="dense", input="Describe a pet as JSON.", max_output_tokens=200,
                                         reasoning={"effort": "none"}, text_format=Pet, **GREEDY)
    assert isinstance(parsed.output_parsed, Pet)


def test_openapi_documents_the_routes(scripted):
    paths = httpx.get(scripted[0] + "/openapi.json").json()["paths"]
    assert {"post"} <= set(paths["/v1/responses"]) and {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])
    assert "/v1/responses/{response_id}/input_items" in paths
    assert paths["/v1/responses"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] \
        .endswith("/ErrorBody")


# --- no body makes the server fail ------------------------------------------------------------------

_text = st.text(max_size=12) | st.text(st.characters(categories=["Cs", "Ll"]), max_size=3)
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-9, 10**6), st.floats(allow_nan=False), _text),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=6)
_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "refusal", "x"]), "text": _text}),
    st.fixed_dictionaries({"type": st.just("input_image")},
                          optional={"image_url": st.one_of(_text, st.just("data:image/png;base64,AAAA")),
                                    "file_id": _text}),
    _json), max_size=2)
_items = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "x"]),
                           "content": st.one_of(_text, _parts, _json)}, optional={"type": st.just("message")}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": _text, "name": _text,
                           "arguments": st.one_of(st.just('{"city": "Rome"}'), _text, _json)}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": _text,
                           "output": st.one_of(_text, _parts, _json)}),
    st.fixed_dictionaries({"type": st.just("reasoning")}, optional={"summary": st.one_of(_parts, _json),
                                                                     "content": st.one_of(_parts, _json)}),
    _json), max_size=3)
_bodies = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "other"]), "input": st.one_of(_text, _items)},
                                optional={
    "instructions": st.one_of(_text, _json), "max_output_tokens": st.one_of(st.integers(-2, 3000), _json),
    "tools": st.one_of(_json, st.lists(st.one_of(st.just(WEATHER), _json, st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "web_search"]), "name": _text}, optional={"parameters": _json})),
        max_size=2)),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", "x"]), _json, st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "allowed_tools", "file_search"])},
        optional={"name": _text, "mode": _text, "tools": _json})),
    "text": st.one_of(_json, st.fixed_dictionaries({"format": st.one_of(_json, st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])}, optional={"schema": _json}))})),
    "reasoning": st.one_of(_json, st.fixed_dictionaries({"effort": st.sampled_from(["none", "high", "x"])})),
    "previous_response_id": _text, "truncation": st.one_of(st.sampled_from(["auto", "disabled"]), _json),
    "stream": st.booleans(), "store": _json, "metadata": _json, "include": _json, "parallel_tool_calls": _json,
    "max_tool_calls": _json, "temperature": _json})


@settings(max_examples=int(os.environ.get("QWEN35_FUZZ_EXAMPLES", "40")), deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_no_body_makes_the_server_fail(scripted, body):
    response = httpx.post(scripted[0] + "/v1/responses", content=json.dumps(body).encode(), timeout=30)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream"):
        assert "event: response.completed" in response.text or "event: response.incomplete" in response.text
