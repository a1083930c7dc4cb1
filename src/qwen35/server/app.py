"""The FastAPI application: shared state, API key and body-size checks, health, metrics, routes."""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from qwen35 import __version__
from qwen35.engine.service import EngineService
from qwen35.server.errors import APIError, error_payload, install_error_handlers
from qwen35.server.metrics import HTTPCounters, render_metrics

MAX_BODY_BYTES = 32 << 20  # images arrive base64-encoded inside the JSON


@dataclass
class ServerState:
    model: Any
    tokenizer: Any
    service: EngineService
    model_name: str
    model_path: str = ""
    api_key: str | None = None
    started_at: float = field(default_factory=time.time)
    http: HTTPCounters = field(default_factory=HTTPCounters)
    ready: bool = False
    # Server-wide settings (`qwen35 serve` flags, llama-server's spellings); a request's own values win.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # --temp, --top-k, ...: over the model's
    n_predict: int | None = None  # -n: the reply cap of requests that set none (None or < 1: up to the context)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # under each request's
    chat_template: Any = None  # a `ChatTemplate` from --chat-template-file, instead of the model's
    reasoning_format: str = "auto"  # "none": /v1/chat/completions keeps <think>...</think> in content
    reasoning_budget: int = -1  # -1: unlimited; 0: thinking off unless a request turns it on
    pooling: str = "last"  # --pooling: how the embedding routes make one vector of a text's hidden states

    def __post_init__(self):
        template_defaults = {**({"enable_thinking": False} if self.reasoning_budget == 0 else {}),
                             **self.chat_template_kwargs}
        if self.chat_template is not None or template_defaults:
            self.tokenizer = ServedTokenizer(self.tokenizer, self.chat_template, template_defaults)

    @property
    def context_length(self) -> int:
        return self.service.context_length

    @property
    def generation_defaults(self) -> dict:
        """The model's generation defaults under the server's sampling flags: what a request that sets
        no sampling option gets (`prompting.sampling_params` reads them here)."""
        defaults = dict(self.model.generation_defaults or {})
        if "temperature" in self.sampling_defaults:
            defaults.pop("do_sample", None)  # generation_config's do_sample=false would mean greedy
        return {**defaults, **self.sampling_defaults}

    def limit_reply(self, job, requested: bool):
        """-n: a request that set no reply limit (`requested` False) stops after n_predict tokens,
        still within the context. The job, capped."""
        if not requested and self.n_predict is not None and self.n_predict > 0:
            job.request.max_new_tokens = min(job.request.max_new_tokens, self.n_predict)
        return job

    @property
    def vocab_size(self) -> int:
        return min(self.model.config.vocab_size, self.tokenizer.vocab_size)

    @property
    def model_names(self) -> set[str]:
        # Ollama clients add ":latest" to a bare name.
        return {self.model_name, f"{self.model_name}:latest"}


class ServedTokenizer:
    """The model's tokenizer as the server renders conversations: with --chat-template-file's template
    instead of the model's, and --chat-template-kwargs under each request's own variables. Everything
    else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, template=None, template_defaults: dict[str, Any] | None = None):
        self.wrapped = tokenizer
        self.template = template
        self.template_defaults = dict(template_defaults or {})

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    @property
    def chat_template(self):
        return self.template if self.template is not None else self.wrapped.chat_template

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, **template_kwargs) -> str:
        variables = {**self.template_defaults, **template_kwargs}
        if self.template is None:
            return self.wrapped.apply_chat_template(messages, tools=tools,
                                                    add_generation_prompt=add_generation_prompt, **variables)
        return self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables)


def get_state(request: Request) -> ServerState:
    return request.app.state.qwen35


def check_api_key(request: Request) -> None:
    expected = get_state(request).api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY' "
                            "(or 'x-api-key: KEY').",
                       code="invalid_api_key")


class BodyLimit:
    """Answers 413 to a body over `limit` bytes, whether it declares its length or streams it."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send)
        except _BodyTooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        body, status = error_payload(scope.get("path", ""),
                                     APIError(413, f"The request body is over {self.limit >> 20} MiB."))
        response = JSONResponse(body, status)
        await response({"type": "http"}, None, send)


class _BodyTooLarge(Exception):
    pass


class AssumeJSON:
    """Reads every POST body as JSON whatever its content type: `curl -d '{...}'` (as Ollama's own docs
    write it) sends application/x-www-form-urlencoded, and llama.cpp and Ollama accept that."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.service.start(asyncio.get_running_loop())
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            await asyncio.to_thread(state.service.close)

    app = FastAPI(title="qwen35", version=__version__, lifespan=lifespan,
                  description="OpenAI- and Ollama-compatible server for the Qwen 3.5 family.")
    app.state.qwen35 = state
    install_error_handlers(app)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        state.http.record(route.path if route is not None else "unmatched", response.status_code)
        return response

    app.add_middleware(AssumeJSON)
    app.add_middleware(BodyLimit)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False,
                   response_class=PlainTextResponse)
    async def root():
        return PlainTextResponse("qwen35 is running")

    @app.get("/health", summary="Liveness and readiness")
    @app.get("/v1/health", summary="Liveness and readiness (llama-server's alias of /health)")
    async def health():
        if not state.ready:
            raise APIError(503, "The model is still loading.", code="loading", headers={"Retry-After": "2"})
        return {"status": "ok", "model": state.model_name, "running": state.service.running,
                "waiting": state.service.queue_depth}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             dependencies=[Depends(check_api_key)])
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    from qwen35.server.anthropic_routes import router as anthropic_router
    from qwen35.server.embedding_routes import router as embedding_router
    from qwen35.server.llamacpp_routes import router as llamacpp_router
    from qwen35.server.ollama_routes import router as ollama_router
    from qwen35.server.openai_routes import router as openai_router
    from qwen35.server.responses_routes import router as responses_router

    for router in (embedding_router, openai_router, responses_router, anthropic_router, ollama_router,
                   llamacpp_router):
        app.include_router(router, dependencies=[Depends(check_api_key)])
    return app
