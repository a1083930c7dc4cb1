"""Throughput and latency of `qwen35 serve` under concurrent streaming clients.

    python benchmarks/serve_load.py ../shared/fixtures/tiny/dense-hf            # starts a server in-process
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --name MODEL    # a server already running
    python benchmarks/serve_load.py MODEL -C 1 -C 4 -C 16 --max-tokens 32 --requests 32 -t 1 --json
    python benchmarks/serve_load.py MODEL -C 8 --prompt-words 1000      # long prompts: big K/V per request

At each concurrency C, `--requests` chat requests (distinct prompts, greedy, exactly --max-tokens
tokens each via ignore_eos) are kept C at a time in flight as SSE streams; `--prompt-words` pads each
prompt with that many filler words after its distinct opening (so no request reuses another's
prefix and every request that joins or leaves the running batch carries a long K/V). Reported per level:
output tokens/s over the whole run, requests/s, time to first token and end-to-end latency
(median and 95th percentile), and the mean gap between tokens within a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


_FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _prompt(index: int, words: int) -> str:
    filler = " ".join(_FILLER[i % len(_FILLER)] for i in range(words))
    return f"Request {index}: write about the number {index}. {filler}".strip()


async def _one(client: httpx.AsyncClient, url: str, name: str, index: int, max_tokens: int, api_key: str | None,
               words: int = 0):
    body = {"model": name, "messages": [{"role": "user", "content": _prompt(index, words)}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": False}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # a failed generation must not pass for a fast empty one
                raise RuntimeError(f"request {index} failed: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice["delta"].get("content") or choice["delta"].get("reasoning_content")
                   for choice in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    finished = time.perf_counter()
    if tokens != max_tokens:
        raise RuntimeError(f"request {index} gave {tokens} tokens, not the {max_tokens} asked for")
    first = stamps[0] if stamps else finished
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return {"ttft": first - started, "latency": finished - started, "tokens": tokens,
            "gap": statistics.mean(gaps) if gaps else 0.0}


async def _level(url: str, name: str, concurrency: int, requests: int, max_tokens: int, api_key: str | None,
                 words: int = 0) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def bounded(index):
            async with limit:
                return await _one(client, url, name, index, max_tokens, api_key, words)

        await _one(client, url, name, 10_000 + concurrency, 4, api_key)  # warm-up, not counted
        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(index) for index in range(requests)))
        wall = time.perf_counter() - started
    tokens = sum(result["tokens"] for result in results)
    ttft = [result["ttft"] for result in results]
    latency = [result["latency"] for result in results]
    return {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "prompt_words": words,
            "wall_s": wall,
            "output_tokens": tokens, "output_tok_s": tokens / wall, "requests_s": requests / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": _percentile(ttft, 0.95),
            "latency_p50_s": statistics.median(latency), "latency_p95_s": _percentile(latency, 0.95),
            "inter_token_s": statistics.mean(result["gap"] for result in results)}


def _start_server(model: Path, parallel: int, context: int):
    import uvicorn

    from qwen35.server.app import create_app
    from qwen35.server.command import build_state

    state = build_state(model, parallel=parallel, queue=256, context=context)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", state.model_name, server, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="a .gguf or HF directory to serve in-process")
    parser.add_argument("--url", help="benchmark a running server instead")
    parser.add_argument("--name", help="model name on that server (default: its first /v1/models entry)")
    parser.add_argument("--api-key")
    parser.add_argument("-C", "--concurrency", type=int, action="append", help="level (repeatable; default 1 4 16)")
    parser.add_argument("--requests", type=int, help="requests per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=0, help="filler words added to each prompt (default 0)")
    parser.add_argument("-np", "--parallel", type=int, default=16, help="slots of the in-process server")
    parser.add_argument("-c", "--ctx-size", type=int, default=2048, dest="context", help="context per request")
    parser.add_argument("-t", "--threads", type=int, help="torch threads of the in-process server")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.url is None):
        parser.error("give either MODEL or --url")
    levels = args.concurrency or [1, 4, 16]
    server = thread = None
    if args.model is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        url, name, server, thread = _start_server(args.model, args.parallel, args.context)
    else:
        url = args.url.rstrip("/")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        name = args.name or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
    try:
        rows = [asyncio.run(_level(url, name, level, args.requests or max(8, 2 * level), args.max_tokens,
                                   args.api_key, args.prompt_words)) for level in levels]
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(30)
    if args.json:
        print(json.dumps({"model": name, "levels": rows}, indent=2))
        return 0
    padding = f", prompts padded with {args.prompt_words} words" if args.prompt_words else ""
    print(f"{name}: {args.max_tokens} tokens per request, greedy, streamed{padding}")
    print("| concurrency | requests | output tok/s | req/s | TTFT p50 / p95 (s) | latency p50 / p95 (s) | "
          "inter-token (ms) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['requests']} | {row['output_tok_s']:.1f} | {row['requests_s']:.2f} | "
              f"{row['ttft_p50_s']:.2f} / {row['ttft_p95_s']:.2f} | {row['latency_p50_s']:.2f} / "
              f"{row['latency_p95_s']:.2f} | {1000 * row['inter_token_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
