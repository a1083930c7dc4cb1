"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with a fitting status;
Ollama's on its /api routes and Anthropic's on /v1/messages.

Every failure a client can cause ends here, so a bad request never takes the server down and the
client always gets one readable sentence saying what to change.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen35.engine.service import QueueFullError, ServiceClosedError
from qwen35.errors import Qwen35Error

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "invalid_request_error",
    503: "server_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error body (its /v1/messages routes)."""

    type: str = "error"
    error: AnthropicErrorDetail


class OllamaErrorBody(BaseModel):
    """Ollama's error body (its /api routes)."""

    error: str


_MEANINGS = {400: "Bad request (malformed JSON, a prompt over the context, ...)", 401: "Missing or wrong API key",
             404: "Unknown model or route", 413: "Request body too large", 422: "A field of the wrong type or range",
             429: "Queue full: retry after Retry-After seconds", 500: "Generation failed",
             501: "Not supported by this server (model management)",
             503: "Shutting down or still loading"}


def documented_errors(body_model) -> dict:
    """The `responses=` of a router: each error status with its body, for /openapi.json."""
    return {status: {"model": body_model, "description": meaning} for status, meaning in _MEANINGS.items()}


class APIError(Exception):
    """An error answered to the client as it is: status, one sentence, and OpenAI's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE_BY_STATUS.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# Anthropic answers no 422 (a malformed field is a 400) and says "overloaded" with 529 where we say 503.
# Anthropic answers no 422 (a malformed field is a 400) and says "overloaded" with 529 where we say 503.
_ANTHROPIC_STATUS = {422: 400, 503: 529}
_ANTHROPIC_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                             404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                             500: "api_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPE_BY_STATUS.get(status, "invalid_request_error"),
                                       "message": message}}


def error_payload(path: str, error: APIError) -> tuple[dict, int]:
    """The body and status of `error` in the shape the clients of `path` read."""
    if path.startswith("/api/"):
        return {"error": error.message}, error.status
    if is_anthropic_path(path):
        status = _ANTHROPIC_STATUS.get(error.status, error.status)
        return anthropic_error_body(status, error.message), status
    return error_body(error.status, error.message, error.param, error.code), error.status


def error_response(error: APIError, request: Request | None = None) -> JSONResponse:
    """OpenAI's error body; Ollama's own (`{"error": "..."}`) on its /api routes and Anthropic's on
    /v1/messages, which their clients read."""
    body, status = error_payload(request.url.path if request is not None else "", error)
    return JSONResponse(body, status_code=status, headers=error.headers)


def _describe_validation(errors: list[dict]) -> tuple[int, str, str | None, str]:
    """The first problem of a pydantic report as (status, sentence, param, code)."""
    # A value that fits no branch of a union gets one error per branch; the one about a limit
    # ("at most 64 items") says more than "should be a valid string".
    errors = sorted(errors, key=lambda error: str(error.get("type", "")).endswith("_type"))
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return 400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}.", \
            None, "invalid_json"
    location = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_branch_tag(part)]
    param = ".".join(location) or None
    if first.get("type") == "missing" and not location:
        return 400, "The request needs a JSON body.", None, "missing_body"
    where = f"'{param}'" if param else "the request body"
    message = f"Invalid value for {where}: {first.get('msg', 'invalid value')}."
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in this request.)"
    return 422, message, param, first.get("type")


def _is_branch_tag(part) -> bool:
    """pydantic names union branches in error locations ('str', 'list[str]', 'function-after[...]')."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none", "dict", "list"}
                                      or "[" in part or part.startswith(("function-", "literal")))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        status, message, param, code = _describe_validation(list(error.errors()))
        return error_response(APIError(status, message, param=param, code=code), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"Unknown route {request.method} {request.url.path}.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(
            error.status_code, str(error.detail))
        return error_response(APIError(error.status_code, message, headers=error.headers), request)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, error: QueueFullError):
        return error_response(APIError(429, str(error), code="queue_full",
                                       headers={"Retry-After": str(error.retry_after_s)}), request)

    @app.exception_handler(ServiceClosedError)
    async def _closed(request: Request, error: ServiceClosedError):
        return error_response(APIError(503, str(error), code="unavailable", headers={"Retry-After": "5"}), request)

    @app.exception_handler(Qwen35Error)
    async def _input_error(request: Request, error: Qwen35Error):
        return error_response(APIError(400, str(error)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        # A bug, not the client's fault; the server keeps serving and says so plainly.
        return error_response(APIError(500, f"Internal error: {type(error).__name__}: {error}"), request)
