"""Ollama's native API: /api/chat and /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps,
/api/version (/api/embed and /api/embeddings: embedding_routes.py). Requests become the same engine jobs as
OpenAI's; only the wire format differs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen35 import __version__
from qwen35.chat.parser import prompt_ends_in_reasoning
from qwen35.hub.details import served_model_details, show_response
from qwen35.server.app import ServerState, get_state
from qwen35.server.constraints import constraint_for_ollama
from qwen35.server.errors import APIError, OllamaErrorBody, documented_errors
from qwen35.server.images import check_vision, decode_base64_image
from qwen35.server.prompting import (Conversation, check_context, check_model_name, check_request, make_job,
                                     prepare_next_turn, render_chat, sampling_params, start_job, template_messages)
from qwen35.server.schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaShowRequest
from qwen35.server.stream import ChatText, End, PlainText

router = APIRouter(responses=documented_errors(OllamaErrorBody))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _sampling(state, options: OllamaOptions | None):
    """(sampling, max_tokens, stop, whether the request set num_predict: -1 there means no limit, not -n's)."""
    options = options or OllamaOptions()
    max_tokens = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    sampling = sampling_params(state, {
        "temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k,
        "min_p": options.min_p, "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty, "repetition_penalty": options.repeat_penalty,
        "seed": options.seed})
    return sampling, max_tokens, options.stop, options.num_predict is not None


def _template_kwargs(think) -> dict:
    return {} if think is None else {"enable_thinking": bool(think)}


def _details(state: ServerState) -> dict:
    return served_model_details(state.model_path, state.model, state.started_at).summary()


async def _ndjson(stream, started: float, shape, on_end=None) -> AsyncIterator[str]:
    """One JSON object per line; `shape(text, thinking, tool_calls)` builds each line's payload.
    `on_end(text, thinking, tool_calls)`, awaited before the last line, sees the whole reply."""
    first_token_at = None
    text, thinking, tool_calls = [], [], []
    async for item in stream:
        now = time.perf_counter()
        if isinstance(item, End):
            if item.error is not None:
                yield json.dumps({"error": f"Generation failed: {item.error}"}) + "\n"
                return
            if on_end is not None:
                await on_end("".join(text), "".join(thinking), tool_calls)
            now = time.perf_counter()
            prompt_done = first_token_at or now
            final = {**shape("", "", []), "done": True,
                     "done_reason": "length" if item.finish_reason == "length" else "stop",
                     "total_duration": int((now - started) * 1e9), "load_duration": 0,
                     "prompt_eval_count": item.prompt_tokens,
                     "prompt_eval_duration": int((prompt_done - started) * 1e9),
                     "eval_count": item.completion_tokens, "eval_duration": int((now - prompt_done) * 1e9)}
            yield json.dumps(final, ensure_ascii=False) + "\n"
            return
        first_token_at = first_token_at or now
        calls = [{"function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                 for call in item.tool_calls]
        text.append(item.content)
        thinking.append(item.reasoning)
        tool_calls.extend((call["function"]["name"], call["function"]["arguments"]) for call in calls)
        if item.content or item.reasoning or calls:
            yield json.dumps({**shape(item.content, item.reasoning, calls), "done": False}, ensure_ascii=False) + "\n"


async def _folded(lines: AsyncIterator[str], text_key: str) -> dict:
    """The non-streamed Ollama reply: every line merged into the last one."""
    text, thinking, calls, last = [], [], [], {}
    async for line in lines:
        last = json.loads(line)
        if "error" in last:
            raise APIError(500, last["error"])
        part = last.get("message", last)
        text.append(part.get(text_key, "") or "")
        thinking.append(part.get("thinking", "") or "")
        calls.extend(part.get("tool_calls") or [])
    target = last.get("message", last)
    target[text_key] = "".join(text)
    if any(thinking):
        target["thinking"] = "".join(thinking)
    if calls:
        target["tool_calls"] = calls
    return last


def _respond(body, lines: AsyncIterator[str], text_key: str):
    if body.stream:
        return StreamingResponse(lines, media_type="application/x-ndjson")
    return _folded(lines, text_key)


async def _image_tokens(state, images: list[list[bytes]]) -> list[int]:
    """Per message, the prompt tokens its images add once each placeholder is expanded (the images are
    resized, off the event loop, to count them; the vision tower runs later, on the kept ones only)."""
    if not any(images):
        return [0] * len(images)
    from qwen35.chat.images import preprocess_image

    def count() -> list[int]:
        settings = state.model.image_settings
        return [sum(preprocess_image(image, settings).num_tokens - 1 for image in message_images)
                for message_images in images]

    return await asyncio.to_thread(count)


def fit_conversation(messages: list[dict], make):
    """The job of the newest part of the conversation that fits the context, as Ollama truncates a chat
    (its server/prompt.go): the oldest messages go first, the system messages stay, and so does the last
    user message with everything after it; a conversation that does not fit even then is refused as
    before. `make(kept_indices)` builds the job of those messages or raises a context_length_exceeded
    APIError. The kept part starts at a user message, so the template sees whole turns."""
    everything = list(range(len(messages)))
    try:
        return make(everything)
    except APIError as error:
        if error.code != "context_length_exceeded":
            raise
        too_long = error
    starts = [index for index, message in enumerate(messages)
              if message.get("role") == "user" and any(m.get("role") != "system" for m in messages[:index])]
    low, high, fitting = 0, len(starts), None  # bisection: fewer messages never need more tokens
    while low < high:
        middle = (low + high) // 2
        start = starts[middle]
        kept = [index for index in range(start) if messages[index].get("role") == "system"] + everything[start:]
        try:
            fitting = make(kept)
            high = middle
        except APIError as error:
            if error.code != "context_length_exceeded":
                raise
            low = middle + 1
    if fitting is None:
        raise too_long
    return fitting


@router.post("/api/chat", summary="Ollama chat (NDJSON stream unless stream is false)")
async def ollama_chat(body: OllamaChatRequest, request: Request):
    state = get_state(request)
    check_request(state, body)
    started = time.perf_counter()
    messages, images = [], []  # images[i]: the images of messages[i]
    for index, message in enumerate(body.messages):
        converted = {"role": message.role, "content": message.content or ""}
        images.append([decode_base64_image(image, f"messages.{index}.images.{number}")
                       for number, image in enumerate(message.images or [])])
        if message.images:  # the images first, then the text, as one message of parts
            converted["content"] = [{"type": "image"} for _ in message.images] + \
                [{"type": "text", "text": message.content or ""}]
        if message.thinking:
            converted["reasoning_content"] = message.thinking
        if message.tool_calls:
            converted["tool_calls"] = [{"function": call.function.model_dump()} for call in message.tool_calls]
        messages.append(converted)
    if not messages:  # Ollama answers an empty chat by loading the model
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    check_vision(state, sum(map(len, images)), "messages")
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] or None
    messages = template_messages(messages)
    sampling, max_tokens, stop, limited = _sampling(state, body.options)
    image_tokens = await _image_tokens(state, images)

    def chat_job(kept: list[int]):
        kept_images = [image for index in kept for image in images[index]]  # a dropped message's go with it
        conversation = Conversation([messages[index] for index in kept], tools, _template_kwargs(body.think),
                                    has_images=bool(kept_images))
        prompt_text = render_chat(state, conversation.messages, tools, conversation.template_kwargs)
        thinking = prompt_ends_in_reasoning(prompt_text)
        job = make_job(state, prompt_text, max_tokens=max_tokens, sampling=sampling, stop=stop,
                       parser=ChatText(tools=tools, thinking=thinking),
                       constraint=constraint_for_ollama(state.tokenizer, state.vocab_size, body.format, thinking))
        job.conversation, job.images = conversation, kept_images or None
        if kept_images:  # each image's one placeholder becomes its tokens: does the prompt still fit?
            check_context(state.context_length, len(job.request.prompt_ids) + sum(image_tokens[i] for i in kept),
                          max_tokens)
        return state.limit_reply(job, requested=limited)

    job = fit_conversation(messages, chat_job)
    conversation = job.conversation
    stream = await start_job(state, job, request)

    def shape(text, reasoning, calls):
        message = {"role": "assistant", "content": text}
        if reasoning:
            message["thinking"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return {"model": body.model, "created_at": _now(), "message": message}

    async def next_turn(text, thinking, calls):
        await prepare_next_turn(state, conversation, text, thinking, calls)

    result = _respond(body, _ndjson(stream, started, shape, next_turn), "content")
    return result if body.stream else await result


@router.post("/api/generate", summary="Ollama text generation (NDJSON stream unless stream is false)")
async def ollama_generate(body: OllamaGenerateRequest, request: Request):
    state = get_state(request)
    check_request(state, body)
    started = time.perf_counter()
    images = [decode_base64_image(image, f"images.{number}") for number, image in enumerate(body.images or [])]
    check_vision(state, len(images), "images")
    if images and body.raw:
        raise APIError(400, "raw prompts cannot carry images: the chat template places them.", param="images")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by Qwen 3.5.", param="suffix")
    if not body.prompt:
        return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    if body.raw:
        prompt_text, parser, thinking = body.prompt, PlainText(), False
    else:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": body.prompt}] \
            if images else body.prompt
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": content}]
        prompt_text = render_chat(state, messages, None, _template_kwargs(body.think))
        thinking = prompt_ends_in_reasoning(prompt_text)
        parser = ChatText(thinking=thinking)
    sampling, max_tokens, stop, limited = _sampling(state, body.options)
    job = make_job(state, prompt_text, max_tokens=max_tokens, sampling=sampling, stop=stop, parser=parser,
                   constraint=constraint_for_ollama(state.tokenizer, state.vocab_size, body.format, thinking))
    job.images = images or None
    state.limit_reply(job, requested=limited)
    stream = await start_job(state, job, request)

    def shape(text, reasoning, calls):
        payload = {"model": body.model, "created_at": _now(), "response": text}
        if reasoning:
            payload["thinking"] = reasoning
        return payload

    result = _respond(body, _ndjson(stream, started, shape), "response")
    return result if body.stream else await result


@router.get("/api/tags", summary="Ollama: models available")
async def ollama_tags(request: Request):
    state = get_state(request)
    modified = datetime.fromtimestamp(state.started_at, timezone.utc).isoformat()
    return {"models": [{"name": state.model_name, "model": state.model_name, "modified_at": modified,
                        "size": state.model.nbytes(), "digest": "", "details": _details(state)}]}


@router.get("/api/ps", summary="Ollama: models loaded")
async def ollama_ps(request: Request):
    state = get_state(request)
    return {"models": [{"name": state.model_name, "model": state.model_name, "size": state.model.nbytes(),
                        "digest": "", "details": _details(state), "expires_at": "9999-12-31T23:59:59Z",
                        "size_vram": 0, "context_length": state.context_length}]}


@router.post("/api/show", summary="Ollama: model details")
async def ollama_show(body: OllamaShowRequest, request: Request):
    state = get_state(request)
    check_model_name(state, body.model or body.name or "")
    details = await asyncio.to_thread(served_model_details, state.model_path, state.model, state.started_at)
    return show_response(details, parameters=state.generation_defaults, verbose=bool(body.verbose),
                         name=state.model_name)


@router.api_route("/api/{action}", methods=["POST", "DELETE"], include_in_schema=False)
async def ollama_model_management(action: str):
    if action in ("pull", "push", "create", "copy", "delete", "blobs"):
        raise APIError(501, f"/api/{action} is not supported: this server serves the one model it was "
                            f"started with (qwen35 serve MODEL).")
    raise APIError(404, f"Unknown route /api/{action}.")


@router.get("/api/version", summary="Ollama: server version")
async def ollama_version():
    return {"version": __version__}
