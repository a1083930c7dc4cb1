"""Chat templates: render a conversation exactly as transformers' `apply_chat_template` does.

Templates come with model files from strangers, so they run in jinja2's immutable
sandbox with the helpers transformers gives them (`raise_exception`, a `tojson` that
does not escape HTML and takes json.dumps' arguments, `strftime_now`, loop controls,
`{% generation %}` blocks). The inputs are rebuilt from plain JSON-like types first,
as transformers does, so a template sees no object with methods it could abuse.
Unlike plain jinja2, which renders an unsafe attribute as an empty string, touching
Python internals (`''.__class__`, `cycler.__init__.__globals__`, ...) stops rendering
with a `ChatTemplateError`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen35.errors import Qwen35Error

DEFAULT_TEMPLATE_FILE = Path(__file__).with_name("qwen35_default.jinja")

# Names a message's reasoning may come under; templates read the first (transformers aliases them).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(Qwen35Error):
    """A chat template that does not compile, refuses a conversation, or breaks the sandbox."""


@lru_cache(maxsize=1)
def default_template_source() -> str:
    """The real Qwen 3.5 chat template, for model files that carry none."""
    return DEFAULT_TEMPLATE_FILE.read_text(encoding="utf-8")


class _RaisedByTemplate(TemplateError):
    """What `raise_exception(...)` in a template throws."""


class _ChatSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationBlocks(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without giving them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (a way towards Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute may not start with an underscore ({name!r})")


def _raise_exception(message):
    raise _RaisedByTemplate(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


def _environment() -> _ChatSandbox:
    environment = _ChatSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment


def plain_data(value):
    """`value` rebuilt from JSON-like types; anything else becomes a placeholder like "<ndarray>".

    Templates only test whether media keys are present, so placeholders change nothing they render.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_data(item) for item in value)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):  # numpy scalars
        return plain_data(item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages) -> list[dict]:
    """Plain copies of the messages, None values dropped, reasoning aliased (as transformers does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("a conversation must be a non-empty list of messages")
    prepared = []
    for message in messages:
        message = plain_data(message)
        if not isinstance(message, dict):
            raise ChatTemplateError(f"each message must be an object with a role, not {message!r:.60}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def read_template_file(file_name: str) -> str:
    """A chat template file's text (--chat-template-file of run and serve), or one readable error."""
    try:
        return Path(file_name).read_text(encoding="utf-8")
    except OSError as error:
        raise ChatTemplateError(f"cannot read the chat template {file_name}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ChatTemplateError(f"the chat template {file_name} is not UTF-8 text") from None


class ChatTemplate:
    """A compiled chat template. `source` is the template text, or named templates
    ({"default": ..., "tool_use": ...}) of which the `tool_use` one serves requests with tools."""

    def __init__(self, source: str | dict[str, str], special_tokens: dict[str, str] | None = None):
        if isinstance(source, str):
            source = {"default": source}
        if not isinstance(source, dict) or not source:
            raise ChatTemplateError("a chat template must be a string or named template strings")
        self.sources = dict(source)
        self.special_tokens = dict(special_tokens or {})
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def source(self) -> str:
        return self.sources[self._pick(None)]

    def render(self, messages, tools=None, add_generation_prompt=True, documents=None, **template_kwargs) -> str:
        template = self._template(self._pick(tools))
        tools = plain_data(list(tools)) if tools is not None else None
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise ChatTemplateError("each tool must be a JSON schema object")
        variables = plain_data({**self.special_tokens, **template_kwargs})
        try:
            return template.render(
                messages=_prepare_messages(messages),
                tools=tools,
                documents=plain_data(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except SecurityError as error:
            raise ChatTemplateError(f"the chat template tried to reach Python internals and was stopped: {error}") from None
        except _RaisedByTemplate as error:
            raise ChatTemplateError(f"the chat template refused the conversation: {error}") from None
        except ChatTemplateError:
            raise
        except Exception as error:  # a template is untrusted code: any failure is the template's
            raise ChatTemplateError(f"rendering the chat template failed: {type(error).__name__}: {error}") from None

    def _pick(self, tools) -> str:
        if tools is not None and "tool_use" in self.sources:
            return "tool_use"
        if "default" in self.sources:
            return "default"
        if len(self.sources) == 1:
            return next(iter(self.sources))
        raise ChatTemplateError(f"no 'default' among the named chat templates {sorted(self.sources)}")

    def _template(self, name: str) -> jinja2.Template:
        compiled = self._compiled.get(name)
        if compiled is None:
            try:
                compiled = _environment().from_string(self.sources[name])
            except TemplateSyntaxError as error:
                raise ChatTemplateError(
                    f"the chat template is not valid Jinja: {error.message} (line {error.lineno})"
                ) from None
            self._compiled[name] = compiled
        return compiled
