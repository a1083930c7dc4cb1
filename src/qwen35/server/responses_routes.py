"""OpenAI's Responses API: POST /v1/responses (SSE events or one response object), and the stored
responses: GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.

A request is turned into the chat-completions request it means (responses_input.py) and runs as
that one does; its reply is built from the same stream of deltas (responses_output.py). Stored
responses (`store`, true by default as OpenAI's) live in this process's memory only, in a bounded
LRU: a restart or enough newer responses forget them, and `previous_response_id` then answers 404.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from qwen35.server.app import get_state
from qwen35.server.errors import APIError, ErrorBody, documented_errors
from qwen35.server.openai_routes import SSE_HEADERS, chat_job
from qwen35.server.prompting import check_model_name, check_text, prepare_next_turn, start_job
from qwen35.server.responses_input import (ResponsesRequest, chat_request, check_images, check_supported,
                                           input_items)
from qwen35.server.responses_output import OutputBuilder, new_id, reasoning_tokens, response_object, usage
from qwen35.server.schemas import ChatCompletionRequest
from qwen35.server.stream import End

router = APIRouter(responses=documented_errors(ErrorBody))

MAX_STORED_RESPONSES = 256
MAX_STORED_BYTES = 256 << 20  # images ride along in the conversations, base64 as sent


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # this request's input, with ids
    conversation: list[dict[str, Any]]  # every item so far, earlier responses' included: what a follow-up extends
    nbytes: int


class ResponseStore:
    """Stored responses by id, least recently used first out, within a count and a byte budget."""

    def __init__(self, max_entries: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, entry: StoredResponse) -> None:
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole budget: kept by no one
        self.delete(response_id)
        self._entries[response_id] = entry
        self.nbytes += entry.nbytes
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry is not None


def response_store(request: Request) -> ResponseStore:
    app_state = request.app.state
    store = getattr(app_state, "responses", None)
    if store is None:
        store = app_state.responses = ResponseStore()
    return store


def _stored(request: Request, response_id: str, param: str | None = None) -> StoredResponse:
    entry = response_store(request).get(response_id)
    if entry is None:
        raise APIError(404, f"No response with id '{response_id}' is stored here (stored responses live in the "
                            f"server's memory only: a restart or many newer responses forget them).",
                       param=param, code="previous_response_not_found" if param else "response_not_found")
    return entry


# --- from a request to a job ----------------------------------------------------------------------

_CHAT_PARAMS = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens",
                "prompt": "input"}


def _in_responses_terms(error: APIError) -> APIError:
    """Errors of the chat path name chat's fields; say the Responses API's instead."""
    head, dot, rest = (error.param or "").partition(".")
    if head in ("messages", "prompt"):  # chat's message indexes are not the input's
        error.param = "input"
    elif head in _CHAT_PARAMS:
        error.param = _CHAT_PARAMS[head] + dot + rest
    error.message = error.message.replace("Lower max_tokens", "Lower max_output_tokens")
    return error


def _turn_cuts(items: list[dict[str, Any]]) -> tuple[int, list[int]]:
    """Where the conversation may be cut: the leading system and developer messages (kept), and the
    places where a later turn begins (a user message after the first item)."""
    def is_message(item, roles) -> bool:
        return item.get("type") in (None, "message") and item.get("role") in roles

    keep = 0
    while keep < len(items) and is_message(items[keep], ("system", "developer")):
        keep += 1
    return keep, [index for index in range(keep + 1, len(items)) if is_message(items[index], ("user",))]


def _chat_job(state, body: ResponsesRequest, items: list[dict[str, Any]], history: int):
    try:
        return chat_job(state, ChatCompletionRequest.model_validate(chat_request(body, items, history)))
    except ValidationError as error:
        raise APIError(400, f"The input cannot be read as a conversation: {error.errors()[0]['msg']}.",
                       param="input") from None


def responses_job(state, body: ResponsesRequest, items: list[dict[str, Any]], history: int = 0):
    """The engine job for this request, its conversation being `items` (the first `history` of them from
    earlier responses). With truncation "auto" an over-long conversation loses its oldest turns, as few
    as make it fit (found by bisection: each try renders and tokenizes the whole prompt)."""
    try:
        return _chat_job(state, body, items, history)
    except APIError as error:
        if body.truncation != "auto" or error.code != "context_length_exceeded":
            raise _in_responses_terms(error) from None
        too_long = error
    keep, cuts = _turn_cuts(items)
    low, high, fitting = 0, len(cuts), None
    while low < high:
        middle = (low + high) // 2
        shorter = items[:keep] + items[cuts[middle]:]
        try:
            fitting = _chat_job(state, body, shorter, max(0, history - (len(items) - len(shorter))))
            high = middle
        except APIError as error:
            if error.code != "context_length_exceeded":
                raise _in_responses_terms(error) from None
            low = middle + 1
    if fitting is None:
        raise _in_responses_terms(too_long) from None
    return fitting


# --- POST /v1/responses ---------------------------------------------------------------------------

_ID_PREFIXES = {"function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}  # else a message


@router.post("/v1/responses", summary="Create a model response (OpenAI's Responses API; SSE events when "
                                      "stream is true)")
async def create_response(body: ResponsesRequest, request: Request):
    state = get_state(request)
    check_text(body.model_dump())
    check_model_name(state, body.model)
    check_supported(body)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        history = _stored(request, body.previous_response_id, "previous_response_id").conversation
    new_items = [item if "id" in item else {"id": new_id(_ID_PREFIXES.get(item.get("type"), "msg")), **item}
                 for item in input_items(body)]
    check_images(new_items)
    job = responses_job(state, body, history + new_items, len(history))
    stream = await start_job(state, job, request)
    reply = _Reply(state, body, job, response_store(request), history, new_items)
    if body.stream:
        return StreamingResponse(reply.events(stream), media_type="text/event-stream", headers=SSE_HEADERS)
    async for item in stream:
        if isinstance(item, End):
            if item.error is not None:
                raise APIError(500, f"Generation failed: {item.error}")
            response, _ = await reply.finish(item)
            return response
        reply.builder.feed(item)
    raise APIError(500, "Generation ended without a result.")


class _Reply:
    """One response being generated: its output so far, and what happens once it ends."""

    def __init__(self, state, body: ResponsesRequest, job, store: ResponseStore, history, new_items):
        self.state, self.body, self.job, self.store = state, body, job, store
        self.history, self.new_items = history, new_items
        self.builder = OutputBuilder(body.max_tool_calls)
        self.id, self.created_at = new_id("resp"), int(time.time())

    def response(self, status: str, **fields) -> dict[str, Any]:
        return response_object(self.body, self.id, self.created_at, self.state, status=status,
                               output=list(self.builder.items), **fields)

    async def finish(self, end: End) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The final response object and the events that close its last item; stored if asked, and the
        conversation's next turn prepared in the engine's prefix cache."""
        if end.error is not None:
            events = self.builder.close("incomplete")
            return self.response("failed", error={"code": "server_error",
                                                  "message": f"Generation failed: {end.error}"}), events
        cut_short = end.finish_reason == "length"
        events = self.builder.close("incomplete" if cut_short else "completed")
        response = self.response("incomplete" if cut_short else "completed",
                                 usage_data=usage(end, reasoning_tokens(self.state.tokenizer, self.builder)),
                                 incomplete_reason="max_output_tokens" if cut_short else None)
        response["completed_at"] = int(time.time()) if not cut_short else None
        if self.body.store and end.finish_reason != "cancelled":  # (cancelled: the client went away)
            conversation = self.history + self.new_items + self.builder.items
            size = len(json.dumps([response, self.new_items, conversation], ensure_ascii=False))
            self.store.put(self.id, StoredResponse(response, self.new_items, conversation, size))
        calls = [(call.name, json.loads(call.arguments)) for call in self.builder.calls]
        await prepare_next_turn(self.state, self.job.conversation, "".join(self.builder.content),
                                "".join(self.builder.reasoning), calls)
        return response, events

    async def events(self, stream) -> AsyncIterator[str]:
        sequence = 0

        def sse(event: dict[str, Any]) -> str:
            nonlocal sequence
            event["sequence_number"] = sequence
            sequence += 1
            return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

        started = self.response("in_progress")
        yield sse({"type": "response.created", "response": started})
        yield sse({"type": "response.in_progress", "response": dict(started)})
        async for item in stream:
            if isinstance(item, End):
                response, closing = await self.finish(item)
                for event in closing:
                    yield sse(event)
                kind = {"completed": "response.completed", "incomplete": "response.incomplete",
                        "failed": "response.failed"}[response["status"]]
                yield sse({"type": kind, "response": response})
                return
            for event in self.builder.feed(item):
                yield sse(event)


# --- stored responses -----------------------------------------------------------------------------


@router.get("/v1/responses/{response_id}", summary="A stored response")
async def get_response(response_id: str, request: Request):
    return _stored(request, response_id).response


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response")
async def delete_response(response_id: str, request: Request):
    _stored(request, response_id)
    response_store(request).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", summary="The input items of a stored response")
async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None):
    items = list(_stored(request, response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise APIError(400, f"No input item with id '{after}' in this response.", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None, "has_more": len(items) > limit}
