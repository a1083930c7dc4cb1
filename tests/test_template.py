"""Chat templates: byte-identical to transformers' apply_chat_template, and sandboxed."""

import json
from pathlib import Path

import pytest

import qwen35
from qwen35.chat.template import ChatTemplate, ChatTemplateError, default_template_source

CASES_FILE = Path(__file__).parent / "data" / "template_cases.json"
CASES = json.loads(CASES_FILE.read_text(encoding="utf-8"))["cases"]
RENDERED = [case for case in CASES if "expected" in case]
REFUSED = [case for case in CASES if "error" in case]


@pytest.fixture(scope="module", params=["dense-hf", "dense-Q8_0.gguf"])
def tokenizer(request, fixtures):
    return qwen35.load_tokenizer(fixtures / "tiny" / request.param)


def render(tokenizer, case):
    return tokenizer.apply_chat_template(
        case["messages"],
        tools=case["tools"],
        add_generation_prompt=case["add_generation_prompt"],
        **case["template_kwargs"],
    )


def test_enough_reference_conversations():
    assert len(RENDERED) >= 20


@pytest.mark.parametrize("case", RENDERED, ids=[case["name"] for case in RENDERED])
def test_matches_transformers(tokenizer, case):
    text = render(tokenizer, case)
    assert text == case["expected"]
    assert tokenizer.encode(text) == case["expected_ids"]


@pytest.mark.parametrize("case", REFUSED, ids=[case["name"] for case in REFUSED])
def test_refuses_like_transformers(tokenizer, case):
    with pytest.raises(ChatTemplateError, match="refused the conversation: " + case["error"]):
        render(tokenizer, case)


def test_model_templates_are_the_real_one(fixtures):
    real = (fixtures / "tokenizer" / "Qwen3.5-4B.jinja").read_text(encoding="utf-8")
    assert default_template_source() == real
    for name in ("dense-hf", "dense-Q8_0.gguf"):
        assert qwen35.load_tokenizer(fixtures / "tiny" / name).chat_template.source == real


def test_built_in_template_when_the_file_has_none(fixtures, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((fixtures / "tiny" / "dense-hf" / name).read_bytes())
    tokenizer = qwen35.load_tokenizer(tmp_path)
    case = RENDERED[0]
    assert render(tokenizer, case) == case["expected"]


def test_named_templates_and_extras():
    template = ChatTemplate(
        {
            "default": "{{ messages[0].content }}|{{ eos_token }}|{{ x | tojson(indent=1) }}",
            "tool_use": "{% generation %}{{ tools | length }}{% endgeneration %}"
            "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
        },
        special_tokens={"eos_token": "<|im_end|>"},
    )
    messages = [{"role": "user", "content": "é"}]
    assert template.render(messages, x={"k": "ü"}) == 'é|<|im_end|>|{\n "k": "ü"\n}'
    assert template.render(messages, tools=[{"name": "f"}, {"name": "g"}]) == "201"
    assert len(ChatTemplate("{{ strftime_now('%Y') }}").render(messages)) == 4


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ self._TemplateReference__context.joiner.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages[0]['__class__'] }}",
        "{{ (messages|attr('__class__')) }}",
        "{% set ns = namespace(_private=1) %}",
        "{{ messages.append(1) }}",
        "{{ '{0.__class__}'.format(messages) }}",
    ],
)
def test_template_injection_is_stopped(payload):
    with pytest.raises(ChatTemplateError, match="Python internals"):
        ChatTemplate(payload).render([{"role": "user", "content": "hi"}])


def test_broken_templates_and_inputs_fail_clearly():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}").render(messages)
    with pytest.raises(ChatTemplateError, match="rendering the chat template failed"):
        ChatTemplate("{{ 1 + 'a' }}").render(messages)
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        ChatTemplate("x").render([])
    with pytest.raises(ChatTemplateError, match="must be an object"):
        ChatTemplate("x").render(["hi"])


def test_rich_objects_reach_the_template_as_placeholders():
    class Picture:
        def save(self, path):  # a method a template must never reach
            raise AssertionError("called")

    template = ChatTemplate("{{ messages[0].content[0].image }}{{ messages[0].content[0].image.save }}")
    assert template.render([{"role": "user", "content": [{"type": "image", "image": Picture()}]}]) == "<Picture>"


def test_where_templates_are_found(fixtures, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((fixtures / "tiny" / "dense-hf" / "tokenizer.json").read_bytes())
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = qwen35.load_tokenizer(tmp_path)
    assert tokenizer.apply_chat_template(messages) == "D"
    assert tokenizer.apply_chat_template(messages, tools=[]) == "T"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert qwen35.load_tokenizer(tmp_path).apply_chat_template(messages) == "J1"

    from qwen35.chat.tokenizer import tokenizer_from_gguf_metadata

    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b"],
        "tokenizer.chat_template": "G",
        "tokenizer.chat_template.tool_use": "GT",
    }
    gguf = tokenizer_from_gguf_metadata(metadata)
    assert gguf.apply_chat_template(messages) == "G"
    assert gguf.apply_chat_template(messages, tools=[{"name": "f"}]) == "GT"
