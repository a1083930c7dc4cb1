"""Which constraint a request's output must follow (JSON mode, JSON schema, a forced tool call)."""

from __future__ import annotations

from qwen35.server.errors import APIError


def constraint_for_chat(tokenizer, vocab_size: int, response_format, forced_function: str | None, thinking: bool):
    if response_format is not None and response_format.type != "text":
        raise APIError(400, "response_format json_object/json_schema is not supported yet.", param="response_format")
    return None


def constraint_for_ollama(tokenizer, vocab_size: int, output_format, thinking: bool):
    if output_format:
        raise APIError(400, "format json / a JSON schema is not supported yet.", param="format")
    return None
