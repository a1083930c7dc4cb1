"""`qwen35 serve` over the real tiny fixture model (dense-hf): every reply must equal what the
generation loop (`qwen35.engine.generate`, the one-request path) produces for the same prompt,
parsed by the chat parser; batching, streaming and the prefix cache must not change a token.

The models run at reference precision: the fast kernels' sums depend on how many rows a call
carries (one decoding row or sixteen, a prompt in one piece or two), which on a random model's
near-ties can flip a greedy token whatever the server does."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Literal

import ollama
import openai
import pytest
from pydantic import BaseModel
from test_server_fakes import live_server, wait_for_prefix_jobs

from qwen35.chat.parser import parse_output

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def real(fixtures):
    from qwen35 import load_model, load_tokenizer

    path = fixtures / "tiny" / "dense-hf"
    model, tokenizer = load_model(path, precision="reference"), load_tokenizer(path)
    with live_server(model, tokenizer, name="dense", max_running=16, max_waiting=16,
                     context_length=1024) as (url, state):
        yield url, state, model, tokenizer


@pytest.fixture
def client(real):
    return openai.OpenAI(base_url=real[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(model, tokenizer, messages, max_tokens, **template_kwargs):
    """The reply of the one-request generation loop, parsed: (reasoning, content, prompt_tokens)."""
    prompt = tokenizer.apply_chat_template(messages, **template_kwargs)
    prompt_ids = tokenizer.encode(prompt)
    text = tokenizer.decode(model.generate(prompt_ids, max_new_tokens=max_tokens, **GREEDY))
    parsed = parse_output(text, thinking=prompt.rstrip().endswith("<think>"))
    return parsed["reasoning_content"], parsed["content"], len(prompt_ids)


def _stream_text(chunks):
    content, reasoning = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
    return "".join(reasoning), "".join(content)


@pytest.mark.parametrize("thinking", [True, False])
def test_greedy_chat_streamed_and_not_equal_the_generation_loop(real, client, thinking):
    _, _, model, tokenizer = real
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
    reasoning, content, prompt_tokens = _reference(model, tokenizer, messages, 16, enable_thinking=thinking)
    reply = client.chat.completions.create(model="dense", messages=messages, max_tokens=16, extra_body=kwargs,
                                           **GREEDY)
    message = reply.choices[0].message
    assert (message.model_extra.get("reasoning_content") or "", message.content or "") == (reasoning, content)
    assert reply.usage.prompt_tokens == prompt_tokens
    streamed = _stream_text(client.chat.completions.create(model="dense", messages=messages, max_tokens=16,
                                                           extra_body=kwargs, stream=True, **GREEDY))
    assert streamed == (reasoning, content)
    assert bool(reasoning) == thinking  # thinking on: the reply opens inside <think>


def test_raw_completion_equals_the_generation_loop(real, client):
    _, _, model, tokenizer = real
    prompt = "The quick brown fox"
    expected = tokenizer.decode(model.generate(tokenizer.encode(prompt), max_new_tokens=12, **GREEDY))
    reply = client.completions.create(model="dense", prompt=prompt, max_tokens=12, **GREEDY)
    assert reply.choices[0].text == expected


def test_sixteen_concurrent_streams_equal_their_solo_runs(real):
    url, _, model, tokenizer = real
    questions = [f"Question {index}: what is {index} plus {index}?" for index in range(16)]
    expected = [_reference(model, tokenizer, [{"role": "user", "content": q}], 8) for q in questions]

    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(question):
            stream = await client.chat.completions.create(
                model="dense", messages=[{"role": "user", "content": question}], max_tokens=8, stream=True,
                **GREEDY)
            return _stream_text([chunk async for chunk in stream])

        results = await asyncio.gather(*(one(q) for q in questions))
        await client.close()
        return results

    results = asyncio.run(run())
    assert results == [(reasoning, content) for reasoning, content, _ in expected]


def test_second_turn_restores_the_first_from_the_prefix_cache(real, client):
    _, _, model, tokenizer = real
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="dense", messages=messages, max_tokens=6, **GREEDY)
    messages += [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one."}]
    reasoning, content, prompt_tokens = _reference(model, tokenizer, messages, 10)
    second = client.chat.completions.create(model="dense", messages=messages, max_tokens=10, **GREEDY)
    generation_prompt = len(tokenizer.encode("<|im_start|>assistant\n<think>\n"))
    assert second.usage.prompt_tokens == prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - generation_prompt
    # Restored state gives the very tokens a fresh prefill gives.
    message = second.choices[0].message
    assert (message.model_extra.get("reasoning_content") or "", message.content or "") == (reasoning, content)
    again = client.chat.completions.create(model="dense", messages=messages, max_tokens=10, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == prompt_tokens
    assert again.choices[0].message.content == message.content


@pytest.fixture(scope="module", params=["dense-hf", "dense-Q4_K_M.gguf"])
def loaded(fixtures, request):
    from qwen35 import load_model, load_tokenizer

    path = fixtures / "tiny" / request.param
    return load_model(path, precision="reference"), load_tokenizer(path)


def _openai_turn(url, messages, thinking):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return client.chat.completions.create(model="dense", messages=messages, max_tokens=20, **GREEDY,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})


@pytest.mark.parametrize("thinking", [True, False])
def test_second_turn_finds_the_first_cached_and_answers_as_a_fresh_server(loaded, thinking):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    with live_server(model, tokenizer, name="dense", context_length=1024) as (url, state):
        first = _openai_turn(url, messages, thinking)
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "user", "content": "And then what happened?"}]
        wait_for_prefix_jobs(state)
        second = _openai_turn(url, messages, thinking)
    with live_server(model, tokenizer, name="dense", context_length=1024) as (url, _):
        fresh = _openai_turn(url, messages, thinking)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens == fresh.usage.prompt_tokens
    assert second.choices[0].message.model_dump() == fresh.choices[0].message.model_dump()


def test_ollama_second_turn_finds_the_first_cached_and_answers_as_a_fresh_server(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Name three rivers."}]
    options = {"temperature": 0, "num_predict": 20}
    with live_server(model, tokenizer, name="dense", context_length=1024) as (url, state):
        client = ollama.Client(host=url)
        first = client.chat(model="dense", messages=messages, think=False, options=options)
        messages += [first.message.model_dump(exclude_none=True), {"role": "user", "content": "Which is longest?"}]
        wait_for_prefix_jobs(state)
        cached_before = state.service.stats.cached_tokens
        second = client.chat(model="dense", messages=messages, think=False, options=options)
        cached = state.service.stats.cached_tokens - cached_before
    with live_server(model, tokenizer, name="dense", context_length=1024) as (url, _):
        fresh = ollama.Client(host=url).chat(model="dense", messages=messages, think=False, options=options)
    assert cached >= first.prompt_eval_count
    assert second.prompt_eval_count == fresh.prompt_eval_count
    assert second.message.model_dump() == fresh.message.model_dump()


def test_ollama_thinking_on_and_off(real):
    url, _, model, tokenizer = real
    client = ollama.Client(host=url)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    for think in (True, False):
        reasoning, content, _ = _reference(model, tokenizer, messages, 12, enable_thinking=think)
        reply = client.chat(model="dense", messages=messages, think=think,
                            options={"temperature": 0, "num_predict": 12})
        assert (reply.message.thinking or "", reply.message.content) == (reasoning, content)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int
    friendly: bool
    weights: list[float]


NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def test_json_schema_reply_validates(client):
    reply = client.chat.completions.create(
        model="dense", messages=[{"role": "user", "content": "Describe a pet as JSON."}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}},
        extra_body=NO_THINKING, **GREEDY)
    assert reply.choices[0].finish_reason == "stop"
    Pet.model_validate_json(reply.choices[0].message.content, strict=True)


def test_forced_tool_call_round_trip(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    first = client.chat.completions.create(
        model="dense", messages=messages, tools=tools, max_tokens=200, extra_body=NO_THINKING,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments["city"] in ("Paris", "Rome")
    assert isinstance(arguments["days"], int)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 25 C"}]
    second = client.chat.completions.create(model="dense", messages=messages, tools=tools, max_tokens=8,
                                            extra_body=NO_THINKING, **GREEDY)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    required = client.chat.completions.create(model="dense", messages=messages[:1], tools=tools, max_tokens=200,
                                              tool_choice="required", extra_body=NO_THINKING, **GREEDY)
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_sampling_options_and_seeds_match_the_generation_loop(real):
    url, _, model, tokenizer = real
    messages = [{"role": "user", "content": "Pick some words."}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=False))
    options = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.01, "repetition_penalty": 1.2,
               "presence_penalty": 0.5, "frequency_penalty": 0.3, "seed": 1234}
    expected = tokenizer.decode(model.generate(prompt_ids, max_new_tokens=10, **options))

    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        extra = {key: options[key] for key in ("top_k", "min_p", "repetition_penalty")}
        standard = {key: options[key] for key in ("temperature", "top_p", "presence_penalty",
                                                  "frequency_penalty", "seed")}
        replies = await asyncio.gather(*(client.chat.completions.create(
            model="dense", messages=messages, max_tokens=10, extra_body={**NO_THINKING, **extra}, **standard)
            for _ in range(3)))
        await client.close()
        return [reply.choices[0].message.content for reply in replies]

    replies = asyncio.run(run())
    assert replies == [parse_output(expected, thinking=False)["content"]] * 3


def _vision_case(fixtures):
    reference = json.loads((fixtures / "ref" / "dense.vision.json").read_text())
    image = (fixtures / "ref" / reference["image"]).read_bytes()
    return reference, image


def test_an_image_chat_answers_as_transformers_and_its_repeat_is_cached(real, client, fixtures):
    url, _, _, tokenizer = real
    reference, image = _vision_case(fixtures)
    expected = tokenizer.decode(reference["transformers_greedy"][:12])
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    replies = [client.chat.completions.create(model="dense", messages=messages, max_tokens=12, extra_body={
        **NO_THINKING, "ignore_eos": True}, **GREEDY) for _ in range(2)]
    for reply in replies:
        # The prompt is the processor's: one placeholder per merged patch block.
        assert reply.usage.prompt_tokens == len(reference["ids"])
        assert reply.choices[0].message.content == expected
    assert replies[1].usage.prompt_tokens_details.cached_tokens == len(reference["ids"])
    # Ollama's spelling: base64 images beside the text.
    answer = ollama.Client(host=url).chat(
        model="dense", think=False, options={"temperature": 0, "num_predict": 12},
        messages=[{"role": "user", "content": "What is in this picture?", "images": [image]}])
    assert answer.message.content == expected and answer.prompt_eval_count == len(reference["ids"])


def test_bad_images_get_clear_errors(real, client, fixtures):
    _, image = _vision_case(fixtures)

    def ask(url):
        return client.chat.completions.create(model="dense", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]}])

    for url, words in (("https://example.com/cat.png", "inline"), ("data:image/png;base64,%%%", "base64"),
                       ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "image")):
        with pytest.raises(openai.BadRequestError, match=words):
            ask(url)
