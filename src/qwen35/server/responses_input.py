"""OpenAI's Responses API, its request side: the body, and its input items as a chat conversation.

A Responses request becomes the chat-completions request it means (`chat_request`), so that both
routes share one path to the engine: the same template rendering, tool-call parsing, thinking
toggle and constrained decoding. Items map onto chat messages thus:

- a message (`role` user/system/developer/assistant; text, `input_image` or `output_text` parts) is
  a message; system and developer messages before the conversation starts join `instructions` in
  the one system message Qwen's template allows;
- `reasoning`, assistant `message` and `function_call` items in a row are one assistant turn (its
  `reasoning_content`, `content` and `tool_calls`), as the model wrote them;
- a `function_call_output` is a `tool` message answering its `call_id`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwen35.server.errors import APIError
from qwen35.server.images import openai_image_bytes
from qwen35.server.prompting import tool_arguments
from qwen35.server.schemas import SamplingOptions, TokenCount

_LENIENT = ConfigDict(extra="ignore", populate_by_name=True)


class TextFormat(BaseModel):
    model_config = _LENIENT
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = _LENIENT
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    model_config = _LENIENT
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: str | None = None  # the older spelling of summary


class ResponsesRequest(SamplingOptions):
    """POST /v1/responses. Like the chat route, unknown fields are ignored and the sampling
    extensions (top_k, min_p, penalties, seed) and chat_template_kwargs are accepted."""

    model_config = _LENIENT
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: TokenCount | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def check_supported(body: ResponsesRequest) -> None:
    """Refuse, in one sentence each, what needs OpenAI's hosted services."""
    if body.background:
        raise APIError(400, "background mode is not supported: send the request without it (stream=true shows "
                            "progress as it happens).", param="background", code="unsupported_parameter")
    if body.conversation is not None:
        raise APIError(400, "conversation objects (the Conversations API) are not supported: continue a "
                            "conversation with previous_response_id, or send the whole input.",
                       param="conversation", code="unsupported_parameter")
    if body.prompt is not None:
        raise APIError(400, "Stored prompt templates (prompt) are not supported: send instructions and input "
                            "instead.", param="prompt", code="unsupported_parameter")


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as a list of items (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}] if body.input else []
    return [dict(item) for item in body.input]


def _item_type(item: dict, where: str) -> str:
    kind = item.get("type")
    if kind is None and "role" in item:
        return "message"  # OpenAI's "easy input message": {role, content}
    if not isinstance(kind, str):
        raise APIError(400, f"{where}: an input item needs a 'type' (message, function_call, function_call_output "
                            f"or reasoning).", param=where)
    return kind


def _text_of(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"{where}: '{field}' must be a string.", param=f"{where}.{field}")
    return value


def _content_parts(content, where: str) -> str | list[dict]:
    """A message's content as chat content: a string, or text and image_url parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of content parts.", param=where)
    parts = []
    for index, part in enumerate(content):
        place = f"{where}.{index}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"):
            field = "refusal" if kind == "refusal" else "text"
            parts.append({"type": "text", "text": _text_of(part.get(field), place, field)})
        elif kind == "input_image":
            if part.get("file_id") and not part.get("image_url"):
                raise APIError(400, f"{place}: images given by file_id need OpenAI's Files API, which this server "
                                    f"does not have; send the image inline as image_url "
                                    f"(data:image/png;base64,...).", param=place, code="file_id_not_supported")
            url = _text_of(part.get("image_url"), place, "image_url")
            image = {"url": url}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind in ("input_file", "input_audio"):
            raise APIError(400, f"{place}: {kind} parts are not supported; this server takes text and images "
                                f"(input_text, input_image).", param=place, code="unsupported_content")
        else:
            raise APIError(400, f"{place}: unknown content part type {kind!r} (expected input_text, input_image or "
                                f"output_text).", param=place)
    return parts


def _plain_text(content: str | list[dict], where: str) -> str:
    if isinstance(content, str):
        return content
    if any(part["type"] != "text" for part in content):
        raise APIError(400, f"{where}: this message can hold text only.", param=where)
    return "".join(part["text"] for part in content)


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: its reasoning_text content, else its summaries."""
    if item.get("content"):
        return _plain_text(_content_parts(item["content"], f"{where}.content"), f"{where}.content")
    summary = item.get("summary") or []
    if not isinstance(summary, list):
        raise APIError(400, f"{where}: summary must be a list of summary_text parts.", param=f"{where}.summary")
    return "\n\n".join(part["text"] for part in _content_parts(summary, f"{where}.summary") if part["type"] == "text")


def _arguments(item: dict, where: str) -> str:
    arguments = item.get("arguments", "")
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    arguments = _text_of(arguments, where, "arguments")
    tool_arguments(arguments, where, f"{where}.arguments")  # checked here, to name the input item
    return arguments if arguments.strip() else "{}"


def check_images(items: list[dict[str, Any]]) -> None:
    """Decode every inline image once, so that a bad one is named by its place in the input."""
    for index, item in enumerate(items):
        for key in ("content", "output"):
            parts = item.get(key) if isinstance(item, dict) else None
            for part_index, part in enumerate(parts if isinstance(parts, list) else []):
                url = part.get("image_url") if isinstance(part, dict) and part.get("type") == "input_image" else None
                if isinstance(url, str):
                    openai_image_bytes(url, f"input.{index}.{key}.{part_index}.image_url")


def chat_messages(instructions: str | None, items: list[dict[str, Any]], history: int = 0) -> list[dict[str, Any]]:
    """The chat messages that `instructions` and the input `items` stand for; the first `history` items
    come from earlier responses (previous_response_id), so errors count the input from after them."""
    system = [instructions] if instructions else []
    messages: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant turn being assembled

    def assistant_turn(new: bool = False) -> dict[str, Any]:
        nonlocal turn
        if turn is None or new:
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for index, item in enumerate(items):
        where = f"input.{index - history}"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: an input item must be an object.", param=where)
        kind = _item_type(item, where)
        if kind == "message":
            role = item.get("role")
            content = _content_parts(item.get("content", ""), f"{where}.content")
            if role == "assistant":
                current = turn
                text = _plain_text(content, f"{where}.content")
                if current is None or current.get("tool_calls"):
                    current = assistant_turn(new=True)
                current["content"] += text
            elif role in ("system", "developer"):
                if messages:
                    raise APIError(400, f"{where}: a {role} message after the conversation has started; Qwen 3.5's "
                                        f"chat template takes system text only at the beginning (put it in "
                                        f"instructions or first in input).", param=where)
                system.append(_plain_text(content, f"{where}.content"))
            elif role == "user":
                turn = None
                messages.append({"role": "user", "content": content})
            else:
                raise APIError(400, f"{where}: unknown role {role!r} (expected user, assistant, system or "
                                    f"developer).", param=f"{where}.role")
        elif kind == "reasoning":
            current = turn
            if current is None or current["content"] or current.get("tool_calls") or "reasoning_content" in current:
                current = assistant_turn(new=True)
            current["reasoning_content"] = _reasoning_text(item, where)
        elif kind == "function_call":
            name = _text_of(item.get("name"), where, "name")
            call_id = _text_of(item.get("call_id"), where, "call_id")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": _arguments(item, where)}}
            assistant_turn().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turn = None
            output = item.get("output")
            content = _content_parts(output, f"{where}.output") if isinstance(output, list) else \
                _text_of(output, where, "output")
            messages.append({"role": "tool", "tool_call_id": _text_of(item.get("call_id"), where, "call_id"),
                             "content": content})
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item references are not supported; send the item itself, or continue "
                                f"with previous_response_id.", param=where, code="unsupported_item")
        else:
            raise APIError(400, f"{where}: items of type {kind!r} are not supported; this server takes messages, "
                                f"function calls and their outputs, and reasoning.", param=f"{where}.type",
                           code="unsupported_item")
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return messages


# --- tools, tool_choice, text.format ---------------------------------------------------------------


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Responses' flat function tools as chat tools ({type, function: {...}})."""
    converted = []
    for index, tool in enumerate(tools or []):
        where = f"tools.{index}"
        kind = tool.get("type")
        if kind != "function":
            raise APIError(400, f"{where}: tools of type {kind!r} are not supported; this server runs a local model "
                                f"and takes function tools only ({{type: 'function', name, parameters}}).",
                           param=f"{where}.type", code="unsupported_tool")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}: a function tool needs a name (Responses tools are flat: "
                                f"{{type: 'function', name, description, parameters}}).", param=f"{where}.name")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict")
                    if tool.get(key) is not None}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice, tools: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The chat tool_choice for Responses' tool_choice, and the tools it leaves on offer."""
    if choice is None or isinstance(choice, str):
        return choice, tools
    kind = choice.get("type")
    if kind == "function":
        return {"type": "function", "function": {"name": _text_of(choice.get("name"), "tool_choice", "name")}}, tools
    if kind == "allowed_tools":
        listed = choice.get("tools")
        if not isinstance(listed, list):
            raise APIError(400, "tool_choice of type allowed_tools needs tools: a list of {type: 'function', name}.",
                           param="tool_choice.tools")
        allowed = {entry["name"] for entry in listed if isinstance(entry, dict) and isinstance(entry.get("name"), str)}
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise APIError(400, "tool_choice.mode must be 'auto' or 'required'.", param="tool_choice.mode")
        return mode, [tool for tool in tools if tool["function"]["name"] in allowed]
    raise APIError(400, f"tool_choice of type {kind!r} is not supported; use 'auto', 'none', 'required', "
                        f"{{type: 'function', name}} or {{type: 'allowed_tools', ...}}.", param="tool_choice",
                   code="unsupported_tool")


def response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """text.format as chat's response_format."""
    spec = text.format if text is not None else None
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return {"type": "json_object"}
    if spec.json_schema is None:
        raise APIError(400, "text.format of type json_schema needs a schema.", param="text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": spec.name or "response", "schema": spec.json_schema,
                                                   "strict": spec.strict}}


def thinking_off(body: ResponsesRequest) -> bool:
    """reasoning.effort "none" or "minimal" turns thinking off: Qwen 3.5 either thinks or does not, and
    "minimal" asks for as little as the model can do."""
    return body.reasoning is not None and body.reasoning.effort in ("none", "minimal")


def chat_request(body: ResponsesRequest, items: list[dict[str, Any]], history: int = 0) -> dict[str, Any]:
    """The chat-completions request (as JSON data) that this Responses request means, its conversation
    being `items` (the first `history` of them from earlier responses)."""
    tools = chat_tools(body.tools)
    tool_choice, offered = chat_tool_choice(body.tool_choice, tools)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if thinking_off(body):
        template_kwargs.setdefault("enable_thinking", False)
    request = {"model": body.model, "messages": chat_messages(body.instructions, items, history),
               "max_completion_tokens": body.max_output_tokens, "tools": offered or None,
               "tool_choice": tool_choice, "parallel_tool_calls": body.parallel_tool_calls,
               "chat_template_kwargs": template_kwargs or None, "response_format": response_format(body.text)}
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed"):
        request[name] = getattr(body, name)
    if not request["messages"]:
        raise APIError(400, "The input is empty: send a message.", param="input")
    return {key: value for key, value in request.items() if value is not None}
