"""Ollama's /api/chat truncates a conversation longer than the context as Ollama does (the oldest
messages go, the system message and the newest turns stay) instead of failing; the prompt it used is
transformers' render of that shorter conversation. /v1 keeps OpenAI's 400."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_server_fakes import ScriptedModel, live_server

SYSTEM = {"role": "system", "content": "You are terse."}


def _conversation(turns: int) -> list[dict]:
    messages = [SYSTEM]
    for index in range(turns):
        messages += [{"role": "user", "content": f"Tell me fact number {index} about the sea, in a few words."},
                     {"role": "assistant", "content": f"Fact {index}: the sea is wide, deep, salty and blue."}]
    return messages + [{"role": "user", "content": "last question"}]


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    from qwen35 import load_tokenizer

    return load_tokenizer(fixtures / "tiny" / "dense-Q4_K_M.gguf")


def _reference_ids(hf_tokenizer, messages) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def _recording_submits(state) -> list[list[int]]:
    prompts, submit = [], state.service.submit

    def recording(request):
        prompts.append(list(request.prompt_ids))
        return submit(request)

    state.service.submit = recording
    return prompts


def test_ollama_chat_drops_the_oldest_turns_to_fit(tokenizer, hf_tokenizer):
    messages = _conversation(8)
    context = len(_reference_ids(hf_tokenizer, messages)) // 2
    # Ollama's rule, with transformers' tokens: the system message and the newest turns that fit.
    expected = next(kept for start in range(3, len(messages), 2)
                    if len(_reference_ids(hf_tokenizer, kept := [SYSTEM, *messages[start:]])) < context)
    assert 4 < len(expected) < len(messages) - 4  # some turns go, several stay
    expected_ids = _reference_ids(hf_tokenizer, expected)
    with live_server(ScriptedModel(tokenizer), tokenizer, context_length=context) as (url, state):
        prompts = _recording_submits(state)
        reply = httpx.post(url + "/api/chat", timeout=30,
                           json={"model": "tiny", "messages": messages, "stream": False}).json()
        assert reply["message"]["content"] == "Answer: last question", reply
        assert prompts == [expected_ids]
        assert reply["prompt_eval_count"] == len(expected_ids)
        # Streamed, the final line counts the same prompt.
        lines = httpx.post(url + "/api/chat", timeout=30, json={"model": "tiny", "messages": messages}).text
        assert f'"prompt_eval_count": {len(expected_ids)}' in lines.strip().splitlines()[-1]
        # OpenAI's API does not truncate: 400, as OpenAI and llama-server answer.
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError, match="context"):
            client.chat.completions.create(model="tiny", messages=messages)


def test_ollama_chat_that_fits_is_not_truncated(tokenizer, hf_tokenizer):
    messages = _conversation(2)
    with live_server(ScriptedModel(tokenizer), tokenizer, context_length=512) as (url, state):
        prompts = _recording_submits(state)
        reply = httpx.post(url + "/api/chat", timeout=30,
                           json={"model": "tiny", "messages": messages, "stream": False}).json()
    assert prompts == [_reference_ids(hf_tokenizer, messages)]
    assert reply["prompt_eval_count"] == len(prompts[0])


def test_ollama_chat_whose_last_message_alone_is_too_long_is_refused(tokenizer):
    messages = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "sea " * 400}]
    with live_server(ScriptedModel(tokenizer), tokenizer, context_length=128) as (url, _):
        response = httpx.post(url + "/api/chat", timeout=30,
                              json={"model": "tiny", "messages": messages, "stream": False})
        generate = httpx.post(url + "/api/generate", timeout=30,
                              json={"model": "tiny", "prompt": "sea " * 400, "stream": False})
    assert response.status_code == 400 and "context is 128 tokens" in response.json()["error"]
    assert generate.status_code == 400 and "context is 128 tokens" in generate.json()["error"]


def test_images_count_when_truncating_and_go_with_their_messages(fixtures, hf_tokenizer):
    """The text alone fits, the image's tokens (the processor's count, from the fixture) do not: the turn
    that carries the image goes, and the image with it."""
    import base64

    from qwen35 import load_model, load_tokenizer

    reference = json.loads((fixtures / "ref" / "dense.vision.json").read_text())
    image = (fixtures / "ref" / reference["image"]).read_bytes()
    later = [{"role": "assistant", "content": "A picture."}, {"role": "user", "content": "What colour is the sea?"},
             {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "last question"}]
    with_image = [SYSTEM, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look."}]}, *later]
    expected_ids = _reference_ids(hf_tokenizer, [SYSTEM, *later[1:]])
    expanded = len(_reference_ids(hf_tokenizer, with_image)) - 1 + reference["n_image_tokens"]
    context = expanded - 8
    text_only = expanded - reference["n_image_tokens"] + 1
    assert text_only + 2 < context < expanded and len(expected_ids) + 2 < context  # 2: num_predict
    path = fixtures / "tiny" / "dense-hf"
    model, tokenizer = load_model(path), load_tokenizer(path)
    wire = [SYSTEM, {"role": "user", "content": "Look.", "images": [base64.b64encode(image).decode()]}, *later]
    with live_server(model, tokenizer, context_length=context) as (url, state):
        prompts = _recording_submits(state)
        reply = httpx.post(url + "/api/chat", timeout=60, json={
            "model": "tiny", "messages": wire, "stream": False, "options": {"num_predict": 2}}).json()
    assert prompts == [expected_ids], reply
    assert reply["prompt_eval_count"] == len(expected_ids)
