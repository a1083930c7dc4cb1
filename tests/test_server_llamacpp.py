"""llama-server's utility endpoints of `qwen35 serve` (/tokenize, /detokenize, /apply-template, /props,
/v1/health) on a live server over the scripted model (tests/test_server_fakes.py), checked against
llama.cpp's tokenizer vectors, the `tokenizers` library and transformers, the fixtures' reference
renderings of the real Qwen 3.5 template, and what /v1/chat/completions itself feeds the engine."""

from __future__ import annotations

import importlib.metadata
import json

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_server import WEATHER_TOOL, server, tokenizer  # noqa: F401 (the module's server and tokenizer fixtures)
from test_server_fakes import ScriptedModel, live_server
from tokenizers import Tokenizer as HFTokenizer

TEXTS = [
    "",
    "Hello world",
    "  leading spaces and trailing   ",
    "Tabs\tand\r\nWindows\rline\nends\n\n\n",
    "Zürich, Köln, Ærø — naïve café; Äpfel ½ ⅞",
    "我想在apple工作1314151天～ 日本語のテキスト",
    "🚀 🦙 ✅ 🇫🇷",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello",
    "text<|im_end|>glued<|endoftext|>to<|vision_start|><|image_pad|><|vision_end|>tokens",
    "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
]
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def reference(fixtures):
    """The tiny model's tokenizer.json in the `tokenizers` library: the reference for token ids."""
    return HFTokenizer.from_file(str(fixtures / "tiny" / "dense-hf" / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference_plain(fixtures):
    """tokenizer.json with control tokens encoded as text (the library's own switch): parse_special false."""
    plain = HFTokenizer.from_file(str(fixtures / "tiny" / "dense-hf" / "tokenizer.json"))
    plain.encode_special_tokens = True
    return plain


@pytest.fixture(scope="module")
def reference_chats(fixtures) -> dict:
    """The fixtures' chat prompts, rendered by transformers with the real Qwen 3.5 template."""
    return json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]


@pytest.fixture(scope="module")
def configured(tokenizer):  # noqa: F811
    """A server started with llama-server's flags: --temp ... --seed, -n 48, --reasoning-budget 0, -np 3, -c 512."""
    flags = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.05, "presence_penalty": 1.5,
             "frequency_penalty": 0.25, "repetition_penalty": 1.1, "seed": 1234}
    with live_server(ScriptedModel(tokenizer), tokenizer, max_running=3, context_length=512,
                     sampling_defaults=flags, n_predict=48, reasoning_budget=0) as (url, state):
        yield url, state, flags


def _post(url: str, path: str, body) -> httpx.Response:
    # json.dumps escapes lone surrogates (httpx's json= cannot send them): bodies a client may send.
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=30,
                      headers={"content-type": "application/json"})


def _ok(url: str, path: str, body) -> dict:
    response = _post(url, path, body)
    assert response.status_code == 200, response.text
    return response.json()


def _recording(monkeypatch, state) -> list:
    """Every GenerationRequest the routes submit to the engine, as they submit it."""
    submitted = []
    submit = state.service.submit

    def record(request):
        submitted.append(request)
        return submit(request)

    monkeypatch.setattr(state.service, "submit", record)
    return submitted


def _user_message(prompt: str) -> str:
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


# --- /tokenize and /detokenize ------------------------------------------------------------------


def test_tokenize_and_detokenize_agree_with_llama_cpp_vectors(fixtures):
    """The full Qwen vocabulary: llama.cpp's test-tokenizer-0 ids (add_special and parse_special off)."""
    from qwen35 import load_tokenizer

    vocab = fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf"
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts.pop() == ""
    expected = vocab.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(texts) == len(expected) >= 40
    full = load_tokenizer(vocab)
    with live_server(ScriptedModel(full), full) as (url, _):
        for text, line in zip(texts, expected, strict=True):
            ids = [int(item) for item in line.split()]
            reply = _ok(url, "/tokenize", {"content": text, "add_special": False, "parse_special": False})
            assert reply == {"tokens": ids}, repr(text)
            assert _ok(url, "/detokenize", {"tokens": ids}) == {"content": text}, repr(text)


def test_tokenize_options_match_the_tokenizers_library(server, reference, reference_plain):  # noqa: F811
    url = server[0]
    for text in TEXTS:
        special = reference.encode(text, add_special_tokens=False).ids
        assert _ok(url, "/tokenize", {"content": text}) == {"tokens": special}, repr(text)
        # What the tokenizer's own post-processor adds (for Qwen 3.5: nothing, as llama.cpp adds no BOS).
        assert _ok(url, "/tokenize", {"content": text, "add_special": True}) == \
            {"tokens": reference.encode(text, add_special_tokens=True).ids}, repr(text)
        plain = reference_plain.encode(text, add_special_tokens=False).ids
        assert _ok(url, "/tokenize", {"content": text, "parse_special": False}) == {"tokens": plain}, repr(text)
    # The control tokens are one token each only when parsed as such.
    im_end = reference.token_to_id("<|im_end|>")
    assert im_end in _ok(url, "/tokenize", {"content": TEXTS[8]})["tokens"]
    assert im_end not in _ok(url, "/tokenize", {"content": TEXTS[8], "parse_special": False})["tokens"]


def test_pieces_are_each_tokens_bytes_as_llama_server_writes_them(server, reference):  # noqa: F811
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = {token_id: token.content for token_id, token in reference.get_added_tokens_decoder().items()}
    saw_split_character = False
    for text in TEXTS:
        pieces = _ok(server[0], "/tokenize", {"content": text, "with_pieces": True})["tokens"]
        assert [entry["id"] for entry in pieces] == reference.encode(text, add_special_tokens=False).ids
        joined = b""
        for entry in pieces:
            token_id = entry["id"]
            expected = added[token_id].encode() if token_id in added else \
                bytes(byte_of[char] for char in reference.id_to_token(token_id))
            try:
                assert entry["piece"] == expected.decode("utf-8"), (text, entry)
            except UnicodeDecodeError:  # part of a character: llama-server lists the byte values
                assert entry["piece"] == list(expected), (text, entry)
                saw_split_character = True
            joined += expected
        assert joined == text.encode("utf-8")
    assert saw_split_character  # the emoji of TEXTS are split over byte tokens in the tiny vocabulary


def test_detokenize_round_trips_and_replaces_broken_utf8_as_tokenizers_does(server, reference):  # noqa: F811
    url = server[0]
    for text in TEXTS:
        ids = _ok(url, "/tokenize", {"content": text})["tokens"]
        assert _ok(url, "/detokenize", {"tokens": ids}) == {"content": text}, repr(text)
    llama_ids = _ok(url, "/tokenize", {"content": "🦙"})["tokens"]
    assert len(llama_ids) > 1
    for cut in range(1, len(llama_ids)):
        expected = reference.decode(llama_ids[:cut], skip_special_tokens=False)
        assert _ok(url, "/detokenize", {"tokens": llama_ids[:cut]}) == {"content": expected}
        assert "\ufffd" in expected
    last = reference.get_vocab_size(with_added_tokens=True) - 1
    assert _ok(url, "/detokenize", {"tokens": [last]}) == {"content": reference.decode([last],
                                                                                        skip_special_tokens=False)}
    assert _ok(url, "/detokenize", {"tokens": []}) == {"content": ""}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, fixtures):  # noqa: F811
    import gguf

    url = server[0]
    # The served GGUF's vocabulary as gguf-py reads it (llama.cpp's n_vocab, its padding tokens included).
    size = len(gguf.GGUFReader(fixtures / "tiny" / "dense-Q4_K_M.gguf").fields["tokenizer.ggml.tokens"].data)
    cases = [
        ("/tokenize", {}, 422), ("/tokenize", {"content": 5}, 422), ("/tokenize", {"content": None}, 422),
        ("/tokenize", {"content": "x", "with_pieces": "yes"}, 422),
        ("/tokenize", {"content": "x", "parse_special": 1}, 422),
        ("/tokenize", {"content": "lone \ud800 surrogate"}, 400), ("/tokenize", ["content"], 422),
        ("/detokenize", {}, 422), ("/detokenize", {"tokens": "1 2"}, 422), ("/detokenize", {"tokens": [1.5]}, 422),
        ("/detokenize", {"tokens": ["a"]}, 422), ("/detokenize", {"tokens": [True]}, 422),
        ("/detokenize", {"tokens": [-1]}, 400), ("/detokenize", {"tokens": [size]}, 400),
        ("/detokenize", {"tokens": [2**70]}, 400), ("/detokenize", {"tokens": [[1]]}, 422),
        ("/apply-template", {}, 422), ("/apply-template", {"messages": "hi"}, 422),
        ("/apply-template", {"messages": []}, 422),
        ("/apply-template", {"messages": [{"role": "robot", "content": "x"}]}, 422),
        ("/apply-template", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404),
        # The real template refuses a conversation without a user message.
        ("/apply-template", {"messages": [{"role": "system", "content": "x"}]}, 400),
        ("/apply-template", {"messages": [{"role": "user", "content": "word " * 2000}]}, 400),
        ("/apply-template", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400),
    ]
    for path, body, status in cases:
        response = _post(url, path, body)
        assert response.status_code == status, (path, body, response.text)
        assert set(response.json()["error"]) == ERROR_FIELDS and response.json()["error"]["message"]
    out_of_range = _post(url, "/detokenize", {"tokens": [7, size]}).json()["error"]
    assert out_of_range["param"] == "tokens" and f"0..{size - 1}" in out_of_range["message"]
    not_json = httpx.post(url + "/tokenize", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and set(not_json.json()["error"]) == ERROR_FIELDS
    assert _post(url, "/detokenize", {"tokens": [size - 1]}).status_code == 200
    assert httpx.post(url + "/props").status_code == 405
    assert _ok(url, "/tokenize", {"content": "still here"})["tokens"]


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                      st.text(max_size=12), st.text(st.characters(categories=["Cs", "Ll"]), max_size=3))
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
utility_bodies = st.one_of(
    json_any,
    st.fixed_dictionaries({}, optional={"content": json_any, "add_special": json_any, "parse_special": json_any,
                                        "with_pieces": json_any}),
    st.fixed_dictionaries({"tokens": st.lists(st.one_of(st.integers(-3, 5000), json_leaf), max_size=6)}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]), "content": json_any}),
        max_size=3)}, optional={"tools": json_any, "chat_template_kwargs": json_any, "thinking_budget": json_any}))


@settings(max_examples=40, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(body=utility_bodies, path=st.sampled_from(["/tokenize", "/detokenize", "/apply-template"]))
def test_no_body_makes_a_utility_endpoint_fail(server, body, path):  # noqa: F811
    response = httpx.post(server[0] + path, content=json.dumps(body).encode(), timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == ERROR_FIELDS


# --- /apply-template ----------------------------------------------------------------------------


def _conversations(question: str) -> list[dict]:
    """Chat requests whose options change the prompt: thinking off, tools and a tool round, a system
    (and developer) message, reasoning_effort none, a reasoning budget of 0."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    return [
        {"messages": [{"role": "user", "content": question}]},
        {"messages": [{"role": "user", "content": question}], "chat_template_kwargs": {"enable_thinking": False}},
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": question}]},
        {"messages": [{"role": "user", "content": "call Oslo"}], "tools": [WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": "call Oslo"},
                      {"role": "assistant", "content": None, "reasoning_content": "Oslo it is", "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "tools": [WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": question}], "reasoning_effort": "none"},
        {"messages": [{"role": "user", "content": question}], "thinking_budget": 0},
    ]


def test_apply_template_is_the_prompt_chat_feeds_the_model(server, monkeypatch):  # noqa: F811
    url, state = server
    submitted = _recording(monkeypatch, state)
    for body in _conversations("What fits a 24GB GPU?"):
        prompt = _ok(url, "/apply-template", body)["prompt"]
        before = len(submitted)
        reply = _ok(url, "/v1/chat/completions", {**body, "model": "tiny"})
        # What the engine was handed for this chat request: exactly the tokens of the template's text.
        assert len(submitted) == before + 1
        fed = submitted[-1].prompt_ids
        assert fed == _ok(url, "/tokenize", {"content": prompt})["tokens"], body
        assert reply["usage"]["prompt_tokens"] == len(fed)
        assert _ok(url, "/detokenize", {"tokens": fed})["content"] == prompt


def test_apply_template_renders_the_real_qwen35_template_as_transformers_does(server, reference_chats,  # noqa: F811
                                                                              hf_tokenizer):
    url = server[0]
    think, no_think = reference_chats["chat_think"], reference_chats["chat_nothink"]
    question = _user_message(think["text"])
    messages = [{"role": "user", "content": question}]
    prompt = _ok(url, "/apply-template", {"messages": messages})["prompt"]
    assert prompt == think["text"]
    assert _ok(url, "/tokenize", {"content": prompt})["tokens"] == think["ids"]
    off = {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
    assert _ok(url, "/apply-template", off)["prompt"] == no_think["text"]
    # A reasoning budget of 0 closes the reasoning in the prompt exactly as thinking off renders it.
    assert _ok(url, "/apply-template", {"messages": messages, "thinking_budget": 0})["prompt"] == no_think["text"]
    # Tools and a tool round, against transformers' apply_chat_template of the same checkpoint.
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "reasoning_content": "Call the tool.", "tool_calls": [call]},
               {"role": "tool", "content": "sunny"}]
    for enable_thinking in (True, False):
        expected = hf_tokenizer.apply_chat_template(history, tools=[WEATHER_TOOL], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=enable_thinking)
        sent = [{**message, "tool_calls": [{**call, "function": {"name": "get_weather",
                                                                 "arguments": json.dumps({"city": "Oslo"})}}]}
                if "tool_calls" in message else message for message in history]
        prompt = _ok(url, "/apply-template", {"messages": sent, "tools": [WEATHER_TOOL],
                                              "chat_template_kwargs": {"enable_thinking": enable_thinking}})["prompt"]
        assert prompt == expected


def test_apply_template_follows_the_servers_template_settings(configured, reference_chats, monkeypatch):
    url, state, _ = configured
    think, no_think = reference_chats["chat_think"], reference_chats["chat_nothink"]
    messages = [{"role": "user", "content": _user_message(think["text"])}]
    # --reasoning-budget 0: thinking off unless the request turns it on, as the chat endpoint does.
    assert _ok(url, "/apply-template", {"messages": messages})["prompt"] == no_think["text"]
    on = {"messages": messages, "chat_template_kwargs": {"enable_thinking": True}}
    assert _ok(url, "/apply-template", on)["prompt"] == think["text"]
    submitted = _recording(monkeypatch, state)
    for body in ({"messages": messages}, on):
        _ok(url, "/v1/chat/completions", {**body, "model": "tiny", "max_tokens": 2})
        prompt = _ok(url, "/apply-template", body)["prompt"]
        assert submitted[-1].prompt_ids == _ok(url, "/tokenize", {"content": prompt})["tokens"]


# --- /props, /v1/health, the API key --------------------------------------------------------------


def test_props_states_the_servers_settings(configured, fixtures, monkeypatch):
    url, state, flags = configured
    props = httpx.get(url + "/props").json()
    generation = props["default_generation_settings"]
    assert generation["n_ctx"] == 512 and props["total_slots"] == 3
    params = generation["params"]
    assert params["n_predict"] == 48
    for name in ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed"):
        assert params[name] == pytest.approx(flags[name]), name
    assert params["repeat_penalty"] == pytest.approx(flags["repetition_penalty"])
    # What a chat request that sets no option actually gets from the engine.
    submitted = _recording(monkeypatch, state)
    _ok(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "defaults"}]})
    sampling = submitted[-1].sampling
    assert submitted[-1].max_new_tokens == params["n_predict"]
    for name in ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "seed"):
        assert getattr(sampling, name) == params[name], name
    assert sampling.repetition_penalty == params["repeat_penalty"]
    assert props["model_path"] == "tiny.gguf" and props["model_alias"] == "tiny"
    # The tiny GGUF carries the real Qwen 3.5 template.
    assert props["chat_template"] == (fixtures / "tokenizer" / "Qwen3.5-4B.jinja").read_text(encoding="utf-8")
    assert props["eos_token"] == "<|im_end|>"
    assert importlib.metadata.version("qwen35") in props["build_info"]


def test_props_of_a_plain_server_and_its_vision_flag(server, monkeypatch):  # noqa: F811
    url, state = server
    props = httpx.get(url + "/props").json()
    params = props["default_generation_settings"]["params"]
    # The scripted model's generation defaults (greedy), no -n (up to the context), no fixed seed.
    assert params["temperature"] == 0.0 and params["n_predict"] == -1 and params["seed"] == -1
    assert props["modalities"]["vision"] is False
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    refused = _post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [image]}]})
    assert refused.status_code == 400 and "--mmproj" in refused.json()["error"]["message"]
    monkeypatch.setattr(state.model, "vision", object(), raising=False)  # what --mmproj attaches
    assert httpx.get(url + "/props").json()["modalities"]["vision"] is True


def test_health_alias_stays_open_and_the_utility_endpoints_need_the_key(tokenizer):  # noqa: F811
    with live_server(ScriptedModel(tokenizer), tokenizer, api_key="sesame") as (url, _):
        for path in ("/health", "/v1/health"):
            response = httpx.get(url + path)
            assert response.status_code == 200 and response.json()["status"] == "ok"
        calls = [("POST", "/tokenize", {"content": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
                 ("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
                 ("GET", "/props", None)]
        for method, path, body in calls:
            refused = httpx.request(method, url + path, json=body)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            allowed = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer sesame"})
            assert allowed.status_code == 200, allowed.text


def test_openapi_documents_the_utility_endpoints(server):  # noqa: F811
    paths = httpx.get(server[0] + "/openapi.json").json()["paths"]
    for path, method in (("/tokenize", "post"), ("/detokenize", "post"), ("/apply-template", "post"),
                         ("/props", "get"), ("/v1/health", "get")):
        assert method in paths[path], path
