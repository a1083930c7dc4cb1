"""qwen35: run the Qwen 3.5 model family locally — plan, pull, run, serve, bench."""

import os

__version__ = "0.1.0"

# OpenMP threads: libgomp's default is kept on purpose. Its worker threads spin for a while
# (about a millisecond) after a parallel region before they sleep; a decoded token runs ~150
# short parallel regions, and waking sleeping threads for each (OMP_WAIT_POLICY=PASSIVE)
# made decode 1.3-1.6x slower here. llama.cpp's threads spin while they compute too. On a
# machine busy with other work the spinning competes with it: OMP_WAIT_POLICY=PASSIVE in
# the environment trades speed for politeness.


def _keep_freed_memory_for_reuse() -> None:
    """Have glibc serve tensors up to 32 MiB from its heap and keep freed memory for reuse.

    By default glibc maps each large allocation afresh and unmaps it when freed, so every
    new tensor of a few MiB (a prefill activation, a DeltaNet state each decoded token)
    pays page faults and zeroing again: measured 250 us for 1 MiB here, five times the
    delta rule step that uses it. Reused heap memory costs nothing to touch.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


if not os.environ.get("QWEN35_SYSTEM_MALLOC"):
    _keep_freed_memory_for_reuse()

__all__ = ["__version__", "load_model", "load_tokenizer", "parse_output"]


def load_model(path, device="cpu", **options):
    """Load a .gguf file (or the first shard of a split one) or an HF directory."""
    from qwen35.model.loading import load_model as _load_model

    return _load_model(path, device=device, **options)


def load_tokenizer(path):
    """Load the tokenizer of a .gguf file or an HF directory."""
    from qwen35.chat.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


def parse_output(text, tools=None, thinking=True):
    """Split a finished model output into reasoning, content and tool calls."""
    from qwen35.chat.parser import parse_output as _parse_output

    return _parse_output(text, tools=tools, thinking=thinking)
