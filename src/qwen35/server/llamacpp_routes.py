"""llama-server's own utility endpoints: /tokenize, /detokenize, /apply-template, /props.

Tools written for llama.cpp call these beside the OpenAI routes, so the request and reply shapes are
llama-server's (tools/server/README.md of llama.cpp). Only what this server can state truthfully is
answered: /props leaves out llama-server's knobs that have no counterpart here (mirostat, DRY, XTC, ...).

/apply-template runs the chat endpoint's own preparation (`openai_routes.chat_job`) and answers the
prompt text it would tokenize, so the two can never disagree: the server's template and its
--chat-template-kwargs, a request's `chat_template_kwargs`, `tools`, `reasoning_effort: "none"`, and a
reasoning budget of 0 (which closes `<think>` in the prompt) all apply. A request chat would refuse
(a prompt over the context, images without a vision tower, a model this server does not serve) is
refused here with the same error.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from qwen35 import __version__
from qwen35.server.app import ServerState, get_state
from qwen35.server.errors import APIError, ErrorBody, documented_errors
from qwen35.server.openai_routes import chat_job
from qwen35.server.prompting import check_text, sampling_params
from qwen35.server.schemas import ChatCompletionRequest

router = APIRouter(responses=documented_errors(ErrorBody))

_LENIENT = ConfigDict(extra="ignore")


class TokenizeRequest(BaseModel):
    model_config = _LENIENT
    content: str
    # Qwen 3.5's tokenizers add no BOS or EOS (the GGUF's add_bos_token is false, tokenizer.json has no
    # post-processor), so add_special changes nothing, as in llama-server for these models.
    add_special: StrictBool = False
    parse_special: StrictBool = True  # false: control tokens written in the text are encoded as text
    with_pieces: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = _LENIENT
    tokens: Annotated[list[StrictInt], Field(description="Token ids to turn back into text.")]


class ApplyTemplateRequest(ChatCompletionRequest):
    """A chat completion request; llama-server's /apply-template needs no model name."""

    model: str | None = None


def token_piece(data: bytes) -> str | list[int]:
    """A token's piece as llama-server writes it: its text, or its byte values where they are not
    valid UTF-8 by themselves (part of a character split over several tokens)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post("/tokenize", summary="Token ids of a text (llama-server's /tokenize)")
async def tokenize(body: TokenizeRequest, request: Request):
    state = get_state(request)
    check_text(body.content, "content")
    tokenizer = state.tokenizer
    ids = await asyncio.to_thread(tokenizer.encode, body.content, body.parse_special)
    if not body.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": token_id, "piece": token_piece(tokenizer.token_bytes(token_id))} for token_id in ids]}


@router.post("/detokenize", summary="The text of token ids (llama-server's /detokenize)")
async def detokenize(body: DetokenizeRequest, request: Request):
    tokenizer = get_state(request).tokenizer
    vocab = tokenizer.vocab_size
    for index, token_id in enumerate(body.tokens):
        if not 0 <= token_id < vocab:
            raise APIError(400, f"tokens[{index}] is {token_id}, outside the vocabulary (0..{vocab - 1}).",
                           param="tokens", code="invalid_token_id")
    # Bytes that are not valid UTF-8 become U+FFFD, as llama-server's JSON writer replaces them.
    return {"content": await asyncio.to_thread(tokenizer.decode, body.tokens)}


@router.post("/apply-template", summary="The prompt /v1/chat/completions would feed the model for these messages")
async def apply_template(body: ApplyTemplateRequest, request: Request):
    state = get_state(request)
    if body.model is None:
        body = body.model_copy(update={"model": state.model_name})
    job = await asyncio.to_thread(chat_job, state, body)
    return {"prompt": job.prompt_text}


@router.get("/props", summary="The server's settings (llama-server's /props)")
async def props(request: Request):
    state = get_state(request)
    template = state.tokenizer.chat_template
    reply = {
        "default_generation_settings": {
            "n_ctx": state.context_length,  # each request's context, as a llama-server slot's
            "speculative": state.service.speculation is not None,
            "params": default_params(state),
        },
        "total_slots": state.service.scheduler.max_running,
        "model_alias": state.model_name,
        "model_path": state.model_path,
        "chat_template": template.source,
        "modalities": {"vision": getattr(state.model, "vision", None) is not None, "audio": False},
        "build_info": f"qwen35 {__version__}",
    }
    if "tool_use" in template.sources:  # the template requests with tools get (ChatTemplate._pick)
        reply["chat_template_tool_use"] = template.sources["tool_use"]
    eos = state.tokenizer.eos_token_ids
    if eos:
        reply["eos_token"] = state.tokenizer.id_to_token(eos[0])
    return reply


def default_params(state: ServerState) -> dict:
    """The sampling a request that sets none gets: the model's defaults under the server's flags, as
    `prompting.sampling_params` resolves them. llama-server's names and conventions: seed -1 and
    n_predict -1 mean random and unlimited (up to the context); top_k 0 means off."""
    sampling = sampling_params(state, {})
    n_predict = state.n_predict if state.n_predict is not None and state.n_predict != 0 else -1
    return {
        "n_predict": n_predict,
        "max_tokens": n_predict,
        "seed": sampling.seed if sampling.seed is not None else -1,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repetition_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "ignore_eos": sampling.ignore_eos,
        "stop": list(sampling.stop),
    }
