"""`qwen35 serve` with llama-server's flags: the sampling defaults and -n reach requests that do not set
their own (checked against transformers' greedy tokens of the tiny fixture), --chat-template-kwargs and
--chat-template-file render as transformers' apply_chat_template does, --reasoning-format none leaves the
reasoning in the content, and every bad value is one line before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
from test_server_cli import _start
from test_server_fakes import ASSISTANT, ScriptedModel, live_server, scripted_reply

from qwen35.cli import build_parser
from qwen35.errors import Qwen35Error
from qwen35.server.app import ServerState
from qwen35.server.command import _check, listen_address, served_template, server_settings
from qwen35.server.prompting import render_chat, sampling_params

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a sea."},
                {"role": "assistant", "content": "The Baltic."},
                {"role": "user", "content": "And an ocean?"}]


def _args(*flags):
    return build_parser().parse_args(["serve", "model.gguf", *flags])


@pytest.fixture(scope="module")
def tokenizer(fixtures):
    from qwen35 import load_tokenizer

    return load_tokenizer(fixtures / "tiny" / "dense-hf")


class _Model:
    generation_defaults = {"do_sample": False, "temperature": 0.6, "top_p": 0.95}


def _state(tokenizer=None, **settings) -> ServerState:
    return ServerState(model=_Model(), tokenizer=tokenizer, service=None, model_name="m", **settings)


# --- end to end: a llama-server command line ------------------------------------------------------


def test_llama_server_command_line_samples_with_its_flags(fixtures, hf_tokenizer):
    sequence = json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]["chat_think"]
    greedy = sequence["transformers_greedy"]
    process, url = _start(fixtures, "-a", "tiny", "--temp", "0", "-n", "3", "--jinja", "-fa", "on", "-cb",
                          "--metrics", "--no-webui", "-b", "2048", "-ub", "512", "--mlock", "--no-mmap")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # No temperature, no max_tokens: --temp 0 (greedy) and -n 3.
        reply = client.completions.create(model="tiny", prompt=sequence["ids"])
        assert reply.usage.completion_tokens == 3
        assert reply.choices[0].text == hf_tokenizer.decode(greedy[:3])
        # The request's own limit wins over -n.
        reply = client.completions.create(model="tiny", prompt=sequence["ids"], max_tokens=5)
        assert reply.usage.completion_tokens == 5
        assert reply.choices[0].text == hf_tokenizer.decode(greedy[:5])
        chat = client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "Which Qwen 3.5 model fits a 24GB GPU?"}])
        assert chat.usage.prompt_tokens == len(sequence["ids"]) and chat.usage.completion_tokens == 3
        assert chat.choices[0].message.model_extra["reasoning_content"] == hf_tokenizer.decode(greedy[:3]).strip()
        ollama_reply = httpx.post(url + "/api/chat", timeout=60, json={
            "model": "tiny", "stream": False, "messages": [{"role": "user", "content": "hi"}]}).json()
        assert ollama_reply["eval_count"] == 3
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_bad_value_or_unknown_flag_is_one_line_before_the_model_loads(fixtures, tmp_path):
    model = str(fixtures / "tiny" / "dense-hf")
    (tmp_path / "broken.jinja").write_text("{% if messages %}", encoding="utf-8")
    for flags, code, words in ((["--temp", "-1"], 1, "--temp"), (["--reasoning-format", "raw"], 1, "none"),
                               (["--chat-template-file", str(tmp_path / "broken.jinja")], 1, "not valid Jinja"),
                               (["--flash-attention-please"], 2, "unrecognized")):
        result = subprocess.run([sys.executable, "-m", "qwen35", "serve", model, *flags],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "loading" not in result.stderr


# --- flag checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--temp", "-0.5"], "--temp"), (["--top-p", "0"], "--top-p"), (["--top-k", "-3"], "--top-k"),
    (["--min-p", "1.5"], "--min-p"), (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--presence-penalty", "3"], "--presence-penalty"), (["--frequency-penalty", "-2.5"], "--frequency-penalty"),
    (["-n", "0"], "-n"), (["-n", "-3"], "-n"), (["--reasoning-format", "deepseek-legacy"], "--reasoning-format"),
    (["--reasoning-budget", "-2"], "--reasoning-budget"), (["-fa", "maybe"], "-fa"), (["-b", "0"], "-b"),
    (["-ub", "-1"], "-ub"), (["--chat-template-kwargs", "{enable_thinking: false}"], "not valid JSON"),
    (["--chat-template-kwargs", "[1, 2]"], "JSON object"), (["--chat-template-file", "/no/such.jinja"], "/no/such"),
    (["--reasoning-budget", "0", "--chat-template-kwargs", '{"enable_thinking": true}'], "turns it on"),
    (["--host", "https://example.org"], "plain HTTP"), (["--host", "0.0.0.0:port"], "must be a number"),
    (["--host", "0.0.0.0:9000", "--port", "9001"], "give the port once"), (["--host", "[::1"], "IPv6"),
    (["--host", "127.0.0.1:70000"], "--port"), (["--draft-max", "0"], "--draft-max"),
    (["--draft-p-min", "1.5"], "--draft-p-min"), (["--draft-min", "4", "--draft-max", "3"], "--draft-min"),
    (["--spec-type", "draft-mtp", "-md", "draft.gguf"], "one drafter"),
    (["--speculative-config", "{method: mtp}"], "not valid JSON"),
    (["--speculative-config", '{"method": "eagle3", "model": "x"}'], "not supported"),
    (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 0}'], "--draft-max"),
    (["--speculative-config", '{"method": "mtp"}', "--mtp"], "not both"),
])
def test_bad_values_are_one_line_errors(flags, words):
    with pytest.raises(Qwen35Error, match=None) as error:
        _check(_args(*flags))
    message = str(error.value)
    assert words in message and "\n" not in message


def test_accepted_flags_and_aliases_check_out():
    args = _args("--alias", "qwen", "-fa", "-fa", "off", "--seed", "-1", "-n", "-1", "--reasoning-format", "deepseek",
                 "--chat-template-kwargs", '{"enable_thinking": false}', "--reasoning-budget", "0")
    _check(args)
    assert args.name == "qwen" and args.flash_attn == "off"
    settings = server_settings(args)
    assert settings["sampling_defaults"] == {}  # --seed -1: llama.cpp's random seed, no default seed
    assert settings["chat_template_kwargs"] == {"enable_thinking": False}
    assert _args("-a", "x").name == "x"
    speculative = _args("--spec-type", "draft-mtp", "--spec-draft-n-max", "2", "--draft-p-min", "0.5")
    _check(speculative)
    assert (speculative.spec_type, speculative.draft_max, speculative.draft_p_min) == ("draft-mtp", 2, 0.5)
    assert _args("--mtp").spec_type == "draft-mtp" and _args("-md", "d.gguf", "--draft", "5").draft_max == 5
    vllm = _args("--speculative-config", '{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}')
    _check(vllm)
    assert (vllm.spec_type, vllm.draft_max, vllm.draft_p_min) == ("draft-mtp", 2, 0.0)
    vllm_draft = _args("--speculative-config", '{"model": "Qwen3.5-0.8B-Q8_0.gguf", "num_speculative_tokens": 4}')
    _check(vllm_draft)
    assert (vllm_draft.draft_model, vllm_draft.draft_max) == ("Qwen3.5-0.8B-Q8_0.gguf", 4)


@pytest.mark.parametrize("host, port, expected", [
    ("127.0.0.1", None, ("127.0.0.1", 8080)), ("0.0.0.0:11434", None, ("0.0.0.0", 11434)),
    ("http://localhost:9000/", None, ("localhost", 9000)), ("[::1]:8081", None, ("::1", 8081)),
    ("::1", 0, ("::1", 0)), (":8000", None, ("127.0.0.1", 8000)), ("0.0.0.0:9000", 9000, ("0.0.0.0", 9000)),
])
def test_host_takes_ollama_host_forms(host, port, expected):
    assert listen_address(host, port) == expected


def test_qwen35_host_is_the_default_host(monkeypatch):
    assert _args().host == "127.0.0.1"
    monkeypatch.setenv("QWEN35_HOST", "0.0.0.0:11434")
    assert listen_address(_args().host, _args().port) == ("0.0.0.0", 11434)
    assert _args("--host", "localhost").host == "localhost"


# --- what the flags do to requests ----------------------------------------------------------------


def test_sampling_flags_override_the_model_defaults_and_requests_override_them():
    state = _state(**server_settings(_args("--temp", "0.5", "--top-k", "7", "--repeat-penalty", "1.1",
                                           "--seed", "42")))
    params = sampling_params(state, {})
    # The flags over the model's generation_config (whose do_sample=false would have meant greedy).
    assert (params.temperature, params.top_k, params.repetition_penalty, params.seed) == (0.5, 7, 1.1, 42)
    assert params.top_p == _Model.generation_defaults["top_p"]
    params = sampling_params(state, {"temperature": 0.9, "top_k": 3, "seed": None})
    assert (params.temperature, params.top_k, params.seed) == (0.9, 3, 42)
    # Without flags the model's defaults stand, do_sample=false included.
    assert sampling_params(_state(), {}).temperature == 0.0


@pytest.mark.parametrize("flags", [["--chat-template-kwargs", '{"enable_thinking": false}'],
                                   ["--reasoning-budget", "0"]])
def test_template_kwargs_flag_renders_as_transformers(tokenizer, hf_tokenizer, flags):
    state = _state(tokenizer, **server_settings(_args(*flags)))
    for request_kwargs, thinking in (({}, False), ({"enable_thinking": True}, True)):
        expected = hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=thinking)
        assert render_chat(state, CONVERSATION, None, request_kwargs) == expected


def test_chat_template_file_renders_as_transformers(tmp_path, tokenizer, hf_tokenizer):
    source = ("{% for m in messages %}<|im_start|>{{ m.role | upper }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% if greeting %}{{ greeting }}{% endif %}"
              "{% endif %}")
    (tmp_path / "template.jinja").write_text(source, encoding="utf-8")
    args = _args("--chat-template-file", str(tmp_path / "template.jinja"),
                 "--chat-template-kwargs", '{"greeting": "Hello"}')
    _check(args)
    state = _state(tokenizer, chat_template=served_template(source, tokenizer.template_tokens), **server_settings(args))
    expected = hf_tokenizer.apply_chat_template(CONVERSATION, chat_template=source, tokenize=False,
                                                add_generation_prompt=True, greeting="Hello")
    assert render_chat(state, CONVERSATION) == expected
    # The wrapped tokenizer still encodes and decodes as the model's does.
    assert state.tokenizer.encode(expected) == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("source, words", [("{% for m in messages %}", "not valid Jinja"),
                                           ("{{ messages.__class__.__mro__ }}", "stopped")])
def test_a_broken_or_escaping_template_file_is_refused(tmp_path, source, words):
    (tmp_path / "template.jinja").write_text(source, encoding="utf-8")
    with pytest.raises(Qwen35Error, match=words):
        _check(_args("--chat-template-file", str(tmp_path / "template.jinja")))


@pytest.fixture(scope="module")
def gguf_tokenizer(fixtures):
    from qwen35 import load_tokenizer

    return load_tokenizer(fixtures / "tiny" / "dense-Q4_K_M.gguf")


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_format_none_leaves_the_think_block_in_content(gguf_tokenizer, hf_tokenizer, stream):
    messages = [{"role": "user", "content": "hello"}]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(ASSISTANT + "<think>\n")
    expected = "<think>\n" + scripted_reply(prompt).removesuffix("<|im_end|>")
    with live_server(ScriptedModel(gguf_tokenizer), gguf_tokenizer, reasoning_format="none") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model="tiny", messages=messages, stream=stream)
        if stream:
            chunks = list(reply)
            content = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
            reasoning = "".join((choice.delta.model_extra or {}).get("reasoning_content") or ""
                                for chunk in chunks for choice in chunk.choices)
        else:
            content = reply.choices[0].message.content
            reasoning = reply.choices[0].message.model_extra.get("reasoning_content") or ""
    assert "</think>" in expected and (content, reasoning) == (expected, "")


def test_thinking_off_by_flag_reaches_the_routes(gguf_tokenizer):
    """--chat-template-kwargs over a live server: no reasoning unless a request turns it back on."""
    settings = {"chat_template_kwargs": {"enable_thinking": False}}
    with live_server(ScriptedModel(gguf_tokenizer), gguf_tokenizer, **settings) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        message = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}]) \
            .choices[0].message
        assert (message.content, message.model_extra.get("reasoning_content")) == ("Answer: hi", None)
        message = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 extra_body={"chat_template_kwargs": {"enable_thinking": True}}) \
            .choices[0].message
        assert message.model_extra.get("reasoning_content") == "Thinking about hi"
        ollama_reply = httpx.post(url + "/api/chat", timeout=30, json={
            "model": "tiny", "stream": False, "think": True,
            "messages": [{"role": "user", "content": "hi"}]}).json()
        assert ollama_reply["message"]["thinking"] == "Thinking about hi"
