"""`qwen35 serve`'s settings from environment variables: each variable gives the same settings as the flag it
stands for does on the command line (argparse's parse of that flag is the reference), under the names
llama-server documents (llama.cpp tools/server/README.md, "(env: ...)" per flag, generated from
common/arg.cpp's set_env) and Ollama's server reads (ollama envconfig/config.go); precedence is command line >
QWEN35_* > LLAMA_ARG_* > OLLAMA_* > the built-in default; a bad value is one line naming the variable before
any model loads. No model is loaded except by the one end-to-end test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from test_server_flags import _args

from qwen35.chat.command import RUN_VARIABLES
from qwen35.cli import build_parser, main
from qwen35.env_settings import apply_environment, summary
from qwen35.errors import Qwen35Error
from qwen35.server.command import _check, serve_address, server_settings
from qwen35.server.env_settings import SERVE_VARIABLES

EVERY_VARIABLE = sorted(SERVE_VARIABLES.names() | RUN_VARIABLES.names())


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """None of the variables serve or run reads, whatever the shell running the tests has set."""
    for name in EVERY_VARIABLE:
        monkeypatch.delenv(name, raising=False)


def _settings(*words, command="serve") -> dict:
    """The command's resolved settings for a command line, in the environment the test has set."""
    args = build_parser().parse_args([command, *words])
    apply_environment(args)
    return {key: value for key, value in vars(args).items() if not key.startswith("_")}


def _with(monkeypatch, environ: dict, *words, command="serve") -> dict:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    try:
        return _settings(*words, command=command)
    finally:
        for name in environ:
            monkeypatch.delenv(name)


# llama.cpp's documented variable for each flag that serve and run both have: llama-server's and llama-cli's
# (tools/server/README.md, tools/cli/README.md; the older names, from before a flag was renamed, from
# common/arg.cpp of that time): variable, value, the same setting on llama.cpp's command line.
LLAMA_SHARED_DOCUMENTED = [
    ("LLAMA_ARG_CTX_SIZE", "4096", ["-c", "4096"]),
    ("LLAMA_ARG_THREADS", "3", ["-t", "3"]),
    ("LLAMA_ARG_N_GPU_LAYERS", "20", ["-ngl", "20"]),
    ("LLAMA_ARG_N_CPU_MOE", "4", ["--n-cpu-moe", "4"]),
    ("LLAMA_ARG_CACHE_TYPE_K", "q8_0", ["-ctk", "q8_0"]),
    ("LLAMA_ARG_CACHE_TYPE_V", "q4_0", ["-ctv", "q4_0"]),
    ("LLAMA_ARG_MMPROJ", "mmproj.gguf", ["--mmproj", "mmproj.gguf"]),
    ("LLAMA_ARG_MMPROJ_AUTO", "0", ["--no-mmproj"]),
    ("LLAMA_ARG_TEMPERATURE", "0.7", ["--temp", "0.7"]),
    ("LLAMA_ARG_TOP_K", "20", ["--top-k", "20"]),
    ("LLAMA_ARG_TOP_P", "0.8", ["--top-p", "0.8"]),
    ("LLAMA_ARG_MIN_P", "0", ["--min-p", "0"]),
    ("LLAMA_ARG_REPEAT_PENALTY", "1.05", ["--repeat-penalty", "1.05"]),
    ("LLAMA_ARG_PRESENCE_PENALTY", "1.5", ["--presence-penalty", "1.5"]),
    ("LLAMA_ARG_FREQUENCY_PENALTY", "0.5", ["--frequency-penalty", "0.5"]),
    ("LLAMA_ARG_N_PREDICT", "256", ["-n", "256"]),
    ("LLAMA_ARG_CHAT_TEMPLATE_FILE", "t.jinja", ["--chat-template-file", "t.jinja"]),
    ("LLAMA_ARG_CHAT_TEMPLATE_KWARGS", '{"enable_thinking": false}',
     ["--chat-template-kwargs", '{"enable_thinking": false}']),
    ("LLAMA_ARG_THINK_BUDGET", "0", ["--reasoning-budget", "0"]),
    ("LLAMA_ARG_SPEC_TYPE", "draft-mtp", ["--spec-type", "draft-mtp"]),
    ("LLAMA_ARG_SPEC_DRAFT_MODEL", "draft.gguf", ["--spec-draft-model", "draft.gguf"]),
    ("LLAMA_ARG_MODEL_DRAFT", "draft.gguf", ["-md", "draft.gguf"]),
    ("LLAMA_ARG_SPEC_DRAFT_N_MAX", "4", ["--spec-draft-n-max", "4"]),
    ("LLAMA_ARG_DRAFT_MAX", "4", ["--draft-max", "4"]),
    ("LLAMA_ARG_SPEC_DRAFT_N_MIN", "1", ["--spec-draft-n-min", "1"]),
    ("LLAMA_ARG_DRAFT_MIN", "1", ["--draft-min", "1"]),
    ("LLAMA_ARG_SPEC_DRAFT_P_MIN", "0.5", ["--draft-p-min", "0.5"]),
    ("LLAMA_ARG_DRAFT_P_MIN", "0.5", ["--draft-p-min", "0.5"]),
]

# ... and llama-server's for the flags only serve has.
LLAMA_SERVER_DOCUMENTED = LLAMA_SHARED_DOCUMENTED + [
    ("LLAMA_ARG_N_PARALLEL", "2", ["-np", "2"]),
    ("LLAMA_ARG_HOST", "0.0.0.0", ["--host", "0.0.0.0"]),
    ("LLAMA_ARG_PORT", "9090", ["--port", "9090"]),
    ("LLAMA_API_KEY", "secret", ["--api-key", "secret"]),
    ("LLAMA_ARG_ALIAS", "qwen", ["-a", "qwen"]),
    ("LLAMA_ARG_JINJA", "1", ["--jinja"]),
    ("LLAMA_ARG_THINK", "none", ["--reasoning-format", "none"]),
    ("LLAMA_ARG_FLASH_ATTN", "off", ["-fa", "off"]),
    ("LLAMA_ARG_FLASH_ATTN", "true", ["-fa", "on"]),  # older llama.cpp: -fa was a boolean
    ("LLAMA_ARG_BATCH", "1024", ["-b", "1024"]),
    ("LLAMA_ARG_UBATCH", "256", ["-ub", "256"]),
    ("LLAMA_ARG_CONT_BATCHING", "enabled", ["-cb"]),
    ("LLAMA_ARG_ENDPOINT_METRICS", "1", ["--metrics"]),
    ("LLAMA_ARG_UI", "off", ["--no-webui"]),
    ("LLAMA_ARG_NO_WEBUI", "1", ["--no-webui"]),
    ("LLAMA_ARG_POOLING", "mean", ["--pooling", "mean"]),
    ("LLAMA_ARG_EMBEDDINGS", "1", ["--embeddings"]),
    ("LLAMA_ARG_MLOCK", "true", ["--mlock"]),
    ("LLAMA_ARG_MMAP", "false", ["--no-mmap"]),
    ("LLAMA_ARG_NO_MMAP", "1", ["--no-mmap"]),
]


def check_variable_sets_what_flags_do(monkeypatch, variable, value, flags, command="serve"):
    """The variable alone gives the settings the flags give on the command line (and those differ from none)."""
    on_the_command_line = _settings("model.gguf", *flags, command=command)
    assert on_the_command_line != _settings("model.gguf", command=command)  # the flag changes something
    assert _with(monkeypatch, {variable: value}, "model.gguf", command=command) == on_the_command_line


@pytest.mark.parametrize("variable, value, flags", LLAMA_SERVER_DOCUMENTED)
def test_each_llama_server_variable_sets_what_its_flag_does(monkeypatch, variable, value, flags):
    check_variable_sets_what_flags_do(monkeypatch, variable, value, flags)


# Our own spelling: QWEN35_ and the long flag, for every flag serve and run both have ...
QWEN35_SHARED_SPELLINGS = [
    ("QWEN35_MMPROJ", "p.gguf", ["--mmproj", "p.gguf"]), ("QWEN35_NO_MMPROJ", "1", ["--no-mmproj"]),
    ("QWEN35_CTX_SIZE", "4096", ["-c", "4096"]),
    ("QWEN35_THREADS", "2", ["-t", "2"]), ("QWEN35_TEMP", "0.6", ["--temp", "0.6"]),
    ("QWEN35_TOP_K", "20", ["--top-k", "20"]), ("QWEN35_TOP_P", "0.95", ["--top-p", "0.95"]),
    ("QWEN35_MIN_P", "0.1", ["--min-p", "0.1"]), ("QWEN35_REPEAT_PENALTY", "1.1", ["--repeat-penalty", "1.1"]),
    ("QWEN35_PRESENCE_PENALTY", "1", ["--presence-penalty", "1"]),
    ("QWEN35_FREQUENCY_PENALTY", "0.2", ["--frequency-penalty", "0.2"]), ("QWEN35_SEED", "7", ["--seed", "7"]),
    ("QWEN35_N_PREDICT", "64", ["-n", "64"]),
    ("QWEN35_CHAT_TEMPLATE_FILE", "t.jinja", ["--chat-template-file", "t.jinja"]),
    ("QWEN35_CHAT_TEMPLATE_KWARGS", "{}", ["--chat-template-kwargs", "{}"]),
    ("QWEN35_REASONING_BUDGET", "0", ["--reasoning-budget", "0"]),
    ("QWEN35_DEVICE", "cpu", ["--device", "cpu"]), ("QWEN35_N_GPU_LAYERS", "10", ["-ngl", "10"]),
    ("QWEN35_N_CPU_MOE", "2", ["--n-cpu-moe", "2"]), ("QWEN35_CACHE_TYPE_K", "bf16", ["-ctk", "bf16"]),
    ("QWEN35_CACHE_TYPE_V", "q8_0", ["-ctv", "q8_0"]), ("QWEN35_SPEC_TYPE", "mtp", ["--spec-type", "mtp"]),
    ("QWEN35_MODEL_DRAFT", "d.gguf", ["-md", "d.gguf"]), ("QWEN35_DRAFT_MAX", "3", ["--draft-max", "3"]),
    ("QWEN35_DRAFT_MIN", "1", ["--draft-min", "1"]), ("QWEN35_DRAFT_P_MIN", "0.9", ["--draft-p-min", "0.9"]),
    ("QWEN35_DRAFT_VOCAB", "1000", ["--draft-vocab", "1000"]),
    ("QWEN35_SPECULATIVE_CONFIG", '{"method": "mtp"}', ["--speculative-config", '{"method": "mtp"}']),
]

# ... and for the flags only serve has.
QWEN35_SPELLINGS = QWEN35_SHARED_SPELLINGS + [
    ("QWEN35_HOST", "0.0.0.0", ["--host", "0.0.0.0"]), ("QWEN35_PORT", "9000", ["--port", "9000"]),
    ("QWEN35_API_KEY", "k", ["--api-key", "k"]),
    ("QWEN35_PARALLEL", "2", ["-np", "2"]), ("QWEN35_QUEUE", "8", ["--queue", "8"]),
    ("QWEN35_PREFIX_CACHE_MB", "0", ["--prefix-cache-mb", "0"]), ("QWEN35_NAME", "qwen", ["--name", "qwen"]),
    ("QWEN35_JINJA", "on", ["--jinja"]), ("QWEN35_REASONING_FORMAT", "none", ["--reasoning-format", "none"]),
    ("QWEN35_FLASH_ATTN", "auto", ["-fa", "auto"]),
    ("QWEN35_BATCH_SIZE", "512", ["-b", "512"]), ("QWEN35_UBATCH_SIZE", "128", ["-ub", "128"]),
    ("QWEN35_CONT_BATCHING", "1", ["-cb"]), ("QWEN35_METRICS", "1", ["--metrics"]),
    ("QWEN35_NO_WEBUI", "1", ["--no-webui"]), ("QWEN35_MLOCK", "1", ["--mlock"]),
    ("QWEN35_NO_MMAP", "1", ["--no-mmap"]),
    ("QWEN35_POOLING", "cls", ["--pooling", "cls"]), ("QWEN35_EMBEDDINGS", "1", ["--embeddings"]),
]


@pytest.mark.parametrize("variable, value, flags", QWEN35_SPELLINGS)
def test_each_qwen35_variable_sets_what_its_flag_does(monkeypatch, variable, value, flags):
    check_variable_sets_what_flags_do(monkeypatch, variable, value, flags)


def check_every_flag_has_a_qwen35_variable(command, table, spellings, left_out=()):
    """Every option of the command's parser is in its table (but `left_out`), and `spellings` tries them all."""
    parser = build_parser()._subparsers._group_actions[0].choices[command]  # argparse keeps them private
    options = {spelling for action in parser._actions for spelling in action.option_strings}
    options -= {"-h", "--help", "--mtp", *left_out}  # --mtp is --spec-type draft-mtp: QWEN35_SPEC_TYPE
    assert options == {spelling for flag in table.flags for spelling in flag.spellings} - {"MODEL"}
    assert {name for name, _, _ in spellings} | {"QWEN35_MODEL"} == {flag.variable for flag in table.flags}


def test_every_serve_flag_has_a_qwen35_variable():
    check_every_flag_has_a_qwen35_variable("serve", SERVE_VARIABLES, QWEN35_SPELLINGS)


def test_the_command_line_wins_then_qwen35_then_llama_server_then_ollama(monkeypatch):
    default = _settings("model.gguf")["parallel"]
    everything = {"QWEN35_PARALLEL": "3", "LLAMA_ARG_N_PARALLEL": "2", "OLLAMA_NUM_PARALLEL": "5"}
    for name, value in everything.items():
        monkeypatch.setenv(name, value)
    assert _settings("model.gguf", "-np", "6")["parallel"] == 6
    for name, expected in (("QWEN35_PARALLEL", 3), ("LLAMA_ARG_N_PARALLEL", 2), ("OLLAMA_NUM_PARALLEL", 5)):
        assert _settings("model.gguf")["parallel"] == expected
        monkeypatch.delenv(name)
    assert _settings("model.gguf")["parallel"] == default
    # OLLAMA_KV_CACHE_TYPE sets K and V; a more particular variable or the command line goes over one of them.
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q4_0")
    monkeypatch.setenv("LLAMA_ARG_CACHE_TYPE_K", "q8_0")
    settings = _settings("model.gguf", "-ctv", "f32")
    assert (settings["cache_type_k"], settings["cache_type_v"]) == ("q8_0", "f32")
    assert _settings("model.gguf") == {**_settings("model.gguf", "-ctk", "q8_0", "-ctv", "q4_0")}


def test_ollama_context_length_is_per_request_and_minus_c_is_shared_by_the_slots(monkeypatch):
    """Ollama gives each of OLLAMA_NUM_PARALLEL requests OLLAMA_CONTEXT_LENGTH tokens (its FAQ: memory grows
    as NUM_PARALLEL * CONTEXT_LENGTH); -c here is all the slots' context, so it is that product."""
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "8192")
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "2")
    settings = _settings("model.gguf")
    assert (settings["context"], settings["parallel"]) == (16384, 2)
    assert _settings("model.gguf", "-np", "4")["context"] == 32768  # each request still gets 8192
    assert _settings("model.gguf", "-c", "4096")["context"] == 4096
    args = _args("-c", "8192")  # the command line's -c, the same number: all the slots', not from Ollama
    _check(args)
    assert args.context == 8192 and "context" not in apply_environment(args)
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "6000")  # llama-server's -c: already all the slots'
    assert _settings("model.gguf")["context"] == 6000
    monkeypatch.delenv("LLAMA_ARG_CTX_SIZE")
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "0")  # Ollama's "pick one": here the default
    assert _settings("model.gguf")["context"] == _settings("model.gguf", "-np", "2")["context"]


@pytest.mark.parametrize("environ, flags, expected", [
    ({"OLLAMA_HOST": "0.0.0.0"}, [], ("0.0.0.0", 11434)),  # Ollama's port when it names none
    ({"OLLAMA_HOST": "0.0.0.0:8000"}, [], ("0.0.0.0", 8000)),
    ({"OLLAMA_HOST": "http://127.0.0.1:9000/"}, [], ("127.0.0.1", 9000)),
    ({"OLLAMA_HOST": "[::1]:11500"}, [], ("::1", 11500)),
    ({"OLLAMA_HOST": "\"0.0.0.0:11435\""}, [], ("0.0.0.0", 11435)),  # Ollama drops the quotes
    ({"OLLAMA_HOST": "0.0.0.0"}, ["--port", "9000"], ("0.0.0.0", 9000)),
    ({"OLLAMA_HOST": "0.0.0.0:8000", "LLAMA_ARG_PORT": "9001"}, [], ("0.0.0.0", 9001)),
    ({"QWEN35_HOST": "0.0.0.0:9000"}, ["--port", "9001"], ("0.0.0.0", 9001)),  # the command line wins
    ({"QWEN35_PORT": "9002"}, ["--host", "localhost:9003"], ("localhost", 9003)),
    ({"LLAMA_ARG_HOST": "0.0.0.0", "LLAMA_ARG_PORT": "8081"}, [], ("0.0.0.0", 8081)),
    ({"LLAMA_ARG_HOST": "10.0.0.1", "OLLAMA_HOST": "0.0.0.0"}, [], ("10.0.0.1", 8080)),
])
def test_the_listen_address_takes_ollama_and_llama_server_forms(monkeypatch, environ, flags, expected):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = _args(*flags)
    _check(args)
    assert serve_address(args) == expected


def test_a_port_given_twice_at_the_same_level_is_refused_naming_both(monkeypatch):
    monkeypatch.setenv("QWEN35_HOST", "0.0.0.0:9000")
    monkeypatch.setenv("QWEN35_PORT", "9001")
    with pytest.raises(Qwen35Error, match="give the port once") as error:
        _check(_args())
    assert "QWEN35_HOST=0.0.0.0:9000" in str(error.value) and "QWEN35_PORT=9001" in str(error.value)


def test_qwen35_host_and_api_key_work_as_before(monkeypatch):
    assert (_args().host, _args().api_key) == ("127.0.0.1", None)
    monkeypatch.setenv("QWEN35_HOST", "0.0.0.0:11434")
    monkeypatch.setenv("QWEN35_API_KEY", " key with spaces ")
    args = _args()
    _check(args)
    assert serve_address(args) == ("0.0.0.0", 11434) and args.api_key == " key with spaces "  # taken as it is
    args = _args("--host", "localhost", "--api-key", "other")
    assert (serve_address(args), args.api_key) == (("localhost", 8080), "other")
    monkeypatch.setenv("QWEN35_API_KEY", "a,b")  # one key with a comma, as before (LLAMA_API_KEY's is a list)
    assert _args().api_key == "a,b"
    monkeypatch.setenv("QWEN35_API_KEY", "")  # empty: no key, as before
    monkeypatch.setenv("QWEN35_HOST", "")
    assert (_args().api_key or None, _args().host) == (None, "127.0.0.1")


def test_the_model_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_HF_REPO", "unsloth/Qwen3.5-0.8B-GGUF:Q4_K_M")
    assert _settings()["model"] == "unsloth/Qwen3.5-0.8B-GGUF:Q4_K_M"
    monkeypatch.setenv("LLAMA_ARG_MODEL", "/models/qwen.gguf")
    assert _settings()["model"] == "/models/qwen.gguf"
    monkeypatch.setenv("QWEN35_MODEL", "qwen3.5:0.8b")
    assert _settings()["model"] == "qwen3.5:0.8b"
    assert _settings("given.gguf")["model"] == "given.gguf"


def _one_error_line(capsys, *words, command="serve") -> str:
    assert main([command, *words]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "loading" not in captured.err, captured.err
    return lines[0]


def test_without_a_model_anywhere_serve_says_where_one_comes_from(capsys):
    expected = "qwen35 serve: error: give the MODEL to serve (or set QWEN35_MODEL or LLAMA_ARG_MODEL)"
    assert _one_error_line(capsys) == expected


@pytest.mark.parametrize("environ, flags, expected", [
    ({"LLAMA_ARG_CTX_SIZE": "abc"}, [], "LLAMA_ARG_CTX_SIZE=abc: not a number of tokens"),
    ({"LLAMA_ARG_CTX_SIZE": "abc"}, ["-c", "4096"], "LLAMA_ARG_CTX_SIZE=abc: not a number of tokens"),  # as llama.cpp
    ({"OLLAMA_NUM_PARALLEL": "two"}, [], "OLLAMA_NUM_PARALLEL=two: not a number of requests"),
    ({"QWEN35_PORT": "http"}, [], "QWEN35_PORT=http: not a port number"),
    ({"LLAMA_ARG_N_GPU_LAYERS": "most"}, [], "LLAMA_ARG_N_GPU_LAYERS=most: not a number of layers, auto or all"),
    ({"LLAMA_ARG_MLOCK": "maybe"}, [], "LLAMA_ARG_MLOCK=maybe: not a boolean"),
    ({"LLAMA_ARG_TEMPERATURE": "warm"}, [], "LLAMA_ARG_TEMPERATURE=warm: not a number"),
    ({"LLAMA_ARG_SPEC_TYPE": "ngram-mod"}, [], "LLAMA_ARG_SPEC_TYPE=ngram-mod: not a speculation type here"),
    ({"OLLAMA_HOST": "https://example.org"}, [], "OLLAMA_HOST=https://example.org: qwen35 serve speaks plain HTTP"),
    ({"QWEN35_DEVICE": "tpu"}, [], "QWEN35_DEVICE=tpu: not a device (auto, cpu, cuda or cuda:N)"),
    ({"QWEN35_API_KEY": "   "}, [], "QWEN35_API_KEY: only blanks"),
    # Values of the right kind that serve's own checks refuse: the check's line, and the variable.
    ({"LLAMA_ARG_N_PARALLEL": "0"}, [], "-np must be at least 1, got 0 (from LLAMA_ARG_N_PARALLEL=0)"),
    ({"QWEN35_CTX_SIZE": "64", "OLLAMA_NUM_PARALLEL": "8"}, [], "(from QWEN35_CTX_SIZE=64, OLLAMA_NUM_PARALLEL=8)"),
    ({"LLAMA_ARG_CACHE_TYPE_K": "q3_k"}, [], "-ctk q3_k: not a K/V cache type"),
    ({"OLLAMA_KV_CACHE_TYPE": "q3_k"}, [], "-ctk q3_k: not a K/V cache type (use one of f32, f16, bf16, q8_0, "
                                           "q4_0, q4_1, q5_0, q5_1) (from OLLAMA_KV_CACHE_TYPE=q3_k)"),
    ({"LLAMA_ARG_TEMPERATURE": "-1"}, [], "(from LLAMA_ARG_TEMPERATURE=-1)"),
    ({"LLAMA_ARG_THINK": "raw"}, [],
     "--reasoning-format raw: use one of auto, deepseek, none (from LLAMA_ARG_THINK=raw)"),
    ({"LLAMA_ARG_SPEC_DRAFT_N_MAX": "0"}, [], "(from LLAMA_ARG_SPEC_DRAFT_N_MAX=0)"),
    ({"LLAMA_ARG_CHAT_TEMPLATE_KWARGS": "{\n bad"}, [], "(from LLAMA_ARG_CHAT_TEMPLATE_KWARGS={\\n bad)"),
])
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch, capsys, tmp_path, environ, flags, expected):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    line = _one_error_line(capsys, str(tmp_path / "absent.gguf"), *flags)  # checked before the model is looked at
    assert line.startswith("qwen35 serve: error: ") and expected in line, line


def test_a_bad_key_is_named_and_not_shown(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLAMA_API_KEY", "first-secret,second-secret")
    line = _one_error_line(capsys, str(tmp_path / "absent.gguf"))
    assert "LLAMA_API_KEY" in line and "comma-separated" in line and "secret" not in line


def test_server_variables_reach_other_commands_only_as_llama_cpp_shares_them(monkeypatch):
    """A bad variable never stops the parser; `run` reads the LLAMA_ARG_* names llama-cli shares (and not
    Ollama's server variables), `bench` none, as llama-bench reads none (tests/test_run_env.py: run's own)."""
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "abc")
    monkeypatch.setenv("LLAMA_ARG_CACHE_TYPE_K", "q8_0")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q4_0")
    expected = {"run": ("q8_0", "f16"), "bench": ("f16", "f16")}
    for command, cache_types in expected.items():
        args = build_parser().parse_args([command, "model.gguf"])
        assert (args.cache_type_k, args.cache_type_v) == cache_types


@pytest.mark.parametrize("variable, value, flags", [
    ("LLAMA_ARG_CTX_SIZE", "0", []),  # llama.cpp: 0 = the model's context; here serve's default
    ("LLAMA_ARG_N_PARALLEL", "-1", []),  # -1 = auto
    ("LLAMA_ARG_THREADS", "-1", []),
    ("LLAMA_ARG_N_GPU_LAYERS", "auto", []),
    ("LLAMA_ARG_N_GPU_LAYERS", "-1", []),
    ("LLAMA_ARG_N_GPU_LAYERS", "all", ["-ngl", "999"]),  # more than the layers: all of them and the head
    ("LLAMA_ARG_SPEC_TYPE", "draft-simple", []),  # drafting with -md, which -md alone does here
    ("OLLAMA_NUM_PARALLEL", "0", []),  # Ollama's automatic choice
    ("LLAMA_ARG_N_CPU_MOE", "", []),  # an empty variable counts as unset
    ("QWEN35_HOST", "  ", []),
])
def test_the_defaults_spelled_as_llama_server_and_ollama_spell_them(monkeypatch, variable, value, flags):
    assert _with(monkeypatch, {variable: value}, "model.gguf") == _settings("model.gguf", *flags)


def test_help_names_the_scheme_and_each_flags_variables_once(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "QWEN35_<LONG FLAG>" in out and "command line wins" in out
    for variable in ("LLAMA_ARG_CTX_SIZE", "OLLAMA_CONTEXT_LENGTH", "LLAMA_ARG_N_PARALLEL", "OLLAMA_HOST",
                     "LLAMA_ARG_CACHE_TYPE_K", "LLAMA_ARG_THINK_BUDGET", "LLAMA_API_KEY", "LLAMA_ARG_MODEL"):
        assert len(re.findall(rf"\b{variable}\b", out)) == 1, variable
    assert re.search(r"^\s+-c\s+LLAMA_ARG_CTX_SIZE, OLLAMA_CONTEXT_LENGTH", out, re.MULTILINE)


def test_the_settings_line_names_each_variable_and_never_a_key(monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "4096")
    monkeypatch.setenv("LLAMA_ARG_N_PARALLEL", "2")
    monkeypatch.setenv("LLAMA_API_KEY", "hunter2")
    args = _args("-np", "1")  # the command line's -np: not from the environment
    _check(args)
    line = summary(apply_environment(args))
    assert "-c from LLAMA_ARG_CTX_SIZE=4096" in line and "--api-key from LLAMA_API_KEY" in line
    assert "hunter2" not in line and "N_PARALLEL" not in line
    assert summary(apply_environment(_args())) is not None and summary({}) is None


def test_sampling_defaults_from_the_environment_reach_the_server_settings(monkeypatch):
    monkeypatch.setenv("LLAMA_ARG_TEMPERATURE", "0.5")
    monkeypatch.setenv("QWEN35_TOP_K", "7")
    monkeypatch.setenv("LLAMA_ARG_THINK_BUDGET", "0")
    args = _args("--top-k", "9")
    _check(args)
    settings = server_settings(args)
    assert settings["sampling_defaults"] == {"temperature": 0.5, "top_k": 9}
    assert settings["reasoning_budget"] == 0


def test_serve_started_by_llama_server_variables_alone(fixtures):
    """A container's way: no flags, only variables; the printed slots and the key show they took."""
    environ = {**os.environ, "LLAMA_ARG_MODEL": str(fixtures / "tiny" / "dense-hf"), "LLAMA_ARG_PORT": "0",
               "LLAMA_ARG_CTX_SIZE": "512", "LLAMA_ARG_N_PARALLEL": "2", "LLAMA_ARG_THREADS": "1",
               "LLAMA_API_KEY": "k", "LLAMA_ARG_ALIAS": "tiny"}  # os.environ: cleaned by clean_environment
    process = subprocess.Popen([sys.executable, "-m", "qwen35", "serve"], env=environ, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline, line = time.monotonic() + 60, ""
        while time.monotonic() < deadline and "/v1" not in line:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        assert found, (line, process.stderr.read() if process.poll() is not None else "")
        assert "tiny at" in line and "2 slots of 256 tokens" in line
        url = found.group(1)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [model["id"] for model in models["data"]] == ["tiny"]
    finally:
        process.terminate()
        process.wait(timeout=20)
    err = process.stderr.read()
    assert "settings from the environment: MODEL from LLAMA_ARG_MODEL=" in err and "LLAMA_API_KEY" in err
    assert "=k," not in err and "=k\n" not in err
