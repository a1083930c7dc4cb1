"""`qwen35 serve`'s settings from environment variables, as llama-server and Ollama deployments set them.

Each flag may come from, in this order: the command line; QWEN35_<LONG FLAG> (QWEN35_CTX_SIZE for --ctx-size,
QWEN35_MODEL for MODEL); llama-server's LLAMA_ARG_* name for the flag; Ollama's OLLAMA_* name where one maps.
How they are read, checked and ranked is qwen35/env_settings.py's, which `qwen35 run` shares; this is serve's
table, and the readers only serve needs.
"""

from __future__ import annotations

from qwen35.env_settings import (SHARED_FLAGS, TOKENS, UNSET, CommandVariables, Deferred, boolean, count,
                                 decimal, default_when, flags, flash_attention, text)

OLLAMA_PORT = 11434  # Ollama's port when OLLAMA_HOST names none


def host(value: str) -> str:
    from qwen35.server.command import split_host

    split_host(value)  # ValueError with the reason
    return value


def api_key(value: str) -> str:
    if not value.strip():  # a key no client can send (they strip it): refused rather than left open
        raise ValueError("only blanks; give a key, or leave the variable empty for none")
    return value


def llama_api_key(value: str) -> str:
    if "," in value:  # llama-server's list of keys
        raise ValueError("several comma-separated keys are not supported here; give one key")
    return api_key(value)


class ContextPerRequest(int, Deferred):
    """-c from OLLAMA_CONTEXT_LENGTH: tokens for one request, multiplied by -np once that is known."""

    def settle(self, args) -> int:
        return int(self) * args.parallel


def context_per_request(value: str):
    """OLLAMA_CONTEXT_LENGTH, Ollama's num_ctx (0: Ollama picks one; here the default)."""
    tokens = default_when(("0",), TOKENS)(value)
    return tokens if tokens is UNSET else ContextPerRequest(tokens)


REQUESTS = count("a number of requests")
FLAGS = flags(
    ("model", ("MODEL",), text),
    ("host", ("--host",), host),
    ("port", ("--port",), count("a port number")),
    ("api_key", ("--api-key",), api_key),
    ("context", ("-c", "--ctx-size"), TOKENS),
    ("parallel", ("-np", "--parallel"), REQUESTS),
    ("queue", ("--queue",), REQUESTS),
    ("prefix_cache_mb", ("--prefix-cache-mb",), count("a number of megabytes")),
    ("name", ("--name", "-a", "--alias"), text),
    ("temp", ("--temp",), decimal),
    ("jinja", ("--jinja",), boolean),
    ("reasoning_format", ("--reasoning-format",), text),
    ("pooling", ("--pooling",), text),
    ("embeddings", ("--embeddings", "--embedding"), boolean),
    ("flash_attn", ("-fa", "--flash-attn"), flash_attention),
    ("batch_size", ("-b", "--batch-size"), TOKENS),
    ("ubatch_size", ("-ub", "--ubatch-size"), TOKENS),
    ("cont_batching", ("-cb", "--cont-batching"), boolean),
    ("metrics", ("--metrics",), boolean),
    ("no_webui", ("--no-webui",), boolean),
    ("mlock", ("--mlock",), boolean),
    ("no_mmap", ("--no-mmap",), boolean),
) + sum(SHARED_FLAGS.values(), ())

# Ollama's server variables that map (ollama/ollama envconfig/config.go). OLLAMA_CONTEXT_LENGTH is Ollama's
# num_ctx, the context of one request: -c here is shared by the -np slots, so it becomes that times -np.
OLLAMA_VARIABLES = (
    ("OLLAMA_HOST", "--host", None),  # without a port, Ollama's 11434
    ("OLLAMA_CONTEXT_LENGTH", "--ctx-size", context_per_request),
    ("OLLAMA_NUM_PARALLEL", "--parallel", default_when(("0",), REQUESTS)),
    ("OLLAMA_MAX_QUEUE", "--queue", None),
    ("OLLAMA_KV_CACHE_TYPE", "--cache-type-k", None),  # K and V both
    ("OLLAMA_KV_CACHE_TYPE", "--cache-type-v", None),
)

SERVE_VARIABLES = CommandVariables(
    FLAGS,
    llama_readers={
        "LLAMA_API_KEY": llama_api_key,
        "LLAMA_ARG_CTX_SIZE": default_when(("0",), TOKENS),  # 0: the model's; here serve's default
    },
    others=OLLAMA_VARIABLES,
)

DESCRIPTION = """\
Every flag may also come from the environment: QWEN35_<LONG FLAG> (QWEN35_CTX_SIZE, QWEN35_PARALLEL,
QWEN35_MODEL ...), else llama-server's LLAMA_ARG_* name, else Ollama's OLLAMA_* where one maps (listed
below). The command line wins; an empty variable counts as unset; a bad value stops serve with one line."""

EPILOG_NOTES = {"OLLAMA_HOST": " (no port: 11434)", "OLLAMA_CONTEXT_LENGTH": " (per request: times -np)"}
