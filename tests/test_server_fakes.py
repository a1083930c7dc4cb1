"""A scripted stand-in model and a live-server helper for the server tests (no tests here).

The scripted model answers with text fixed by the conversation, so a test can state the exact reply
it expects without running a network: with thinking on it writes
"<think>\\nThinking about MSG\\n</think>\\n\\nAnswer: MSG", with thinking off "Answer: MSG"; a user
message "call CITY" makes it call the tool get_weather(city=CITY) ("call A and B": two calls), "json TEXT"
answers TEXT as it is;
a prompt holding "EXPLODE" makes its prefill raise (a stand-in for an engine failure); after a
tool result it answers
"The weather is RESULT". Raw text (no chat markers) continues with "~ lorem ipsum lorem ipsum ...".
It uses the real Qwen 3.5 tokenizer of the fixtures, and its cache has the real cache's interface
(select, merge, nbytes), so the engine batches it as it batches the real model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import torch
import uvicorn

from qwen35.engine.service import EngineService
from qwen35.server.app import ServerState, create_app

ASSISTANT = "<|im_start|>assistant\n"
RAW_CONTINUATION = "~" + " lorem ipsum" * 1000  # "~" marks where the prompt ends


@dataclass(frozen=True)
class FakeConfig:
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    architecture: str = "qwen35"
    hidden_size: int = 8
    num_layers: int = 1
    max_position_embeddings: int = 262144


class FakeCache:
    """The tokens each row was fed; the row operations of the real cache."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def select(self, rows: list[int], capacity: int = 0) -> FakeCache:
        return FakeCache([list(self.rows[row]) for row in rows])

    @staticmethod
    def merge(caches: list[FakeCache]) -> FakeCache:
        return FakeCache([list(row) for cache in caches for row in cache.rows])

    @staticmethod
    def empty_like(cache: FakeCache, reserve_rows: int = 1) -> FakeCache:
        return FakeCache([])

    def reserve(self, rows: int = 0, tokens: int = 0) -> None:
        pass

    def append(self, other: FakeCache, row: int = 0) -> int:
        self.rows.append(list(other.rows[row]))
        return len(self.rows) - 1

    def remove(self, row: int) -> int | None:
        last = self.rows.pop()
        if row < len(self.rows):
            self.rows[row] = last
            return len(self.rows)
        return None

    def shared(self) -> FakeCache:
        return FakeCache([list(row) for row in self.rows])

    def nbytes(self) -> int:
        return 8 * sum(len(row) for row in self.rows)


def scripted_reply(prompt_text: str) -> str:
    """What the scripted model writes after `prompt_text` (the test's own statement of the script)."""
    marker = prompt_text.rfind(ASSISTANT)
    if marker < 0:
        return RAW_CONTINUATION
    turn = prompt_text[:marker]
    last_user = turn.rfind("<|im_start|>user\n")
    message = turn[last_user + len("<|im_start|>user\n"):].split("<|im_end|>")[0].strip()
    if message.startswith("<tool_response>"):
        answer = "The weather is " + message.removeprefix("<tool_response>").removesuffix("</tool_response>").strip()
    elif message.startswith("json "):
        answer = message.removeprefix("json ")
    elif message.startswith("call "):
        answer = "\n".join(f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n"
                           f"</function>\n</tool_call>" for city in message.removeprefix("call ").split(" and "))
    else:
        answer = f"Answer: {message}"
    generated = prompt_text[marker + len(ASSISTANT):]
    if generated.startswith("<think>\n\n</think>\n\n"):
        return answer + "<|im_end|>"
    return f"Thinking about {message}\n</think>\n\n{answer}<|im_end|>"


class ScriptedModel:
    def __init__(self, tokenizer, delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.config = FakeConfig(vocab_size=4160, eos_token_ids=tuple(tokenizer.eos_token_ids))
        self.generation_defaults = {"temperature": 0.0}
        self.delay_s = delay_s
        self.forward_calls = 0
        self.forward_batch_sizes: list[int] = []
        self.prefilled_tokens = 0

    def make_cache(self, batch_size: int = 1) -> FakeCache:
        return FakeCache([[] for _ in range(batch_size)])

    def embed(self, token_ids, pooling: str = "last", normalize: bool = True) -> torch.Tensor:
        """A vector of hidden_size that depends on the tokens (the embedding routes' plumbing, not the maths)."""
        ids = list(token_ids)
        vector = torch.tensor([sum(ids), ids[-1], ids[0], len(ids)] * (self.config.hidden_size // 4), dtype=torch.float32)
        return vector / vector.norm() if normalize else vector

    def nbytes(self) -> int:
        return 1234

    def _next_token(self, context: list[int]) -> int:
        text = self.tokenizer.decode(context)
        marker = text.rfind(ASSISTANT)
        if marker < 0:
            base = text.split("~")[0]
            target = base + scripted_reply(base)
        else:
            # The generation prompt ends right after "<think>\n" or "</think>\n\n".
            prompt_part = text[: marker + len(ASSISTANT)]
            rest = text[marker + len(ASSISTANT):]
            opener = "<think>\n\n</think>\n\n" if rest.startswith("<think>\n\n</think>\n\n") else "<think>\n"
            target = prompt_part + opener + scripted_reply(prompt_part + opener)
        if not target.startswith(text) or target == text:
            return self.config.eos_token_ids[0]
        return self.tokenizer.encode(target[len(text):])[0]

    def forward(self, input_ids: torch.Tensor, cache: FakeCache, last_only: bool = False) -> torch.Tensor:
        self.forward_calls += 1
        self.forward_batch_sizes.append(input_ids.shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        batch, length = input_ids.shape
        if length > 1 and "EXPLODE" in self.tokenizer.decode(input_ids[0].tolist()):
            raise RuntimeError("the scripted model was told to fail")
        self.prefilled_tokens += batch * length if length > 1 else 0
        logits = torch.zeros(batch, length, self.config.vocab_size)
        for row in range(batch):
            cache.rows[row].extend(input_ids[row].tolist())
            logits[row, -1, self._next_token(cache.rows[row])] = 20.0
        return logits[:, -1:] if last_only else logits


def wait_for_prefix_jobs(state, timeout_s: float = 30.0) -> None:
    """Wait until the engine has no background prefill left (the next turn's history is cached by then)."""
    deadline = time.monotonic() + timeout_s
    while state.service.prefix_jobs_pending:
        if time.monotonic() > deadline:
            raise TimeoutError("the engine's prefix jobs did not finish")
        time.sleep(0.005)


@contextlib.contextmanager
def live_server(model, tokenizer, *, name="tiny", api_key=None, max_running=4, max_waiting=16,
                context_length=1024, prefix_cache_bytes=64 << 20, prefill_chunk=512, **settings):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields (base_url, state).
    `settings`: further ServerState fields (what `qwen35 serve`'s flags set)."""
    service = EngineService(model, max_running=max_running, max_waiting=max_waiting, context_length=context_length,
                            prefix_cache_bytes=prefix_cache_bytes, prefill_chunk=prefill_chunk)
    state = ServerState(model=model, tokenizer=tokenizer, service=service, model_name=name,
                        model_path="tiny.gguf", api_key=api_key, **settings)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
