"""Embeddings (`Model.embed`, /v1/embeddings, Ollama's /api/embed and /api/embeddings) against transformers:
a text's vector is transformers' final-normed hidden states (`last_hidden_state`) of the same tokens, pooled
(last token, mean or first token) and, but on Ollama's older route, scaled to unit length."""

from __future__ import annotations

import base64
import json
import os
import threading

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_server_fakes import live_server

transformers = pytest.importorskip("transformers")

TEXTS = ["The sea was calm that morning.", "Quantized weights, exact logits.", "你好，世界"]
TOLERANCE = 2e-5  # reference precision vs transformers in fp32 (the fixtures' logits agree to ~3e-5)


@pytest.fixture(scope="module")
def reference(dense_hf):
    model = transformers.AutoModelForImageTextToText.from_pretrained(dense_hf, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(dense_hf)

    def hidden(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()

    return hidden, hf_tokenizer


def _pooled(hidden: np.ndarray, pooling: str, normalize: bool = True) -> np.ndarray:
    vector = {"last": hidden[-1], "mean": hidden.mean(axis=0), "cls": hidden[0]}[pooling]
    return vector / np.linalg.norm(vector) if normalize else vector


@pytest.fixture(scope="module")
def served(fixtures):
    from qwen35 import load_model, load_tokenizer

    path = fixtures / "tiny" / "dense-hf"
    model, tokenizer = load_model(path, precision="reference"), load_tokenizer(path)
    with live_server(model, tokenizer, name="dense", context_length=256) as (url, state):
        yield url, state, model


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_model_embed_pools_transformers_hidden_states(served, reference, pooling):
    _, _, model = served
    hidden, hf_tokenizer = reference
    # 700 tokens: more than one prefill piece (512), so the pooling spans pieces
    for ids in (hf_tokenizer.encode(TEXTS[0]), list(range(100, 800))):
        expected = hidden(ids)
        np.testing.assert_allclose(model.embed(ids, pooling).numpy(), _pooled(expected, pooling), atol=TOLERANCE)
        np.testing.assert_allclose(model.embed(ids, pooling, normalize=False).numpy(),
                                   _pooled(expected, pooling, normalize=False), atol=1e-4, rtol=1e-5)


def test_openai_embeddings_are_transformers_last_token_unit_vectors(served, reference):
    url, _, _ = served
    hidden, hf_tokenizer = reference
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.embeddings.create(model="dense", input=TEXTS)  # the client asks for base64 and decodes it
    token_lists = [hf_tokenizer.encode(text) for text in TEXTS]
    assert [item.index for item in reply.data] == [0, 1, 2]
    for item, ids in zip(reply.data, token_lists):
        np.testing.assert_allclose(item.embedding, _pooled(hidden(ids), "last"), atol=TOLERANCE)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(map(len, token_lists))
    # floats on request, and token ids as input
    body = httpx.post(url + "/v1/embeddings", json={"model": "dense", "input": token_lists[1],
                                                    "encoding_format": "float"}, timeout=60).json()
    assert body["object"] == "list" and body["model"] == "dense" and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(body["data"][0]["embedding"], _pooled(hidden(token_lists[1]), "last"), atol=TOLERANCE)
    raw = httpx.post(url + "/v1/embeddings", json={"model": "dense", "input": [token_lists[2]],
                                                   "encoding_format": "base64"}, timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, _pooled(hidden(token_lists[2]), "last"), atol=TOLERANCE)


def test_serve_pooling_chooses_how_vectors_are_made(served, reference):
    url, state, _ = served
    hidden, hf_tokenizer = reference
    state.pooling = "mean"
    try:
        body = httpx.post(url + "/v1/embeddings", json={"model": "dense", "input": TEXTS[0], "encoding_format": "float"},
                          timeout=60).json()
    finally:
        state.pooling = "last"
    np.testing.assert_allclose(body["data"][0]["embedding"], _pooled(hidden(hf_tokenizer.encode(TEXTS[0])), "mean"),
                               atol=TOLERANCE)


def test_ollama_embed_normalizes_and_embeddings_does_not(served, reference):
    url, _, _ = served
    hidden, hf_tokenizer = reference
    client = ollama.Client(host=url, timeout=60)
    reply = client.embed(model="dense", input=TEXTS[:2])
    assert reply.model == "dense" and reply.prompt_eval_count == sum(len(hf_tokenizer.encode(t)) for t in TEXTS[:2])
    for vector, text in zip(reply.embeddings, TEXTS[:2]):
        np.testing.assert_allclose(vector, _pooled(hidden(hf_tokenizer.encode(text)), "last"), atol=TOLERANCE)
    older = client.embeddings(model="dense", prompt=TEXTS[2])
    np.testing.assert_allclose(older.embedding, _pooled(hidden(hf_tokenizer.encode(TEXTS[2])), "last", normalize=False),
                               atol=1e-4, rtol=1e-5)
    # Ollama's answers to nothing: no vectors, not an error
    assert client.embed(model="dense", input="").embeddings == []
    assert client.embeddings(model="dense", prompt="").embedding == []


def test_a_text_longer_than_the_context_is_cut_by_ollama_and_refused_by_openai(served, reference):
    url, state, _ = served
    hidden, _ = reference
    long_ids = list(range(1000, 1000 + state.context_length + 40))
    text = served[1].tokenizer.decode(long_ids)
    ids = served[1].tokenizer.encode(text)
    assert len(ids) > state.context_length
    reply = ollama.Client(host=url, timeout=60).embed(model="dense", input=text)
    assert reply.prompt_eval_count == state.context_length
    np.testing.assert_allclose(reply.embeddings[0], _pooled(hidden(ids[:state.context_length]), "last"), atol=TOLERANCE)
    refused = httpx.post(url + "/api/embed", json={"model": "dense", "input": text, "truncate": False}, timeout=60)
    assert refused.status_code == 400 and "maximum context length is 256 tokens" in refused.json()["error"]  # Ollama's shape
    refused = httpx.post(url + "/v1/embeddings", json={"model": "dense", "input": text}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, status, says", [
    ({"model": "dense", "input": ""}, 400, "empty text"),
    ({"model": "dense", "input": []}, 400, "'input' is empty"),
    ({"model": "dense", "input": ["a", ""]}, 400, "empty text (index 1)"),
    ({"model": "dense", "input": [1, 10**9]}, 400, "outside the vocabulary"),
    ({"model": "dense", "input": "a", "dimensions": 8}, 400, "have 256 dimensions"),
    ({"model": "other", "input": "a"}, 404, "does not exist"),
    ({"model": "dense", "input": {"text": "a"}}, 422, "input"),
    ({"model": "dense", "input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
])
def test_bad_embedding_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, says):
    url, _, _ = served
    reply = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"] or says == error.get("param"), error
    assert httpx.post(url + "/v1/embeddings", json={"model": "dense", "input": "ok"}, timeout=60).status_code == 200


def test_embeddings_run_between_the_steps_of_a_chat_without_changing_it(served, reference):
    url, _, model = served
    hidden, hf_tokenizer = reference
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    alone = client.chat.completions.create(model="dense", messages=messages, max_tokens=24, temperature=0)
    vectors = []

    def embed_meanwhile():
        for _ in range(3):
            vectors.append(client.embeddings.create(model="dense", input=TEXTS[1]).data[0].embedding)

    stream = client.chat.completions.create(model="dense", messages=messages, max_tokens=24, temperature=0, stream=True)
    thread = threading.Thread(target=embed_meanwhile)
    thread.start()
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    thread.join(60)
    assert text == alone.choices[0].message.content
    for vector in vectors:
        np.testing.assert_allclose(vector, _pooled(hidden(hf_tokenizer.encode(TEXTS[1])), "last"), atol=TOLERANCE)
    assert len(vectors) == 3


def _llama_cpp_scaled(vector: np.ndarray, norm: int) -> np.ndarray:
    """llama.cpp's embd_normalize as its embedding README writes the formulas."""
    if norm == -1:
        return vector
    if norm == 0:
        return 32760 * vector / np.abs(vector).max()
    if norm == 1:
        return vector / np.abs(vector).sum()
    return vector / (np.abs(vector) ** norm).sum() ** (1 / norm)


@pytest.mark.parametrize("norm", [-1, 0, 1, 2, 3])
def test_llama_server_embedding_route_and_embd_normalize(served, reference, norm):
    url, _, _ = served
    hidden, hf_tokenizer = reference
    raw = [_pooled(hidden(hf_tokenizer.encode(text)), "last", normalize=False) for text in TEXTS[:2]]
    reply = httpx.post(url + "/embedding", json={"content": TEXTS[:2], "embd_normalize": norm}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [item["index"] for item in body] == [0, 1] and all(len(item["embedding"]) == 1 for item in body)
    scale = 32760 if norm == 0 else 1
    for item, vector in zip(body, raw):
        np.testing.assert_allclose(item["embedding"][0], _llama_cpp_scaled(vector, norm),
                                   atol=1e-4 * scale * (np.abs(vector).max() if norm == -1 else 1), rtol=1e-4)
    openai_shaped = httpx.post(url + "/v1/embeddings", json={"model": "dense", "input": TEXTS[0], "embd_normalize": norm,
                                                             "encoding_format": "float"}, timeout=60).json()
    np.testing.assert_allclose(openai_shaped["data"][0]["embedding"], body[0]["embedding"][0], rtol=1e-6, atol=1e-6)
    assert httpx.post(url + "/embeddings", json={"input": TEXTS[0]}, timeout=60).json()[0]["index"] == 0
    missing = httpx.post(url + "/embedding", json={}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "content"


embedding_inputs = st.one_of(
    st.text(max_size=24), st.lists(st.text(max_size=12), max_size=3), st.lists(st.integers(-5, 10**6), max_size=4),
    st.lists(st.lists(st.integers(-2, 5000), max_size=3), max_size=2), st.none(), st.integers(), st.floats(),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    st.text(st.characters(categories=["Cs", "Ll"]), max_size=4))
embedding_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["dense", "dense:latest", "other"])},
    optional={"input": embedding_inputs, "content": embedding_inputs, "prompt": embedding_inputs,
              "encoding_format": st.sampled_from(["float", "base64", "x", ""]),
              "dimensions": st.one_of(st.integers(-2, 300), st.floats(), st.text(max_size=3)),
              "embd_normalize": st.one_of(st.integers(-3, 6), st.floats(), st.none()),
              "truncate": st.one_of(st.booleans(), st.text(max_size=3)), "options": st.none() | st.just({"a": 1})})


@settings(max_examples=int(os.environ.get("QWEN35_FUZZ_EXAMPLES", "30")), deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(body=embedding_bodies, path=st.sampled_from(["/v1/embeddings", "/api/embed", "/api/embeddings", "/embedding"]))
def test_embedding_bodies_never_fail(served, body, path):
    url, _, _ = served
    reply = httpx.post(url + path, content=json.dumps(body).encode(), timeout=60,
                       headers={"content-type": "application/json"})
    assert reply.status_code < 500, (path, body, reply.text)
