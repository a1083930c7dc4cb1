"""Serve a model over HTTP with OpenAI- (chat, completions, responses), Anthropic- and Ollama-compatible APIs.

  qwen35 serve MODEL [--mmproj FILE] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [-c CTX] [-np N] [-t THREADS]

MODEL is a .gguf file (or the first shard of a split one), an HF directory, or a name `qwen35 pull`
takes (qwen3.5:35b-a3b, owner/name:Q4_K_M), pulled first if it is not yet, and served under that name;
--mmproj adds a GGUF vision projector so that requests may carry images (an HF directory with a vision
tower has it, and a pulled model brings the repo's). -np requests decode
together and share -c tokens of context evenly, as in llama.cpp (-c 32768 -np 4: 8192 tokens per
request, prompt and reply together); further requests wait in a bounded queue (--queue) and past it
get 429 with Retry-After.

llama-server's spellings work too: -a/--alias, the sampling defaults (--temp, --top-k, --top-p, --min-p,
--repeat-penalty, --presence-penalty, --frequency-penalty, --seed, -n) that requests which do not set
their own get, --chat-template-file, --chat-template-kwargs, --reasoning-format, --reasoning-budget,
--pooling (how /v1/embeddings and /api/embed pool the hidden states: last, mean, cls); and
its tuning flags (-fa, -b, -ub, -cb, --mlock, --no-mmap, --metrics, --no-webui, --jinja, --embeddings) are accepted
and have no effect here. --host also takes HOST:PORT, as OLLAMA_HOST does, and defaults to $QWEN35_HOST.
-ctk/-ctv choose how the full-attention layers keep K and V (cache_options.py): f16 by default, as in
llama.cpp; f32, bf16, and on the CPU q8_0, q4_0, q4_1, q5_0, q5_1.

Every flag (MODEL too) may also come from the environment, as Docker and systemd deployments of llama-server
and Ollama set it (env_settings.py): QWEN35_<LONG FLAG>, else llama-server's LLAMA_ARG_* name, else Ollama's
OLLAMA_* (OLLAMA_HOST, OLLAMA_CONTEXT_LENGTH per request, OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE,
OLLAMA_KV_CACHE_TYPE); the command line wins.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

from qwen35.chat.template import read_template_file
from qwen35.cache_options import add_cache_arguments, cache_options
from qwen35.device_options import add_device_arguments, load_options
from qwen35.env_settings import add_environment_defaults, apply_environment, blame, epilog, summary
from qwen35.errors import Qwen35Error
from qwen35.hub import resolve_model_argument
from qwen35.server.env_settings import DESCRIPTION, EPILOG_NOTES, OLLAMA_PORT, SERVE_VARIABLES
from qwen35.speculation_options import add_speculation_arguments, check_speculation_arguments, speculation_from_arguments


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="a .gguf file, an HF model directory, or a name to pull (qwen3.5:35b-a3b, "
                             "owner/name:QUANT); may come from the environment (below)")
    parser.add_argument("--mmproj", default=None, metavar="FILE",
                        help="the model's vision projector GGUF: requests may then carry images "
                             "(a pulled model brings its own)")
    parser.add_argument("--no-mmproj", action="store_true", help="do not load a pulled model's vision projector")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on, or HOST:PORT (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (default: none)")
    parser.add_argument("-c", "--ctx-size", type=int, default=32768, dest="context",
                        help="context in tokens shared evenly by the -np slots (default 32768)")
    parser.add_argument("-np", "--parallel", type=int, default=4,
                        help="requests decoded together (default 4)")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    parser.add_argument("--prefix-cache-mb", type=int, default=2048,
                        help="memory for prompt-state snapshots reused by later requests (default 2048, 0 = off)")
    parser.add_argument("--name", "-a", "--alias", default=None, dest="name",
                        help="the model name clients use (default: the file's name)")
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="CPU threads for the model (default: torch's choice, one per core)")
    _add_llama_server_arguments(parser)
    add_device_arguments(parser)
    add_cache_arguments(parser)
    add_speculation_arguments(parser)
    parser.description = f"{parser.description or ''}\n\n{DESCRIPTION}".strip()
    parser.epilog = epilog(SERVE_VARIABLES, EPILOG_NOTES)
    add_environment_defaults(parser, os.environ, SERVE_VARIABLES)


# flag -> (dest, SamplingParams option, type): server-wide defaults for requests that do not set them.
SAMPLING_FLAGS = {
    "--temp": ("temp", "temperature", float),
    "--top-k": ("top_k", "top_k", int),
    "--top-p": ("top_p", "top_p", float),
    "--min-p": ("min_p", "min_p", float),
    "--repeat-penalty": ("repeat_penalty", "repetition_penalty", float),
    "--presence-penalty": ("presence_penalty", "presence_penalty", float),
    "--frequency-penalty": ("frequency_penalty", "frequency_penalty", float),
    "--seed": ("seed", "seed", int),
}
REASONING_FORMATS = ("auto", "deepseek", "none")
FLASH_ATTENTION_VALUES = ("on", "off", "auto")


def _add_llama_server_arguments(parser) -> None:
    sampling = parser.add_argument_group(
        "sampling defaults", "for requests that do not set their own (default: the model's generation_config)")
    for flag, (dest, option, kind) in SAMPLING_FLAGS.items():
        note = " (-1: random)" if flag == "--seed" else ""
        sampling.add_argument(flag, dest=dest, type=kind, default=None, metavar="N", help=f"{option}{note}")
    sampling.add_argument("-n", "--n-predict", "--predict", dest="n_predict", type=int, default=None, metavar="N",
                          help="reply tokens of a request that sets no limit (default -1: up to the context)")
    template = parser.add_argument_group("chat template")
    template.add_argument("--chat-template-file", default=None, metavar="FILE",
                          help="a Jinja chat template to use instead of the model's (run sandboxed)")
    template.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                          help="template variables for every request, e.g. '{\"enable_thinking\": false}'; "
                               "a request's chat_template_kwargs go over them")
    template.add_argument("--jinja", action="store_true", help="accepted: templates are always Jinja here")
    template.add_argument("--reasoning-format", default="auto", metavar="FORMAT",
                          help="auto or deepseek (default): reasoning in reasoning_content; none: left in "
                               "content with its <think> tags (/v1/chat/completions)")
    template.add_argument("--reasoning-budget", type=int, default=-1, metavar="N",
                          help="thinking tokens allowed: -1 unlimited (default), 0 thinking off unless a "
                               "request turns it on")
    embeddings = parser.add_argument_group(
        "embeddings", "/v1/embeddings and Ollama's /api/embed: the served model's final hidden states pooled")
    embeddings.add_argument("--pooling", default="last", metavar="{last,mean,cls}",
                            help="how a text's hidden states become one vector: the last token's (default), "
                                 "their mean, or the first token's")
    embeddings.add_argument("--embedding", "--embeddings", dest="embeddings", action="store_true",
                            help="accepted: the embedding routes are always on, beside chat (llama-server "
                                 "serves only embeddings with it)")
    accepted = parser.add_argument_group(
        "llama-server tuning flags", "accepted so that llama-server command lines work; no effect here")
    accepted.add_argument("-fa", "--flash-attn", nargs="?", const="on", default=None, metavar="on|off|auto",
                          help="attention kernels are chosen by the model loader")
    accepted.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                          help="prompts are prefilled in chunks the engine picks")
    accepted.add_argument("-ub", "--ubatch-size", type=int, default=None, metavar="N", help="as -b")
    accepted.add_argument("-cb", "--cont-batching", action="store_true",
                          help="requests are always batched continuously")
    accepted.add_argument("--metrics", action="store_true", help="/metrics is always on")
    accepted.add_argument("--no-webui", action="store_true", help="there is no web UI")
    accepted.add_argument("--mlock", action="store_true", help="weights are not locked in memory")
    accepted.add_argument("--no-mmap", action="store_true", help="GGUF files are always memory-mapped")


def _model_name(path: Path) -> str:
    name = path.name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def split_host(text: str) -> tuple[str, int | None]:
    """--host's address and the port it carries, if any (HOST:PORT, [IPv6]:PORT, http://HOST:PORT), as
    OLLAMA_HOST takes them; an empty host is 127.0.0.1. ValueError with the reason for a bad one."""
    text = text.strip()
    if text.lower().startswith("https://"):
        raise ValueError("qwen35 serve speaks plain HTTP; put a TLS proxy in front of it")
    text = text.removeprefix("http://").removeprefix("HTTP://").rstrip("/")
    host_part, port_text = text, None
    if text.startswith("["):  # [IPv6] or [IPv6]:PORT
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            raise ValueError("write an IPv6 address with a port as [ADDRESS]:PORT")
        host_part, port_text = text[1:end], text[end + 2:] if text[end + 1:] else None
    elif text.count(":") == 1:  # HOST:PORT (more colons: a bare IPv6 address)
        host_part, port_text = text.split(":")
    if port_text is not None and not port_text.isdigit():
        raise ValueError("the port after ':' must be a number")
    return host_part or "127.0.0.1", None if port_text is None else int(port_text)


def _checked_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise Qwen35Error(f"--port must be between 0 and 65535, got {port}")
    return port


def _split(host: str) -> tuple[str, int | None]:
    try:
        return split_host(host)
    except ValueError as error:
        raise Qwen35Error(f"--host {host}: {error}") from None


def listen_address(host: str, port: int | None) -> tuple[str, int]:
    """--host and --port as a (host, port) pair. --host may carry the port (HOST:PORT, [IPv6]:PORT,
    http://HOST:PORT), as OLLAMA_HOST does; an empty host is 127.0.0.1."""
    address, host_port = _split(host)
    if host_port is not None:
        if port is not None and port != host_port:
            raise Qwen35Error(f"--host {host} names port {host_port} but --port says {port}; give the port once")
        port = host_port
    return address, _checked_port(8080 if port is None else port)


def serve_address(args) -> tuple[str, int]:
    """listen_address for serve's settings, wherever they came from: a port given closer to the command line
    (command line, QWEN35_*, LLAMA_ARG_*, OLLAMA_*) wins over one inside --host given further from it;
    OLLAMA_HOST without a port listens on Ollama's 11434."""
    sources = apply_environment(args)
    host_source, port_source = sources.get("host"), sources.get("port")
    address, host_port = _split(args.host)
    host_rank = host_source.rank if host_source else 0
    port_rank = port_source.rank if port_source else 0
    if host_port is not None and (args.port is None or host_rank < port_rank):
        return address, _checked_port(host_port)
    if host_port is not None and host_rank == port_rank:
        return listen_address(args.host, args.port)
    if args.port is not None:
        return address, _checked_port(args.port)
    return address, OLLAMA_PORT if host_source and host_source.variable == "OLLAMA_HOST" else 8080


def _check(args) -> None:
    """Every flag (and variable) checked before any model loads."""
    sources = apply_environment(args)
    if not args.model:
        raise Qwen35Error("give the MODEL to serve (or set QWEN35_MODEL or LLAMA_ARG_MODEL)")
    try:
        _check_flags(args)
    except Qwen35Error as error:
        raise Qwen35Error(blame(str(error), sources)) from None


def _check_flags(args) -> None:
    serve_address(args)
    if args.parallel < 1:
        raise Qwen35Error(f"-np must be at least 1, got {args.parallel}")
    if args.context // args.parallel < 16:
        raise Qwen35Error(f"-c {args.context} leaves {args.context // args.parallel} tokens to each of the "
                          f"-np {args.parallel} slots; give at least 16 per slot")
    cache_options(args)
    if args.threads is not None and args.threads < 1:
        raise Qwen35Error(f"-t must be at least 1, got {args.threads}")
    if args.queue < 0 or args.prefix_cache_mb < 0:
        raise Qwen35Error("--queue and --prefix-cache-mb must not be negative")
    if args.mmproj is not None and not Path(args.mmproj).is_file():
        raise Qwen35Error(f"--mmproj {args.mmproj}: no such file")
    _check_llama_server_flags(args)
    check_speculation_arguments(args)


def _check_llama_server_flags(args) -> None:
    server_settings(args)  # the sampling defaults and template variables
    if args.n_predict is not None and (args.n_predict == 0 or args.n_predict < -2):
        raise Qwen35Error(f"-n must be -1 (up to the context) or at least 1, got {args.n_predict}")
    if args.reasoning_format not in REASONING_FORMATS:
        raise Qwen35Error(f"--reasoning-format {args.reasoning_format}: use one of {', '.join(REASONING_FORMATS)}")
    from qwen35.model.api import POOLINGS

    if args.pooling not in POOLINGS:
        raise Qwen35Error(f"--pooling {args.pooling}: use one of {', '.join(POOLINGS)}")
    if args.reasoning_budget < -1:
        raise Qwen35Error(f"--reasoning-budget must be -1 (unlimited), 0 (no thinking) or more, "
                          f"got {args.reasoning_budget}")
    if args.flash_attn is not None and args.flash_attn not in FLASH_ATTENTION_VALUES:
        raise Qwen35Error(f"-fa {args.flash_attn}: use on, off or auto")
    for flag, value in (("-b", args.batch_size), ("-ub", args.ubatch_size)):
        if value is not None and value < 1:
            raise Qwen35Error(f"{flag} must be at least 1, got {value}")
    if args.chat_template_file is not None:
        served_template(read_template_file(args.chat_template_file))


def server_settings(args) -> dict:
    """The ServerState fields the llama-server flags set (the chat template aside: it needs the tokenizer)."""
    from qwen35.engine.sampler import InvalidSamplingError, SamplingParams

    sampling = {}
    for flag, (dest, option, _) in SAMPLING_FLAGS.items():
        value = getattr(args, dest)
        if value is None or (flag == "--seed" and value == -1):  # llama.cpp's -1: a random seed
            continue
        try:
            SamplingParams.from_options(None, **{option: value})
        except InvalidSamplingError as error:
            raise Qwen35Error(f"{flag} {value}: {error}") from None
        sampling[option] = value
    kwargs = {}
    if args.chat_template_kwargs is not None:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as error:
            raise Qwen35Error(f"--chat-template-kwargs is not valid JSON: {error.msg} "
                              f"(at character {error.pos})") from None
        if not isinstance(kwargs, dict):
            raise Qwen35Error("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'")
    if args.reasoning_budget == 0 and kwargs.get("enable_thinking") is True:
        raise Qwen35Error("--reasoning-budget 0 turns thinking off, but --chat-template-kwargs turns it on")
    return {"sampling_defaults": sampling, "n_predict": args.n_predict, "chat_template_kwargs": kwargs,
            "reasoning_format": args.reasoning_format, "reasoning_budget": args.reasoning_budget,
            "pooling": args.pooling}


def served_template(source: str, special_tokens: dict[str, str] | None = None):
    """--chat-template-file's template (`special_tokens`: the tokenizer's, as bos_token ... reach it),
    compiled and tried on a one-message chat, so that a broken one fails before the model loads."""
    from qwen35.chat.template import ChatTemplate

    template = ChatTemplate(source, special_tokens=special_tokens)
    template.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    return template


def build_state(path: Path, *, parallel: int = 4, queue: int = 64, context: int = 8192, prefix_cache_mb: int = 2048,
                name: str | None = None, api_key: str | None = None, mmproj: str | None = None,
                load_options: dict | None = None, settings: dict | None = None,
                chat_template_source: str | None = None, speculation_flags=None):
    """Load the model and tokenizer and start nothing yet: the server's state (also used by benchmarks).
    `context` is per request; `settings` are further ServerState fields (`server_settings`);
    `speculation_flags`: parsed --spec-type/-md/--draft-* flags (speculation_options)."""
    from qwen35 import load_model, load_tokenizer
    from qwen35.engine.service import EngineService
    from qwen35.server.app import ServerState

    from qwen35.progress import byte_progress

    tokenizer = load_tokenizer(str(path))
    template = None
    if chat_template_source is not None:
        template = served_template(chat_template_source, tokenizer.template_tokens)
    with byte_progress(f"loading {path.name}") as progress:
        model = load_model(str(path), mmproj=mmproj, progress=progress, **(load_options or {}))
    speculation = None
    if speculation_flags is not None:
        speculation = speculation_from_arguments(speculation_flags, model, load_options or {}, "qwen35 serve")
    service = EngineService(model, max_running=parallel, max_waiting=queue, context_length=context,
                            prefix_cache_bytes=prefix_cache_mb << 20, speculation=speculation)
    return ServerState(model=model, tokenizer=tokenizer, service=service, model_name=name or _model_name(path),
                       model_path=str(path), api_key=api_key, chat_template=template, **(settings or {}))


def run(args) -> int:
    _check(args)
    import uvicorn

    from qwen35.server.app import create_app

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    sources = apply_environment(args)
    if summary(sources):  # before the model loads: a setting one did not expect shows at once
        print(f"qwen35 serve: {summary(sources)}", file=sys.stderr, flush=True)
    resolved = resolve_model_argument(args.model, "qwen35 serve")
    path = resolved.path
    mmproj = args.mmproj or (str(resolved.mmproj) if resolved.mmproj and not args.no_mmproj else None)
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    host, port = serve_address(args)
    template_source = read_template_file(args.chat_template_file) if args.chat_template_file else None
    try:
        options = load_options(args, path, args.context // args.parallel, args.parallel, "qwen35 serve")
    except Qwen35Error as error:  # --device, -ngl: checked here, with the GPU in view
        raise Qwen35Error(blame(str(error), sources)) from None
    options.update(cache_options(args))
    state = build_state(path, parallel=args.parallel, queue=args.queue, context=args.context // args.parallel,
                        prefix_cache_mb=args.prefix_cache_mb, name=args.name or resolved.name, api_key=args.api_key,
                        mmproj=mmproj, settings=server_settings(args), chat_template_source=template_source,
                        speculation_flags=args, load_options=options)
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        origin = ", ".join(str(source) for dest, source in sources.items() if dest in ("host", "port"))
        raise Qwen35Error(f"cannot listen on {host}:{port}{f' (from {origin})' if origin else ''}: "
                          f"{error.strerror}") from None
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"qwen35 serve: {state.model_name} at {url}/v1 (OpenAI) and {url}/api (Ollama); "
                      f"{args.parallel} slots of {state.context_length} tokens. Ctrl+C stops.", flush=True)

    config = uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=5)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown, then re-sends the signal to the handlers it
    # found; with these in place that re-sent signal is a no-op and the command ends normally.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    AnnouncingServer(config).run(sockets=[sock])
    print("qwen35 serve: stopped", file=sys.stderr, flush=True)
    return 0
