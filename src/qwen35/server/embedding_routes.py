"""Embeddings: OpenAI's /v1/embeddings, Ollama's /api/embed and its older /api/embeddings, llama-server's
/embedding (also /embeddings).

Qwen 3.5 is a chat model, not an embedding model, yet llama-server (given `--pooling`) and Ollama make
vectors of any model they serve, and tools call these routes on whatever model is there. A text's vector
is its final-normed hidden states pooled as `serve --pooling` says (the last token's by default, the only
one a causal model shows the whole text; Qwen3-Embedding pools the same way), scaled to unit length
except on Ollama's older route, which never normalized, and where llama-server's `embd_normalize` asks
for another scaling. Each text is one forward pass on the engine's
thread between two decode steps (EngineService.call), so chats running meanwhile go on.
"""

from __future__ import annotations

import asyncio
import base64
import time
from functools import partial
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from qwen35.server.app import get_state
from qwen35.server.errors import APIError, ErrorBody, documented_errors
from qwen35.server.prompting import check_model_name, check_text

router = APIRouter(responses=documented_errors(ErrorBody))
_LENIENT = ConfigDict(extra="ignore")  # clients send fields newer than this server, as in schemas.py

MAX_INPUTS = 2048  # OpenAI's limit on the texts of one request


Inputs = str | list[str] | list[int] | list[list[int]]  # a text, texts, token ids, or lists of token ids


class EmbeddingRequest(BaseModel):
    model_config = _LENIENT
    model: str
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    embd_normalize: int = Field(default=2, ge=-1)  # llama-server's: see scaled()


class LlamaEmbeddingRequest(BaseModel):
    """llama-server's /embedding: `content` (or `input`), no model name."""

    model_config = _LENIENT
    content: Inputs | None = None
    input: Inputs | None = None
    embd_normalize: int = Field(default=2, ge=-1)


class OllamaEmbedRequest(BaseModel):
    model_config = _LENIENT
    model: str
    input: str | list[str] = ""
    truncate: StrictBool = True  # false: a text longer than the context is an error instead of cut
    dimensions: int | None = Field(default=None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class OllamaEmbeddingsRequest(BaseModel):
    model_config = _LENIENT
    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: Any = None


def _check_dimensions(state, dimensions: int | None) -> None:
    width = state.model.config.hidden_size
    if dimensions is not None and dimensions != width:
        raise APIError(400, f"dimensions={dimensions}: this model's embeddings have {width} dimensions "
                            f"(they cannot be shortened).", param="dimensions")


async def _token_lists(state, texts: list[str], param: str) -> list[list[int]]:
    check_text(texts, param)
    return [await asyncio.to_thread(state.tokenizer.encode, text) for text in texts]


def _fit(state, ids: list[int], index: int, truncate: bool, param: str) -> list[int]:
    if not ids:
        raise APIError(400, f"'{param}' holds an empty text (index {index}): there is nothing to embed.", param=param)
    if any(not 0 <= token < state.model.config.vocab_size for token in ids):
        raise APIError(400, f"'{param}' holds token ids outside the vocabulary (0..{state.model.config.vocab_size - 1}).",
                       param=param)
    if len(ids) > state.context_length:
        if not truncate:
            raise APIError(400, f"This model's maximum context length is {state.context_length} tokens, however "
                                f"input {index} has {len(ids)} tokens.", param=param, code="context_length_exceeded")
        ids = ids[:state.context_length]
    return ids


def scaled(vector: np.ndarray, norm: int) -> np.ndarray:
    """llama.cpp's `embd_normalize`: -1 as is, 0 to int16's range by the largest magnitude (32760 x / max|x|),
    1 by the sum of magnitudes, 2 to unit length (the default), p > 2 by the p-norm."""
    magnitudes = np.abs(vector.astype(np.float64))
    largest = magnitudes.max()
    if norm == -1 or largest == 0:
        return vector
    if norm == 0:
        return (vector * (32760.0 / largest)).astype(np.float32)
    # the p-norm of x is max|x| times that of x / max|x|, whose powers stay <= 1 for any p
    total = magnitudes.sum() if norm == 1 else largest * ((magnitudes / largest) ** norm).sum() ** (1.0 / norm)
    return (vector / total).astype(np.float32)


async def _embed(state, token_lists: list[list[int]], norm: int = 2) -> list[np.ndarray]:
    vectors = []
    for ids in token_lists:
        vector = await state.service.call(partial(state.model.embed, ids, state.pooling, normalize=False))
        vectors.append(scaled(vector.numpy(), norm))
    return vectors


async def _inputs(state, items: Inputs, param: str) -> list[list[int]]:
    """Each input's token ids, each fitting the context (a text, texts, token ids, or lists of them)."""
    items = [items] if isinstance(items, str) else items
    if not items:
        raise APIError(400, f"'{param}' is empty: send a text, a list of texts or a list of token ids.", param=param)
    if all(isinstance(item, int) for item in items):
        token_lists = [list(items)]
    elif all(isinstance(item, str) for item in items):
        token_lists = await _token_lists(state, items, param)
    else:
        token_lists = [list(item) if isinstance(item, list) else (await _token_lists(state, [item], param))[0]
                       for item in items]
    if len(token_lists) > MAX_INPUTS:
        raise APIError(400, f"'{param}' holds {len(token_lists)} texts; at most {MAX_INPUTS} a request.", param=param)
    return [_fit(state, ids, index, False, param) for index, ids in enumerate(token_lists)]


@router.post("/v1/embeddings", summary="Embeddings of texts or token ids (the model's pooled hidden states)")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = get_state(request)
    check_model_name(state, body.model)
    _check_dimensions(state, body.dimensions)
    token_lists = await _inputs(state, body.input, "input")
    vectors = await _embed(state, token_lists, body.embd_normalize)
    tokens = sum(map(len, token_lists))

    def encoded(vector: np.ndarray):
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return vector.tolist()

    return {"object": "list", "model": state.model_name,
            "data": [{"object": "embedding", "index": index, "embedding": encoded(vector)}
                     for index, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/api/embed", summary="Ollama: embeddings of texts")
async def ollama_embed(body: OllamaEmbedRequest, request: Request):
    state = get_state(request)
    started = time.perf_counter_ns()
    check_model_name(state, body.model)
    _check_dimensions(state, body.dimensions)
    texts = ([body.input] if body.input else []) if isinstance(body.input, str) else body.input  # "": no vectors
    token_lists = await _token_lists(state, texts, "input")
    token_lists = [_fit(state, ids, index, body.truncate, "input") for index, ids in enumerate(token_lists)]
    vectors = await _embed(state, token_lists)
    return {"model": body.model, "embeddings": [vector.tolist() for vector in vectors],
            "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
            "prompt_eval_count": sum(map(len, token_lists))}


@router.post("/api/embeddings", summary="Ollama: the embedding of one prompt (the older route: not normalized)")
async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request):
    state = get_state(request)
    check_model_name(state, body.model)
    if not body.prompt:  # as Ollama answers an empty prompt
        return {"embedding": []}
    token_lists = await _token_lists(state, [body.prompt], "prompt")
    ids = _fit(state, token_lists[0], 0, True, "prompt")
    vector = (await _embed(state, [ids], norm=-1))[0]
    return {"embedding": vector.tolist()}


@router.post("/embedding", summary="llama-server's embeddings: [{index, embedding: [vector]}] a text")
@router.post("/embeddings", include_in_schema=False)
async def llama_embedding(body: LlamaEmbeddingRequest, request: Request):
    state = get_state(request)
    param = "content" if body.content is not None else "input"
    items = body.content if body.content is not None else body.input
    if items is None:
        raise APIError(400, "Send the text to embed as 'content'.", param="content")
    token_lists = await _inputs(state, items, param)
    vectors = await _embed(state, token_lists, body.embd_normalize)
    # pooled: one vector a text, in a list (llama-server lists a vector a token when it does not pool)
    return [{"index": index, "embedding": [vector.tolist()]} for index, vector in enumerate(vectors)]
