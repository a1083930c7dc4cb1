"""Tool-call argument values: the text a model wrote, read as the type the tool's JSON schema asks.

The Qwen 3.5 template writes objects and arrays with `tojson` and everything else with
Python's `str` (so `True`, `None`, `3`), and the model imitates it. A value is read as
the first of its schema's types it fits (null, boolean, integer, number, object, array),
else kept as written; a string-only schema keeps it as written. Without a schema the text
cannot tell 3 from "3", so only JSON objects and arrays are read.
"""

from __future__ import annotations

import json
import math
import re

_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_MAX_JSON_CHARS = 1 << 22
_MAX_NUMBER_CHARS = 1000  # below Python's int-parsing limit, and no regex backtracking on long text


def tool_parameter_schemas(tools) -> dict[str, dict]:
    """function name -> its parameters' `properties`, from OpenAI-style tool definitions."""
    schemas = {}
    for tool in tools if isinstance(tools, (list, tuple)) else ():
        if not isinstance(tool, dict):
            continue
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        schemas[function["name"]] = properties if isinstance(properties, dict) else {}
    return schemas


def schema_types(schema, depth: int = 0) -> set[str]:
    """The JSON types a schema allows (from `type`, `anyOf`/`oneOf` and `enum`); empty if unknown.

    Schemas come with requests, so anything malformed is read as "unknown", never an error."""
    if not isinstance(schema, dict) or depth > 8:
        return set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types = {declared}
    else:
        types = {item for item in declared if isinstance(item, str)} if isinstance(declared, list) else set()
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        for option in options if isinstance(options, list) else ():
            types |= schema_types(option, depth + 1)
    if not types and isinstance(schema.get("enum"), list):
        types = {_json_type_name(value) for value in schema["enum"]}
    return types


def convert_value(raw: str, schema=None):
    """A parameter's text as the value its schema asks for; the text itself when it does not fit."""
    types = schema_types(schema)
    if not types:  # no schema: only unambiguous JSON containers are read
        types = {"object", "array", "string"}
    if types == {"string"}:
        return raw
    text = raw.strip()
    for kind in ("null", "boolean", "integer", "number", "object", "array"):
        if kind in types:
            fits, value = _CONVERTERS[kind](text)
            if fits:
                return value
    return raw


def _as_null(text):
    return (True, None) if text in ("null", "None") else (False, None)


def _as_boolean(text):
    lowered = text.lower()
    return (True, lowered == "true") if lowered in ("true", "false") else (False, None)


def _as_integer(text):
    if len(text) > _MAX_NUMBER_CHARS:
        return False, None
    if _INTEGER.fullmatch(text):
        return True, int(text)
    fits, number = _as_number(text)
    if fits and isinstance(number, float) and number.is_integer():
        return True, int(number)
    return False, None


def _as_number(text):
    if len(text) > _MAX_NUMBER_CHARS:
        return False, None
    if _INTEGER.fullmatch(text):
        return True, int(text)
    if _NUMBER.fullmatch(text):
        number = float(text)
        if math.isfinite(number):
            return True, number
    return False, None


def _as_json(kind):
    opener = "[" if kind == "array" else "{"

    def convert(text):
        if len(text) > _MAX_JSON_CHARS or not text.startswith(opener):
            return False, None
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return False, None
        return isinstance(value, dict if kind == "object" else list), value

    return convert


_CONVERTERS = {
    "null": _as_null,
    "boolean": _as_boolean,
    "integer": _as_integer,
    "number": _as_number,
    "object": _as_json("object"),
    "array": _as_json("array"),
}


def _json_type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"
