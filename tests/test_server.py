"""`qwen35 serve` end to end: a real uvicorn server on 127.0.0.1, driven by the official `openai` and
`ollama` clients, over a scripted model whose replies are known in advance (tests/test_server_fakes.py)."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import ollama
import openai
import pytest
from test_server_fakes import RAW_CONTINUATION, ScriptedModel, live_server, wait_for_prefix_jobs

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    from qwen35 import load_tokenizer

    return load_tokenizer(fixtures / "tiny" / "dense-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def server(tokenizer):
    model = ScriptedModel(tokenizer)
    with live_server(model, tokenizer, max_running=4, max_waiting=32) as (url, state):
        yield url, state


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def _chat(client, content, stream=False, **options):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          stream=stream, **options)


def _folded_stream(chunks):
    content, reasoning, finish, usage, calls = [], [], None, None, []
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            calls.extend(delta.tool_calls or [])
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), finish, usage, calls


def test_models_and_health(server, client):
    assert [model.id for model in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/").status_code == 200
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_chat_thinking_on_streamed_and_not_agree(client):
    reply = _chat(client, "hello")
    message = reply.choices[0].message
    assert message.content == "Answer: hello"
    assert message.model_extra["reasoning_content"] == "Thinking about hello"
    assert reply.choices[0].finish_reason == "stop"
    content, reasoning, finish, _, _ = _folded_stream(_chat(client, "hello", stream=True))
    assert (content, reasoning, finish) == ("Answer: hello", "Thinking about hello", "stop")


def test_chat_thinking_off(client):
    options = {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    message = _chat(client, "bonjour", **options).choices[0].message
    assert message.content == "Answer: bonjour"
    assert not (message.model_extra or {}).get("reasoning_content")
    content, reasoning, _, _, _ = _folded_stream(_chat(client, "bonjour", stream=True, **options))
    assert (content, reasoning) == ("Answer: bonjour", "")
    message = _chat(client, "bonjour", reasoning_effort="none").choices[0].message
    assert message.content == "Answer: bonjour" and not (message.model_extra or {}).get("reasoning_content")


def test_usage_and_include_usage(client, tokenizer):
    reply = _chat(client, "count me")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "count me"}])
    reply_text = "Thinking about count me\n</think>\n\nAnswer: count me<|im_end|>"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert reply.usage.completion_tokens == len(tokenizer.encode(reply_text))
    *_, usage, _ = _folded_stream(_chat(client, "count me", stream=True, stream_options={"include_usage": True}))
    assert usage.prompt_tokens == reply.usage.prompt_tokens
    assert usage.completion_tokens == reply.usage.completion_tokens


def test_max_tokens_and_stop_strings(client, tokenizer):
    reply = _chat(client, "hello", max_tokens=3, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == tokenizer.decode(tokenizer.encode("Answer: hello")[:3])
    stopped = _chat(client, "hello", stop=["swer"], extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert stopped.choices[0].message.content == "An"
    assert stopped.choices[0].finish_reason == "stop"
    content, _, finish, _, _ = _folded_stream(_chat(client, "hello", stream=True, stop="swer",
                                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}}))
    assert (content, finish) == ("An", "stop")


def test_logprobs(client):
    reply = _chat(client, "hi", logprobs=True, top_logprobs=2, max_tokens=4)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4
    # The scripted model puts logit 20 on its token and 0 on the 4159 others.
    expected = -math.log1p(4159 * math.exp(-20.0))
    for entry in entries:
        assert entry.logprob == pytest.approx(expected, abs=1e-6)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[1].logprob == pytest.approx(expected - 20.0, abs=1e-4)


def test_tool_call_round_trip_and_prefix_reuse(server, client):
    messages = [{"role": "user", "content": "call Paris"}]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    content, _, finish, _, calls = _folded_stream(client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], stream=True))
    assert finish == "tool_calls" and calls[0].function.name == "get_weather"
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    wait_for_prefix_jobs(server[1])
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "The weather is sunny"
    # The second turn starts with the first prompt, the first reply as the template writes it back (here
    # as the model wrote it) and the newline after its end token: all of it was prefilled after the reply.
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + \
        first.usage.completion_tokens + 1


def test_parallel_tool_calls_false_keeps_the_first_call(client):
    messages = [{"role": "user", "content": "call Oslo and Rome"}]
    both = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    assert [json.loads(call.function.arguments)["city"] for call in both.choices[0].message.tool_calls] == \
        ["Oslo", "Rome"]
    one = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL],
                                         parallel_tool_calls=False)
    assert [json.loads(call.function.arguments)["city"] for call in one.choices[0].message.tool_calls] == ["Oslo"]


def test_what_an_openai_or_ollama_client_may_send_or_ask(server, client):
    # Fields this server does not act on, and ones newer than it, are accepted.
    reply = _chat(client, "hello", user="someone", store=False, metadata={"k": "v"},
                  extra_body={"a_field_from_the_future": {"x": 1}, "chat_template_kwargs": {"enable_thinking": False}})
    assert reply.choices[0].message.content == "Answer: hello"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with pytest.raises(openai.BadRequestError, match="one choice per request") as refused:
        _chat(client, "hello", n=2)
    assert refused.value.body["param"] == "n"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="--mmproj"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image]}])
    ollama_client = ollama.Client(host=server[0])
    for call, status in ((lambda: ollama_client.pull("tiny"), 501), (lambda: ollama_client.delete("tiny"), 501)):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == status and "not supported" in refused.value.error
    with pytest.raises(ollama.ResponseError, match="mmproj"):
        ollama_client.chat(model="tiny", messages=[{"role": "user", "content": "hi", "images": [b"\x89PNG"]}])


def test_tool_choice_none_keeps_a_written_call_as_text(client):
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "call Oslo"}],
                                           tools=[WEATHER_TOOL], tool_choice="none")
    message = reply.choices[0].message
    assert not message.tool_calls and reply.choices[0].finish_reason == "stop"
    assert message.content == ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
                               "</function>\n</tool_call>")


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("stream", [False, True])
def test_second_turn_of_a_plain_chat_finds_its_whole_history_cached(server, client, tokenizer, thinking, stream):
    options = {"extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}}}
    question = f"question with thinking {thinking} and stream {stream}"
    messages = [{"role": "user", "content": question}]
    if stream:
        content, _, _, first_usage, _ = _folded_stream(client.chat.completions.create(
            model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, **options))
    else:
        first = client.chat.completions.create(model="tiny", messages=messages, **options)
        content, first_usage = first.choices[0].message.content, first.usage
    assert content == f"Answer: {question}"
    messages += [{"role": "assistant", "content": content}, {"role": "user", "content": "second question"}]
    wait_for_prefix_jobs(server[1])
    second = client.chat.completions.create(model="tiny", messages=messages, **options)
    assert second.choices[0].message.content == "Answer: second question"
    # The template writes the first reply back without its reasoning; that history, up to the newline
    # after its end token, was prefilled after the first reply and is all restored.
    history = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\nAnswer: {question}<|im_end|>\n"
    assert second.usage.prompt_tokens_details.cached_tokens == len(tokenizer.encode(history))
    assert second.usage.prompt_tokens_details.cached_tokens >= first_usage.prompt_tokens


def test_a_next_turn_sent_at_once_counts_only_what_was_cached(tokenizer):
    # Each forward takes 20 ms and a prefix job advances 2 tokens a step: the next turn arrives long before
    # the history (a reply of ~60 tokens) is prefilled, takes over what was done and prefills the rest.
    model = ScriptedModel(tokenizer, delay_s=0.02)
    question = "a question " + " ".join(f"w{index}" for index in range(20))
    with live_server(model, tokenizer, prefill_chunk=2) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": question}]
        first = client.chat.completions.create(model="tiny", messages=messages)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "and another"}]
        second = client.chat.completions.create(model="tiny", messages=messages)
        assert second.choices[0].message.content == "Answer: and another"
        user_turn = f"<|im_start|>user\n{question}<|im_end|>\n"
        history = f"{user_turn}<|im_start|>assistant\nAnswer: {question}<|im_end|>\n"
        cached = second.usage.prompt_tokens_details.cached_tokens
        # At least the user turn (snapshotted while the first prompt was prefilled), more only as far as
        # the job had got, and less than the whole history, which it had not finished.
        assert len(tokenizer.encode(user_turn)) <= cached
        assert cached < len(tokenizer.encode(history))
        assert state.service.stats.prefix_jobs.get("adopted") == 1


def test_completions_endpoint(client):
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
    text = reply.choices[0].text
    assert RAW_CONTINUATION.startswith(text) and len(text) > 4
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, stream=True) if chunk.choices)
    assert streamed == text


def test_sixteen_concurrent_streams_match_their_solo_runs(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)

        async def one(index):
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question number {index}"}], stream=True)
            parts = []
            async for chunk in stream:
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
            return "".join(parts)

        together = await asyncio.gather(*(one(index) for index in range(16)))
        alone = [await one(index) for index in (0, 7, 15)]
        await client.close()
        return together, alone

    state = server[1]
    batch_sizes_before = len(state.model.forward_batch_sizes)
    together, alone = asyncio.run(run())
    assert together == [f"Answer: question number {index}" for index in range(16)]
    assert alone == [together[0], together[7], together[15]]
    assert max(state.model.forward_batch_sizes[batch_sizes_before:]) == 4  # decoded as one batch of -np rows


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server[0]
    cases = [
        (httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
         400),
        (httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": "hello"}), 422),
        (httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "temperature": "hot",
                                                        "messages": [{"role": "user", "content": "x"}]}), 422),
        (httpx.post(url + "/v1/chat/completions", json={"model": "other",
                                                        "messages": [{"role": "user", "content": "x"}]}), 404),
        (httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": -5,
                                                        "messages": [{"role": "user", "content": "x"}]}), 422),
        (httpx.post(url + "/v1/chat/completions", json={"model": "tiny",
                                                        "messages": [{"role": "user", "content": "word " * 2000}]}),
         400),
        (httpx.get(url + "/v1/nowhere"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    too_long = cases[5][0].json()["error"]["message"]
    assert "1024" in too_long and "prompt has" in too_long
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="1024"):
        _chat(client, "hello", max_tokens=5000)
    assert _chat(client, "still there").choices[0].message.content == "Answer: still there"


def test_api_key(tokenizer):
    with live_server(ScriptedModel(tokenizer), tokenizer, api_key="sesame") as (url, _):
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert _chat(right, "hello").choices[0].message.content == "Answer: hello"
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/api/tags").status_code == 401


def test_disconnect_frees_the_slot_and_a_full_queue_answers_429(tokenizer):
    model = ScriptedModel(tokenizer, delay_s=0.02)
    with live_server(model, tokenizer, max_running=1, max_waiting=0) as (url, state):
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 900, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                busy = http.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2})
                assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
                assert busy.json()["error"]["type"] == "rate_limit_error"
            # The stream is closed mid-way (900 tokens would take ~18 s): the slot frees at once.
            started = time.monotonic()
            while http.get(url + "/health").json()["running"] and time.monotonic() - started < 2:
                time.sleep(0.01)
            assert time.monotonic() - started < 1
            quick = http.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=5)
        assert quick.status_code == 200, quick.text
        assert state.service.stats.requests_by_reason.get("cancelled") == 1
        # A client that gives up on a non-streamed reply frees its slot too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        started = time.monotonic()
        while httpx.get(url + "/health").json()["running"] and time.monotonic() - started < 2:
            time.sleep(0.01)
        assert time.monotonic() - started < 1
        assert state.service.stats.requests_by_reason.get("cancelled") == 2


def test_oversized_body_gets_413(server):
    response = httpx.post(server[0] + "/v1/completions", content=b"{" + b" " * (33 << 20) + b"}",
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["message"]
    assert httpx.get(server[0] + "/health").status_code == 200


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics(server, client):
    _chat(client, "metrics please")
    before = httpx.get(server[0] + "/metrics").text
    _chat(client, "metrics please")  # the same prompt again: restored from the prefix cache
    text = httpx.get(server[0] + "/metrics").text
    assert _metric(text, "qwen35_prefix_cache_hits_total") == _metric(before, "qwen35_prefix_cache_hits_total") + 1
    assert _metric(text, "qwen35_generated_tokens_total") > _metric(before, "qwen35_generated_tokens_total")
    assert _metric(text, "qwen35_cached_prompt_tokens_total") > _metric(before, "qwen35_cached_prompt_tokens_total")
    for name in ("qwen35_http_requests_total", "qwen35_requests_total", "qwen35_generated_tokens_total",
                 "qwen35_generation_tokens_per_second", "qwen35_queue_depth", "qwen35_prefix_cache_hits_total"):
        assert f"\n{name}" in "\n" + text
    assert 'qwen35_requests_total{reason="stop"}' in text
    # Each reply's history was prefilled in the background once; the repeat found it done already.
    wait_for_prefix_jobs(server[1])
    text = httpx.get(server[0] + "/metrics").text
    assert _metric(text, "qwen35_prefix_cache_warmups_pending") == 0
    assert _metric(text, 'qwen35_prefix_cache_warmups_total{outcome="cached"}') >= 1
    assert _metric(text, 'qwen35_prefix_cache_warmups_total{outcome="stored"}') >= 1


def test_ollama_chat_generate_and_model_endpoints(server):
    client = ollama.Client(host=server[0])
    reply = client.chat(model="tiny", messages=[{"role": "user", "content": "hello"}], stream=False)
    assert reply.message.content == "Answer: hello" and reply.message.thinking == "Thinking about hello"
    assert reply.done and reply.done_reason == "stop" and reply.eval_count > 0
    parts = list(client.chat(model="tiny", messages=[{"role": "user", "content": "hello"}], stream=True))
    assert "".join(part.message.content for part in parts) == "Answer: hello"
    assert "".join(part.message.thinking or "" for part in parts) == "Thinking about hello"
    off = client.chat(model="tiny", messages=[{"role": "user", "content": "hello"}], think=False,
                      options={"temperature": 0.0, "num_predict": 50}, keep_alive="5m")
    assert off.message.content == "Answer: hello" and not off.message.thinking
    called = client.chat(model="tiny:latest", messages=[{"role": "user", "content": "call Rome"}],
                         tools=[WEATHER_TOOL])
    assert called.message.tool_calls[0].function.name == "get_weather"
    assert called.message.tool_calls[0].function.arguments == {"city": "Rome"}
    generated = client.generate(model="tiny", prompt="hello", think=False)
    assert generated.response == "Answer: hello"
    raw = client.generate(model="tiny", prompt="Once", raw=True, options={"num_predict": 3})
    assert len(raw.response) > 2 and RAW_CONTINUATION.startswith(raw.response)
    assert [model.model for model in client.list().models] == ["tiny"]
    assert client.show("tiny").capabilities
    assert [model.model for model in client.ps().models] == ["tiny"]
    assert httpx.get(server[0] + "/api/version").json()["version"]
    # `curl -d '{...}'` as Ollama's docs write it: no JSON content type, still JSON.
    form = httpx.post(server[0] + "/api/generate", content=b'{"model": "tiny", "prompt": "hi", "stream": false}',
                      headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and form.json()["response"] == "Answer: hi"
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="missing", messages=[{"role": "user", "content": "x"}])
    assert error.value.status_code == 404 and "missing" in error.value.error


def test_json_mode_ends_the_reply_with_the_object(client):
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    free = _chat(client, 'json {"a": [1, 2.5], "b": "x"} and then some words', extra_body=no_thinking)
    assert free.choices[0].message.content == '{"a": [1, 2.5], "b": "x"} and then some words'
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "r", "schema": {
                                "type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}},
                                                                 "b": {"type": "string"}}}}}):
        reply = _chat(client, 'json {"a": [1, 2.5], "b": "x"} and then some words', extra_body=no_thinking,
                      response_format=response_format)
        assert reply.choices[0].message.content == '{"a": [1, 2.5], "b": "x"}'
        assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in _chat(
        client, 'json {"a": [1, 2.5], "b": "x"} and then some words', stream=True, extra_body=no_thinking,
        response_format={"type": "json_object"}) if chunk.choices)
    assert streamed == '{"a": [1, 2.5], "b": "x"}'
    with pytest.raises(openai.BadRequestError, match="schema"):
        _chat(client, "json {}", response_format={"type": "json_schema",
                                                  "json_schema": {"name": "r", "schema": {"type": "wat"}}})


def test_an_engine_failure_fails_that_request_only(server, client):
    with pytest.raises(openai.InternalServerError, match="told to fail"):
        _chat(client, "EXPLODE now")
    response = httpx.post(server[0] + "/v1/chat/completions", json={
        "model": "tiny", "stream": True, "messages": [{"role": "user", "content": "EXPLODE again"}]})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["message"].endswith("told to fail")
    assert events[-1] == "[DONE]"
    assert _chat(client, "fine after that").choices[0].message.content == "Answer: fine after that"


def test_openapi_documents_every_route_and_the_error_body(server):
    document = httpx.get(server[0] + "/openapi.json").json()
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate",
                 "/api/tags", "/api/show", "/api/ps", "/api/version", "/health", "/metrics"):
        assert path in document["paths"]
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "404", "413", "422", "429", "503"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
