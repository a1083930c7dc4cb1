"""OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions (SSE streams or folded replies)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qwen35.chat.parser import prompt_ends_in_reasoning
from qwen35.server.app import ServerState, get_state
from qwen35.server.constraints import constraint_for_chat
from qwen35.server.errors import APIError, ErrorBody, documented_errors, error_body
from qwen35.server.images import check_vision, openai_images
from qwen35.server.prompting import (Conversation, check_model_name, check_request, make_job,
                                     prepare_next_turn, render_chat, sampling_params, start_job, template_messages)
from qwen35.server.schemas import ChatCompletionRequest, CompletionRequest
from qwen35.server.stream import ChatText, Delta, End, Folded, fold

router = APIRouter(responses=documented_errors(ErrorBody))

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(end: End) -> dict:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": end.cached_tokens}}


def _sampling_options(body) -> dict:
    return {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "repetition_penalty": body.repetition_penalty, "seed": body.seed, "ignore_eos": body.ignore_eos}


def _token_logprob(tokenizer, token) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        data = tokenizer.token_bytes(token_id)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    result = entry(token.token_id, token.logprob)
    result["top_logprobs"] = [entry(token_id, value) for token_id, value in token.top_logprobs or []]
    return result


def _finish_reason(end: End, saw_tool_calls: bool) -> str:
    if end.error is not None:
        return "error"
    if saw_tool_calls and end.finish_reason == "stop":
        return "tool_calls"
    return "length" if end.finish_reason == "length" else "stop"


def _model_entry(state: ServerState) -> dict:
    """The served model in OpenAI's and Anthropic's shapes at once: each client ignores the other's fields."""
    created = datetime.fromtimestamp(state.started_at, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"id": state.model_name, "object": "model", "created": int(state.started_at), "owned_by": "qwen35",
            "type": "model", "display_name": state.model_name, "created_at": created}


@router.get("/v1/models", summary="The served model (OpenAI's list, with Anthropic's fields)")
async def list_models(request: Request):
    state = get_state(request)
    return {"object": "list", "data": [_model_entry(state)], "has_more": False,
            "first_id": state.model_name, "last_id": state.model_name}


@router.get("/v1/models/{model_id:path}", summary="One model")
async def get_model(model_id: str, request: Request):
    state = get_state(request)
    check_model_name(state, model_id)
    return _model_entry(state)


# --- chat ---------------------------------------------------------------------------------------


def _chat_tools(body: ChatCompletionRequest) -> tuple[list[dict] | None, str | None]:
    """The tools the template shows and the function the reply must call (None: free choice)."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    names = {tool["function"]["name"] for tool in tools}
    if choice == "none":
        return None, None
    if choice is None or choice == "auto":
        return tools or None, None
    if not tools:
        raise APIError(400, "tool_choice asks for a tool call, but the request has no tools.", param="tool_choice")
    if choice == "required":
        return tools, ""
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names the function '{choice.function.name}', which is not among the "
                            f"request's tools ({', '.join(sorted(names))}).", param="tool_choice")
    return tools, choice.function.name


def chat_job(state: ServerState, body: ChatCompletionRequest):
    check_request(state, body)
    messages = template_messages([message.model_dump(exclude_none=True) for message in body.messages])
    images = openai_images(messages)
    check_vision(state, len(images), "messages")
    tools, forced_function = _chat_tools(body)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort == "none":  # OpenAI's spelling of "no reasoning"
        template_kwargs.setdefault("enable_thinking", False)
    prompt_text = render_chat(state, messages, tools, template_kwargs)
    thinking = prompt_ends_in_reasoning(prompt_text)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    constraint = constraint_for_chat(state.tokenizer, state.vocab_size, body.response_format, tools,
                                     forced_function, thinking)
    job = make_job(state, prompt_text, max_tokens=max_tokens,
                   sampling=sampling_params(state, _sampling_options(body)), stop=body.stop,
                   parser=ChatText(tools=tools, thinking=thinking, calls_allowed=body.tool_choice != "none",
                                   max_calls=1 if body.parallel_tool_calls is False else None,
                                   reasoning_inline=state.reasoning_format == "none"),
                   top_logprobs=(body.top_logprobs or 0) if body.logprobs else None, constraint=constraint,
                   reasoning_budget=body.thinking_budget)
    state.limit_reply(job, requested=max_tokens is not None)
    job.conversation = Conversation(messages, tools, template_kwargs, has_images=bool(images))
    job.images = images or None
    return job


def _calls_for_template(calls) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


@router.post("/v1/chat/completions", summary="Chat completion (streamed as SSE when stream is true)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    job = chat_job(state, body)
    stream = await start_job(state, job, request)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_events(state, stream, reply_id, created, body.model, include_usage,
                                              job.conversation),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    folded = await fold(stream)
    if folded.end.error is None:
        await prepare_next_turn(state, job.conversation, folded.content, folded.reasoning,
                                _calls_for_template(folded.tool_calls))
    return _chat_reply(state, folded, reply_id, created, body.model)


def _chat_reply(state, folded: Folded, reply_id: str, created: int, model: str) -> dict:
    end = folded.end
    if end.error is not None:
        raise APIError(500, f"Generation failed: {end.error}")
    message = {"role": "assistant", "content": folded.content or (None if folded.tool_calls else "")}
    if folded.reasoning:
        message["reasoning_content"] = folded.reasoning
    if folded.tool_calls:
        message["tool_calls"] = [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}
                                 for call in folded.tool_calls]
    logprobs = None
    if folded.logprobs:
        logprobs = {"content": [_token_logprob(state.tokenizer, token) for token in folded.logprobs]}
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": _finish_reason(end, bool(folded.tool_calls))}],
            "usage": _usage(end)}


async def _chat_events(state, stream: AsyncIterator[Delta | End], reply_id: str, created: int, model: str,
                       include_usage: bool, conversation: Conversation | None = None) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason=None, logprobs=None) -> dict:
        return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    yield _sse(chunk({"role": "assistant", "content": ""}))
    tool_index = 0
    content, reasoning, calls = [], [], []  # the reply as the client assembles it, for the next turn
    async for item in stream:
        if isinstance(item, End):
            if item.error is not None:
                yield _sse(error_body(500, f"Generation failed: {item.error}"))
            else:
                yield _sse(chunk({}, _finish_reason(item, tool_index > 0)))
            if include_usage:
                yield _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(item)})
            if item.error is None:  # before [DONE], so that a client's next turn comes after it
                await prepare_next_turn(state, conversation, "".join(content), "".join(reasoning),
                                        _calls_for_template(calls))
            yield _sse("[DONE]")
            return
        content.append(item.content)
        reasoning.append(item.reasoning)
        calls.extend(item.tool_calls)
        delta: dict = {}
        if item.reasoning:
            delta["reasoning_content"] = item.reasoning
        if item.content:
            delta["content"] = item.content
        if item.tool_calls:
            delta["tool_calls"] = []
            for call in item.tool_calls:
                delta["tool_calls"].append({"index": tool_index, "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": call.arguments}})
                tool_index += 1
        logprobs = None
        if item.logprobs:
            logprobs = {"content": [_token_logprob(state.tokenizer, token) for token in item.logprobs]}
        if delta or logprobs:
            yield _sse(chunk(delta, logprobs=logprobs))


# --- text completions ---------------------------------------------------------------------------


@router.post("/v1/completions", summary="Text completion (streamed as SSE when stream is true)")
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    check_request(state, body)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by Qwen 3.5.", param="suffix")
    prompt = body.prompt
    prompt_ids = None
    if isinstance(prompt, list) and prompt and all(isinstance(item, int) for item in prompt):
        prompt_ids, prompt_text = list(prompt), ""
    elif isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "Send one prompt per request (a list of several prompts is not supported).",
                           param="prompt")
        prompt_text = prompt[0]
    else:
        prompt_text = prompt
    # OpenAI's default is 16 tokens; a server started with -n gives its own default instead, as llama-server does.
    max_tokens = body.max_tokens if body.max_tokens is not None or state.n_predict is not None else 16
    job = make_job(state, prompt_text, max_tokens=max_tokens,
                   sampling=sampling_params(state, _sampling_options(body)), stop=body.stop,
                   top_logprobs=body.logprobs, prompt_ids=prompt_ids)
    state.limit_reply(job, requested=max_tokens is not None)
    stream = await start_job(state, job, request)
    reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt_text if body.echo else ""

    def choice(text: str, finish_reason, logprobs=None) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def text_logprobs(tokens) -> dict | None:
        if not tokens:
            return None
        entries = [_token_logprob(state.tokenizer, token) for token in tokens]
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    if not body.stream:
        folded = await fold(stream)
        if folded.end.error is not None:
            raise APIError(500, f"Generation failed: {folded.end.error}")
        return {"id": reply_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [choice(echo + folded.content, _finish_reason(folded.end, False),
                                   text_logprobs(folded.logprobs))],
                "usage": _usage(folded.end)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        def chunk(choices, usage=None) -> dict:
            payload = {"id": reply_id, "object": "text_completion", "created": created, "model": body.model,
                       "choices": choices}
            if usage is not None:
                payload["usage"] = usage
            return payload

        if echo:
            yield _sse(chunk([choice(echo, None)]))
        async for item in stream:
            if isinstance(item, End):
                if item.error is not None:
                    yield _sse(error_body(500, f"Generation failed: {item.error}"))
                else:
                    yield _sse(chunk([choice("", _finish_reason(item, False))]))
                if include_usage:
                    yield _sse(chunk([], _usage(item)))
                yield _sse("[DONE]")
                return
            yield _sse(chunk([choice(item.content, None, text_logprobs(item.logprobs))]))

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
