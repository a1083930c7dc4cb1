"""Serve a model over HTTP with OpenAI- and Ollama-compatible APIs.

  qwen35 serve MODEL [--mmproj FILE] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [-c CTX] [-np N] [-t THREADS]

MODEL is a .gguf file (or the first shard of a split one), an HF directory, or a name `qwen35 pull`
takes (qwen3.5:35b-a3b, owner/name:Q4_K_M), pulled first if it is not yet, and served under that name;
--mmproj adds a GGUF vision projector so that requests may carry images (an HF directory with a vision
tower has it, and a pulled model brings the repo's). -np requests decode
together and share -c tokens of context evenly, as in llama.cpp (-c 32768 -np 4: 8192 tokens per
request, prompt and reply together); further requests wait in a bounded queue (--queue) and past it
get 429 with Retry-After.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from qwen35.device_options import add_device_arguments, load_options
from qwen35.errors import Qwen35Error
from qwen35.hub import resolve_model_argument


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a .gguf file, an HF model directory, or a name to pull (qwen3.5:35b-a3b, owner/name:QUANT)")
    parser.add_argument("--mmproj", default=None, metavar="FILE",
                        help="the model's vision projector GGUF: requests may then carry images "
                             "(a pulled model brings its own)")
    parser.add_argument("--no-mmproj", action="store_true", help="do not load a pulled model's vision projector")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("QWEN35_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $QWEN35_API_KEY, else none)")
    parser.add_argument("-c", "--ctx-size", type=int, default=32768, dest="context",
                        help="context in tokens shared evenly by the -np slots (default 32768)")
    parser.add_argument("-np", "--parallel", type=int, default=4,
                        help="requests decoded together (default 4)")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    parser.add_argument("--prefix-cache-mb", type=int, default=2048,
                        help="memory for prompt-state snapshots reused by later requests (default 2048, 0 = off)")
    parser.add_argument("--name", default=None, help="the model name clients use (default: the file's name)")
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="CPU threads for the model (default: torch's choice, one per core)")
    # Spellings `qwen35 plan` and llama.cpp users write; this build runs on the CPU with a 16-bit cache.
    add_device_arguments(parser)
    parser.add_argument("-ctk", "--cache-type-k", default="f16", help=argparse.SUPPRESS)
    parser.add_argument("-ctv", "--cache-type-v", default="f16", help=argparse.SUPPRESS)


def _model_name(path: Path) -> str:
    name = path.name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise Qwen35Error(f"--port must be between 0 and 65535, got {args.port}")
    if args.parallel < 1:
        raise Qwen35Error(f"-np must be at least 1, got {args.parallel}")
    if args.context // args.parallel < 16:
        raise Qwen35Error(f"-c {args.context} leaves {args.context // args.parallel} tokens to each of the "
                          f"{args.parallel} slots; give at least 16 per slot")
    for flag, value in (("-ctk", args.cache_type_k), ("-ctv", args.cache_type_v)):
        if value not in ("f16", "bf16"):
            raise Qwen35Error(f"{flag} {value}: a quantized K/V cache is not supported yet (f16 only)")
    if args.threads is not None and args.threads < 1:
        raise Qwen35Error(f"-t must be at least 1, got {args.threads}")
    if args.queue < 0 or args.prefix_cache_mb < 0:
        raise Qwen35Error("--queue and --prefix-cache-mb must not be negative")
    if args.mmproj is not None and not Path(args.mmproj).is_file():
        raise Qwen35Error(f"--mmproj {args.mmproj}: no such file")


def build_state(path: Path, *, parallel: int = 4, queue: int = 64, context: int = 8192, prefix_cache_mb: int = 2048,
                name: str | None = None, api_key: str | None = None, mmproj: str | None = None,
                load_options: dict | None = None):
    """Load the model and tokenizer and start nothing yet: the server's state (also used by benchmarks).
    `context` is per request."""
    from qwen35 import load_model, load_tokenizer
    from qwen35.engine.service import EngineService
    from qwen35.server.app import ServerState

    from qwen35.progress import byte_progress

    with byte_progress(f"loading {path.name}") as progress:
        model = load_model(str(path), mmproj=mmproj, progress=progress, **(load_options or {}))
    tokenizer = load_tokenizer(str(path))
    service = EngineService(model, max_running=parallel, max_waiting=queue, context_length=context,
                            prefix_cache_bytes=prefix_cache_mb << 20)
    return ServerState(model=model, tokenizer=tokenizer, service=service, model_name=name or _model_name(path),
                       model_path=str(path), api_key=api_key)


def run(args) -> int:
    _check(args)
    import uvicorn

    from qwen35.server.app import create_app

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    resolved = resolve_model_argument(args.model, "qwen35 serve")
    path = resolved.path
    mmproj = args.mmproj or (str(resolved.mmproj) if resolved.mmproj and not args.no_mmproj else None)
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    state = build_state(path, parallel=args.parallel, queue=args.queue, context=args.context // args.parallel,
                        prefix_cache_mb=args.prefix_cache_mb, name=args.name or resolved.name, api_key=args.api_key,
                        mmproj=mmproj,
                        load_options=load_options(args, path, args.context // args.parallel, args.parallel,
                                                  "qwen35 serve"))
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as error:
        raise Qwen35Error(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
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
