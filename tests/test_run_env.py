"""`qwen35 run`'s flags from environment variables, as llama-cli reads them: each variable gives the same settings
as the flag it stands for does on the command line (argparse's parse of that flag is the reference), under the
names llama-cli documents (llama.cpp tools/cli/README.md, "(env: ...)" per flag, generated from common/arg.cpp's
set_env; the older names from before a flag was renamed, from common/arg.cpp of that time). Precedence is
command line > QWEN35_* > LLAMA_ARG_* > the built-in default; a bad value is one line naming the variable before
any model loads. Ollama's server variables are not read (`ollama run` is a client of that server), nor the names
of flags run lacks (llama-server's -np, --host ...: llama.cpp reads a name only in the tools that have its flag);
`qwen35 bench` reads none, as llama-bench reads none. Only the end-to-end test loads a model."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest
import test_server_env as serve_env
from test_run_command import _reference_text, qwen35
from test_server_env import clean_environment  # noqa: F401 (autouse: no variable from the shell running the tests)

from qwen35.chat.command import RUN_VARIABLES
from qwen35.cli import main


def _settings(*words, command="run") -> dict:
    return serve_env._settings(*words, command=command)


def _with(monkeypatch, environ: dict, *words) -> dict:
    return serve_env._with(monkeypatch, environ, *words, command="run")


# llama-cli's documented variable for each flag run has (tools/cli/README.md; those of the flags serve has too:
# test_server_env.py): variable, value, the same setting on llama-cli's command line.
LLAMA_CLI_DOCUMENTED = serve_env.LLAMA_SHARED_DOCUMENTED + [
    ("LLAMA_ARG_CTX_SIZE", "0", ["-c", "0"]),  # llama.cpp: "0 = loaded from model"; run's -c 0 is the same
    ("LLAMA_ARG_N_GPU_LAYERS", "all", ["-ngl", "999"]),  # more than the layers: all of them and the head
    ("LLAMA_ARG_REASONING", "on", ["--think"]),  # -rea on|off|auto: thinking on or off in the chat
    ("LLAMA_ARG_REASONING", "off", ["--no-think"]),
    ("LLAMA_ARG_REASONING", "enabled", ["--think"]),  # is_truthy's words too
]


@pytest.mark.parametrize("variable, value, flags", LLAMA_CLI_DOCUMENTED)
def test_each_llama_cli_variable_sets_what_its_flag_does(monkeypatch, variable, value, flags):
    serve_env.check_variable_sets_what_flags_do(monkeypatch, variable, value, flags, command="run")


@pytest.mark.parametrize("variable", ["LLAMA_ARG_MODEL", "LLAMA_ARG_HF_REPO", "QWEN35_MODEL"])
def test_the_model_may_come_from_the_environment(monkeypatch, variable):
    """llama-cli's -m (or -hf) from the environment is run's MODEL; the prompt then goes with -p, as in llama-cli."""
    assert _with(monkeypatch, {variable: "m.gguf"}, "-p", "hi") == _settings("m.gguf", "-p", "hi")
    assert _with(monkeypatch, {variable: "m.gguf"}, "given.gguf", "hi")["model"] == "given.gguf"


# Our own spelling: QWEN35_ and the long flag, for every flag run has (the prompt and --image aside).
QWEN35_SPELLINGS = serve_env.QWEN35_SHARED_SPELLINGS + [
    ("QWEN35_SYSTEM_PROMPT", "Be brief.", ["-sys", "Be brief."]),
    ("QWEN35_THINK", "1", ["--think"]), ("QWEN35_THINK", "off", ["--no-think"]),
    ("QWEN35_HIDE_THINKING", "true", ["--hide-thinking"]), ("QWEN35_VERBOSE", "1", ["--verbose"]),
]


@pytest.mark.parametrize("variable, value, flags", QWEN35_SPELLINGS)
def test_each_qwen35_variable_sets_what_its_flag_does(monkeypatch, variable, value, flags):
    serve_env.check_variable_sets_what_flags_do(monkeypatch, variable, value, flags, command="run")


def test_every_run_flag_but_the_prompt_and_images_has_a_qwen35_variable():
    left_out = ("-p", "--prompt", "--image")  # a variable for a one-shot prompt would turn every chat into one
    serve_env.check_every_flag_has_a_qwen35_variable("run", RUN_VARIABLES, QWEN35_SPELLINGS, left_out)


def test_the_command_line_wins_then_qwen35_then_llama_cpp(monkeypatch):
    default = _settings("model.gguf")["context"]
    monkeypatch.setenv("QWEN35_CTX_SIZE", "2048")
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "4096")
    assert _settings("model.gguf", "-c", "1024")["context"] == 1024
    assert _settings("model.gguf")["context"] == 2048
    monkeypatch.delenv("QWEN35_CTX_SIZE")
    assert _settings("model.gguf")["context"] == 4096
    monkeypatch.delenv("LLAMA_ARG_CTX_SIZE")
    assert _settings("model.gguf")["context"] == default
    # --think/--no-think on the command line over QWEN35_THINK over llama.cpp's -rea.
    monkeypatch.setenv("LLAMA_ARG_REASONING", "on")
    monkeypatch.setenv("QWEN35_THINK", "0")
    assert _settings("model.gguf")["think"] is False
    assert _settings("model.gguf", "--think")["think"] is True
    monkeypatch.delenv("QWEN35_THINK")
    assert _settings("model.gguf")["think"] is True and _settings("model.gguf", "--no-think")["think"] is False


@pytest.mark.parametrize("variable, value", [
    ("LLAMA_ARG_THREADS", "-1"),  # llama.cpp's default: all the cores; here torch's choice
    ("LLAMA_ARG_N_GPU_LAYERS", "auto"),
    ("LLAMA_ARG_N_GPU_LAYERS", "-1"),
    ("LLAMA_ARG_REASONING", "auto"),  # the template decides: the model's own default
    ("LLAMA_ARG_REASONING", "-1"),
    ("LLAMA_ARG_SPEC_TYPE", "draft-simple"),  # drafting with -md, which -md alone does here
    ("LLAMA_ARG_N_CPU_MOE", ""),  # an empty variable counts as unset
    ("QWEN35_TEMP", "  "),
])
def test_the_defaults_spelled_as_llama_cpp_spells_them(monkeypatch, variable, value):
    assert _with(monkeypatch, {variable: value}, "model.gguf") == _settings("model.gguf")


@pytest.mark.parametrize("environ", [
    # Ollama's server variables: `ollama run` sends its requests to that server, which has them; run has none.
    {"OLLAMA_CONTEXT_LENGTH": "2048", "OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_HOST": "0.0.0.0:1"},
    # llama-server's names for flags run lacks: llama.cpp reads a name only in the tools that have its flag.
    {"LLAMA_ARG_N_PARALLEL": "abc", "LLAMA_ARG_PORT": "http", "LLAMA_API_KEY": "a,b", "LLAMA_ARG_THINK": "raw"},
])
def test_run_reads_neither_ollama_nor_server_only_variables(monkeypatch, capsys, tmp_path, environ):
    assert _with(monkeypatch, environ, "model.gguf") == _settings("model.gguf")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["run", str(tmp_path / "absent.gguf"), "hi"]) == 1
    assert "no model at" in capsys.readouterr().err  # not a complaint about a variable


def test_bench_reads_no_variables_as_llama_bench_reads_none(monkeypatch):
    before = _settings("model.gguf", command="bench")
    for name, value in {"LLAMA_ARG_THREADS": "3", "QWEN35_THREADS": "2", "LLAMA_ARG_N_GPU_LAYERS": "5",
                        "LLAMA_ARG_CACHE_TYPE_K": "q8_0", "LLAMA_ARG_CTX_SIZE": "abc"}.items():
        monkeypatch.setenv(name, value)
    assert _settings("model.gguf", command="bench") == before


def _one_error_line(capsys, *words) -> str:
    return serve_env._one_error_line(capsys, *words, command="run")


# VARIABLE=value, and what the line says of it: the reader's complaint ("not ..."), or the line of run's own check
# of the flag, which then names the variable after it.
BAD_VALUES = [
    ("LLAMA_ARG_THREADS=abc", "not a number of threads"),
    ("LLAMA_ARG_CTX_SIZE=8k", "not a number of tokens"),
    ("LLAMA_ARG_REASONING=maybe", "not on, off or auto"),
    ("LLAMA_ARG_N_GPU_LAYERS=most", "not a number of layers, auto or all"),
    ("QWEN35_TEMP=warm", "not a number"),
    ("QWEN35_DEVICE=tpu", "not a device (auto, cpu, cuda or cuda:N)"),
    ("QWEN35_HIDE_THINKING=maybe", "not a boolean (use one of 1, true, on, enabled, 0, false, off, disabled)"),
    ("LLAMA_ARG_SPEC_TYPE=ngram-mod", "not a speculation type here (use one of none, draft-mtp, mtp)"),
    ("QWEN35_THREADS=0", "-t must be at least 1, got 0"),
    ("LLAMA_ARG_CTX_SIZE=5", "-c must be at least 16 tokens (or 0 for the model's own), got 5"),
    ("LLAMA_ARG_N_PREDICT=0", "-n must be a number of tokens >= 1, or -1 for no limit, got 0"),
    ("LLAMA_ARG_TEMPERATURE=-1", "--temp -1.0: temperature must be 0 (greedy) or more, got -1.0"),
    ("LLAMA_ARG_TOP_P=0", "--top-p 0.0: top_p must be in (0, 1], got 0.0"),
    ("QWEN35_CACHE_TYPE_K=x", "-ctk x: not a K/V cache type (use one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)"),
    ("LLAMA_ARG_CHAT_TEMPLATE_KWARGS=[1]",
     "--chat-template-kwargs must be a JSON object, like '{\"enable_thinking\": false}'"),
    ("LLAMA_ARG_SPEC_DRAFT_N_MAX=0", "--draft-max must be between 1 and 64, got 0"),
    ("LLAMA_ARG_MMPROJ=/nonexistent/mmproj.gguf", "--mmproj /nonexistent/mmproj.gguf: no such file"),
]


@pytest.mark.parametrize("setting, complaint", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_variable_before_any_model_loads(
        monkeypatch, capsys, tmp_path, setting, complaint):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the variables were checked")

    monkeypatch.setattr("qwen35.load_model", no_loading)
    monkeypatch.setattr("qwen35.load_tokenizer", no_loading)
    monkeypatch.setenv(*setting.split("=", 1))
    line = _one_error_line(capsys, str(tmp_path / "absent.gguf"), "hi")  # before the model is looked at
    said = f"{setting}: {complaint}" if complaint.startswith("not ") else f"{complaint} (from {setting})"
    assert line == f"qwen35 run: error: {said}"


def test_a_bad_variable_stops_run_even_under_its_flag_as_in_llama_cpp(monkeypatch, capsys, tmp_path):
    """llama.cpp parses every variable that is set, whatever the command line says."""
    monkeypatch.setenv("LLAMA_ARG_THREADS", "abc")
    line = _one_error_line(capsys, str(tmp_path / "absent.gguf"), "hi", "-t", "2")
    assert line == "qwen35 run: error: LLAMA_ARG_THREADS=abc: not a number of threads"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_question_taken_for_the_model_says_how_to_run_the_environments_model(monkeypatch, capsys):
    """`qwen35 run "a question"` with LLAMA_ARG_MODEL set: argparse takes the question for MODEL, which goes over
    the variable as any command line does; the error says so, and how to run the variable's model."""
    monkeypatch.setattr(sys, "stdin", _Terminal(""))  # typed at a terminal: the chat would open
    monkeypatch.setenv("LLAMA_ARG_MODEL", "qwen3.5:0.8b")
    line = _one_error_line(capsys, "hello")
    assert line.startswith("qwen35 run: error: 'hello' is neither a file nor a model name")
    assert line.endswith("(MODEL on the command line goes over LLAMA_ARG_MODEL=qwen3.5:0.8b; "
                         "to run that model, give the prompt as -p TEXT)")
    monkeypatch.delenv("LLAMA_ARG_MODEL")  # without the variable, the same error has no such note
    assert "LLAMA_ARG_MODEL" not in _one_error_line(capsys, "hello")


def test_without_a_model_anywhere_run_says_where_one_comes_from(capsys):
    expected = "qwen35 run: error: give the MODEL to run (or set QWEN35_MODEL or LLAMA_ARG_MODEL)"
    assert _one_error_line(capsys, "-p", "hi") == expected


def test_help_names_the_scheme_and_each_flags_llama_cli_variables_once(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "QWEN35_<LONG FLAG>" in out and "command line wins" in out and "no OLLAMA_*" in out
    for variable in ("LLAMA_ARG_MODEL", "LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_THREADS", "LLAMA_ARG_REASONING",
                     "LLAMA_ARG_CACHE_TYPE_K", "LLAMA_ARG_THINK_BUDGET", "LLAMA_ARG_SPEC_DRAFT_N_MAX"):
        assert len(re.findall(rf"\b{variable}\b", out)) == 1, variable
    assert re.search(r"^\s+-c\s+LLAMA_ARG_CTX_SIZE$", out, re.MULTILINE)
    assert "LLAMA_ARG_N_PARALLEL" not in out and "OLLAMA_CONTEXT_LENGTH" not in out


def test_a_one_shot_answer_from_llama_cli_variables_alone(dense_hf, dense_sequences, dense_tokenizer):
    """A container's way: the model and the settings from llama-cli's variables, only the prompt on the
    command line; the answer is transformers' greedy reasoning for the question (2 tokens of it)."""
    sequence = dense_sequences["chat_think"]
    question = "Which Qwen 3.5 model fits a 24GB GPU?"
    assert dense_tokenizer.apply_chat_template([{"role": "user", "content": question}]) == sequence["text"]
    expected = _reference_text(dense_tokenizer, sequence["transformers_greedy"][:2])
    environ = {**os.environ, "LLAMA_ARG_MODEL": str(dense_hf), "LLAMA_ARG_TEMPERATURE": "0",
               "LLAMA_ARG_N_PREDICT": "2", "LLAMA_ARG_REASONING": "on", "LLAMA_ARG_THREADS": "1",
               "LLAMA_ARG_CTX_SIZE": "512"}  # os.environ: cleaned by clean_environment

    result = qwen35("run", "-p", question, env=environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Thinking...\n{expected}\n...done thinking.\n\n"
    assert (f"qwen35 run: settings from the environment: MODEL from LLAMA_ARG_MODEL={dense_hf}, -c from "
            "LLAMA_ARG_CTX_SIZE=512, --temp from LLAMA_ARG_TEMPERATURE=0") in result.stderr
