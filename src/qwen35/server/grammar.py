"""Byte-level grammars for constrained decoding: JSON (free or by schema) and Qwen's XML tool calls.

A grammar is a tree of hashable nodes; a parse position is a stack of immutable frames, so one
position can branch into several (anyOf, optional parts) and positions can key a cache. Advancing
a set of positions by one byte gives the positions after it; no position left means the byte is
not allowed. Whitespace is allowed where JSON allows it, in runs of at most WHITESPACE_RUN bytes,
so a model cannot stall the reply with endless spaces; numbers stop at MAX_NUMBER_BYTES.

Nodes:  ("any", depth) any JSON value nested at most `depth` deep; ("object", props, extra) with
props = ((key, node, required), ...) in order and extra the node of other keys (None: none);
("array", item, min, max); ("string",); ("literal", bytes); ("number", integer_only);
("anyof", nodes); ("seq", nodes); ("optional", node); ("raw", forbidden_bytes).
"""

from __future__ import annotations

import json

WHITESPACE = frozenset(b" \t\n\r")
WHITESPACE_RUN = 16
MAX_NUMBER_BYTES = 24  # longer numbers are a model stuck on digits, not data
MAX_DEPTH = 12
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ROOT_DONE = (("root",),)

ANY = ("any", MAX_DEPTH)


class SchemaError(ValueError):
    """A JSON schema this server cannot turn into a grammar; the message says which part."""


# --- schema -> nodes ----------------------------------------------------------------------------


def literal(value) -> tuple:
    return ("literal", json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode())


def compile_schema(schema, root=None, depth: int = 0) -> tuple:
    """The grammar node of a JSON schema (the subset structured outputs use; unknown keywords ignored)."""
    root = schema if root is None else root
    if depth > 32:
        raise SchemaError("the schema nests too deeply (or refers to itself)")
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be an object, got {json.dumps(schema)[:60]}")
    if "$ref" in schema:
        return compile_schema(_resolve(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return literal(schema["const"])
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise SchemaError("enum must be a non-empty list")
        return _union([literal(value) for value in schema["enum"]])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise SchemaError(f"{key} must be a non-empty list")
            return _union([compile_schema(part, root, depth + 1) for part in schema[key]])
    if "allOf" in schema and isinstance(schema["allOf"], list) and len(schema["allOf"]) == 1:
        return compile_schema(schema["allOf"][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        return _union([compile_schema({**schema, "type": single}, root, depth + 1) for single in kind])
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if kind is None:
        return ANY
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        items = schema.get("items", True)
        minimum, maximum = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(minimum, int) or (maximum is not None and not isinstance(maximum, int)):
            raise SchemaError("minItems and maxItems must be whole numbers")
        return ("array", compile_schema(items, root, depth + 1), max(minimum, 0), maximum)
    simple = {"string": ("string",), "number": ("number", False), "integer": ("number", True),
              "boolean": _union([literal(True), literal(False)]), "null": literal(None)}
    if kind not in simple:
        raise SchemaError(f"unknown type {kind!r}")
    return simple[kind]


def _resolve(reference, root):
    if not isinstance(reference, str) or not reference.startswith("#"):
        raise SchemaError(f"only local $ref (#/...) are supported, got {reference!r}")
    target = root
    for part in filter(None, reference[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            raise SchemaError(f"$ref {reference} points nowhere")
        target = target[part]
    return target


def _object(schema, root, depth) -> tuple:
    properties = schema.get("properties") or {}
    required = schema.get("required") or []
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise SchemaError("properties must be an object and required a list")
    missing = [name for name in required if name not in properties]
    if missing:
        raise SchemaError(f"required property {missing[0]!r} is not among the properties")
    props = tuple((json.dumps(name, ensure_ascii=False).encode(), compile_schema(sub, root, depth + 1),
                   name in required) for name, sub in properties.items())
    extra = schema.get("additionalProperties", not props)
    extra_node = None if extra is False or (props and extra is not True and not isinstance(extra, dict)) \
        else compile_schema(extra if isinstance(extra, dict) else True, root, depth + 1)
    if props:
        extra_node = None  # keys follow the schema's order; extra keys would make that order ambiguous
    return ("object", props, extra_node)


def _union(nodes: list[tuple]) -> tuple:
    unique = tuple(dict.fromkeys(nodes))
    return unique[0] if len(unique) == 1 else ("anyof", unique)


def tool_call_grammar(tools: list[dict], name: str | None) -> tuple:
    """Qwen's XML tool call of the named function (or of any of `tools` when name is None)."""
    calls = []
    for tool in tools:
        function = tool.get("function", tool)
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        required = set(parameters.get("required") or [])
        parts = [("literal", f"<tool_call>\n<function={function['name']}>\n".encode())]
        for param, schema in properties.items():
            value = _xml_value(schema, parameters)
            part = ("seq", (("literal", f"<parameter={param}>\n".encode()), value, ("literal", b"\n</parameter>\n")))
            parts.append(part if param in required else ("optional", part))
        parts.append(("literal", b"</function>\n</tool_call>"))
        calls.append(("seq", tuple(parts)))
    if not calls:
        raise SchemaError(f"no tool named {name!r}")
    return _union(calls)


def _xml_value(schema, root) -> tuple:
    """A parameter value as the template writes it: strings bare, everything else as JSON."""
    if isinstance(schema, dict):
        choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if isinstance(choices, list) and choices and all(isinstance(choice, str) and choice for choice in choices):
            return _union([("literal", choice.encode()) for choice in choices])
        if schema.get("type") == "string":
            return ("raw", b"<\n")
    return compile_schema(schema, root)


# --- parse positions ----------------------------------------------------------------------------
# Frames: ("root",) | ("value", node, ws) | ("literal", bytes, pos) | ("string", mode)
#         | ("number", integer_only, state, length) | ("object", node, state, index, ws)
#         | ("array", node, state, count, ws) | ("seq", node, index) | ("raw", forbidden)


STRING_UNSAFE = frozenset(b'"\\') | frozenset(range(0x20))


def invariant_unsafe_bytes(stacks) -> frozenset | None:
    """The bytes that matter when every position sits inside free text (a string's content, a raw
    value): any other byte leaves the positions as they are. None when some position is elsewhere."""
    unsafe = None
    for stack in stacks:
        top = stack[-1]
        if top[0] == "string" and top[1] == 0:
            kind = STRING_UNSAFE
        elif top[0] == "raw":
            kind = frozenset(top[1])
        else:
            return None
        if unsafe is not None and kind != unsafe:
            return None
        unsafe = kind
    return unsafe


def start(node) -> list[tuple]:
    return [(("root",), ("value", node, 0))]


def advance(stacks, byte: int) -> list[tuple]:
    result = []
    for stack in stacks:
        result.extend(_step(stack, byte))
    return list(dict.fromkeys(result))


def done(stacks) -> bool:
    """Nothing more may follow: every position has finished the value."""
    return bool(stacks) and all(stack == ROOT_DONE for stack in stacks)


def can_end(stacks) -> bool:
    return any(_can_end(stack) for stack in stacks)


def _can_end(stack) -> bool:
    if stack == ROOT_DONE:
        return True
    top = stack[-1]
    if (top[0] == "number" and top[2] in _NUMBER_FINAL) or top[0] == "raw" or \
            (top[0] == "value" and top[1][0] == "optional"):
        return any(_can_end(after) for after in _child_done(stack[:-1]))
    return False


def _child_done(stack) -> list[tuple]:
    """The parent's positions once its top child (already popped) has finished."""
    top = stack[-1]
    kind = top[0]
    if kind == "root":
        return [ROOT_DONE]
    if kind == "object":
        _, node, state, index, _ = top
        return [stack[:-1] + (("object", node, "colon" if state == "key" else "after", index, 0),)]
    if kind == "array":
        _, node, _, count, _ = top
        return [stack[:-1] + (("array", node, "after", count + 1, 0),)]
    if kind == "seq":
        _, node, index = top
        if index + 1 == len(node[1]):
            return _child_done(stack[:-1])
        return [stack[:-1] + (("seq", node, index + 1), ("value", node[1][index + 1], -1))]
    raise AssertionError(f"frame {kind} has no children")


def _step(stack, byte: int) -> list[tuple]:
    top = stack[-1]
    kind = top[0]
    below = stack[:-1]
    if kind == "root":
        return []
    if kind == "value":
        _, node, ws = top
        if byte in WHITESPACE and 0 <= ws < WHITESPACE_RUN:
            return [below + (("value", node, ws + 1),)]
        return _begin(below, node, byte)
    if kind == "literal":
        _, text, pos = top
        if text[pos] != byte:
            return []
        return _child_done(below) if pos + 1 == len(text) else [below + (("literal", text, pos + 1),)]
    if kind == "string":
        return _string(below, top[1], byte)
    if kind == "number":
        return _number(below, top, byte)
    if kind == "object":
        return _object_step(below, top, byte)
    if kind == "array":
        return _array_step(below, top, byte)
    if kind == "raw":
        if byte not in top[1]:
            return [stack]
        return [after for parent in _child_done(below) for after in _step(parent, byte)]
    raise AssertionError(f"unknown frame {kind}")


def _begin(below, node, byte: int) -> list[tuple]:
    """Start a value of `node` with `byte` (the value frame already popped)."""
    kind = node[0]
    if kind == "anyof":
        return list(dict.fromkeys(s for alternative in node[1] for s in _begin(below, alternative, byte)))
    if kind == "optional":
        skipped = [s for parent in _child_done(below) for s in _step(parent, byte)]
        return _begin(below, node[1], byte) + skipped
    if kind == "seq":
        return _step(below + (("seq", node, 0), ("value", node[1][0], -1)), byte)
    if kind == "raw":
        return _step(below + (("raw", node[1]),), byte)
    if kind == "literal":
        return _step(below + (("literal", node[1], 0),), byte)
    if kind == "number":
        return _number(below, ("number", node[1], "start", 0), byte)
    if kind == "string":
        return [below + (("string", 0),)] if byte == 0x22 else []
    if kind == "object":
        return [below + (("object", node, "open", -1, 0),)] if byte == 0x7B else []
    if kind == "array":
        return [below + (("array", node, "open", 0, 0),)] if byte == 0x5B else []
    if kind == "any":
        depth = node[1]
        if byte == 0x7B and depth > 0:
            return [below + (("object", ("object", (), ("any", depth - 1)), "open", -1, 0),)]
        if byte == 0x5B and depth > 0:
            return [below + (("array", ("array", ("any", depth - 1), 0, None), "open", 0, 0),)]
        if byte == 0x22:
            return [below + (("string", 0),)]
        if byte == 0x2D or byte in DIGITS:
            return _number(below, ("number", False, "start", 0), byte)
        for word in (b"true", b"false", b"null"):
            if byte == word[0]:
                return [below + (("literal", word, 1),)]
        return []
    raise AssertionError(f"unknown node {kind}")


def _string(below, mode: int, byte: int) -> list[tuple]:
    if mode == 0:
        if byte == 0x22:
            return _child_done(below)
        if byte == 0x5C:
            return [below + (("string", 1),)]
        return [] if byte < 0x20 else [below + (("string", 0),)]
    if mode == 1:
        if byte in b'"\\/bfnrt':
            return [below + (("string", 0),)]
        return [below + (("string", 2),)] if byte == 0x75 else []
    if byte not in HEX:
        return []
    return [below + (("string", 0 if mode == 5 else mode + 1),)]


_NUMBER_FINAL = frozenset({"zero", "int", "frac", "exp"})
_NUMBER_MOVES = {
    ("start", "-"): "sign", ("start", "0"): "zero", ("start", "1"): "int", ("sign", "0"): "zero",
    ("sign", "1"): "int", ("int", "0"): "int", ("int", "1"): "int", ("zero", "."): "dot",
    ("int", "."): "dot", ("dot", "0"): "frac", ("dot", "1"): "frac", ("frac", "0"): "frac",
    ("frac", "1"): "frac", ("zero", "e"): "e", ("int", "e"): "e", ("frac", "e"): "e", ("e", "+"): "esign",
    ("e", "0"): "exp", ("e", "1"): "exp", ("esign", "0"): "exp", ("esign", "1"): "exp",
    ("exp", "0"): "exp", ("exp", "1"): "exp",
}


def _number(below, frame, byte: int) -> list[tuple]:
    _, integer_only, state, length = frame
    char = chr(byte)
    symbol = "0" if char == "0" else "1" if char in "123456789" else "e" if char in "eE" \
        else "+" if char in "+-" and state == "e" else char
    following = _NUMBER_MOVES.get((state, symbol))
    if following is not None and not (integer_only and following in ("dot", "e")) and length < MAX_NUMBER_BYTES:
        return [below + (("number", integer_only, following, length + 1),)]
    if state in _NUMBER_FINAL:  # the number ended one byte ago: this byte belongs to the parent
        return [after for parent in _child_done(below) for after in _step(parent, byte)]
    return []


def _key_candidates(props, index: int) -> list[int]:
    """Properties that may come after property `index`: in order, none required skipped."""
    candidates = []
    for position in range(index + 1, len(props)):
        candidates.append(position)
        if props[position][2]:
            break
    return candidates


def _object_step(below, frame, byte: int) -> list[tuple]:
    _, node, state, index, ws = frame
    props, extra = node[1], node[2]
    if byte in WHITESPACE and state != "key":
        return [below + (("object", node, state, index, ws + 1),)] if ws < WHITESPACE_RUN else []
    closable = not any(required for _, _, required in props[index + 1:])
    if state in ("open", "after") and byte == 0x7D and closable:
        return _child_done(below)
    if state in ("open", "comma") and byte == 0x22:
        if props:
            return [below + (("object", node, "key", position, 0), ("literal", props[position][0], 1))
                    for position in _key_candidates(props, index)]
        return [below + (("object", node, "key", index, 0), ("string", 0))] if extra is not None else []
    if state == "after" and byte == 0x2C and (_key_candidates(props, index) or (not props and extra)):
        return [below + (("object", node, "comma", index, 0),)]
    if state == "colon" and byte == 0x3A:
        value = props[index][1] if props else extra
        return [below + (("object", node, "value", index, 0), ("value", value, 0))]
    return []


def _array_step(below, frame, byte: int) -> list[tuple]:
    _, node, state, count, ws = frame
    item, minimum, maximum = node[1], node[2], node[3]
    if byte in WHITESPACE:
        return [below + (("array", node, state, count, ws + 1),)] if ws < WHITESPACE_RUN else []
    if byte == 0x5D and state in ("open", "after") and count >= minimum:
        return _child_done(below)
    if state == "after":
        return [below + (("array", node, "comma", count, 0),)] if byte == 0x2C else []
    if maximum is not None and count >= maximum:
        return []
    return _begin(below + (("array", node, "item", count, 0),), item, byte)
