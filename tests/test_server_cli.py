"""`qwen35 serve` as a user runs it: a subprocess on the fixture model that prints its URL when ready,
answers the official client, and exits cleanly on SIGINT and on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest


def _start(fixtures, *extra):
    """Run the command; the URL it prints once ready."""
    command = [sys.executable, "-m", "qwen35", "serve", str(fixtures / "tiny" / "dense-hf"), "--port", "0",
               "-c", "512", "-np", "2", "-t", "1", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise AssertionError(f"no URL printed: {line!r} {process.stderr.read()}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_serve_prints_its_url_answers_and_stops_cleanly(fixtures, stop_signal):
    process, url = _start(fixtures, "--api-key", "k", "--name", "tiny", "-ngl", "99")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list().data] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
        assert reply.usage.completion_tokens <= 3
        assert httpx.get(url + "/v1/models").status_code == 401
        # -c is shared by the -np slots, as in llama.cpp: 512 / 2 = 256 tokens per request.
        with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=250)
    finally:
        process.send_signal(stop_signal)
        code = process.wait(timeout=20)
    assert code == 0, process.stderr.read()


def test_serve_refuses_bad_flags_with_one_line(fixtures, tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen35", "serve", str(tmp_path / "missing.gguf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no such file" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for flags, word in ((["-np", "0"], "-np"), (["-c", "64", "-np", "8"], "slots"), (["-ctk", "q3_k"], "-ctk")):
        result = subprocess.run([sys.executable, "-m", "qwen35", "serve", str(fixtures / "tiny" / "dense-hf"),
                                 *flags], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and word in result.stderr, result.stderr
