"""Write tests/data/template_cases.json: conversations rendered by transformers' apply_chat_template.

The expected strings (and their token ids) come from transformers itself, on the real
Qwen 3.5 template of the tiny fixture checkpoint; tests/test_template.py checks that
qwen35 renders the same bytes. Run once, offline, after changing the conversations:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_template_cases.py [FIXTURES_DIR]
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "fixtures"
OUTPUT = REPO / "tests" / "data" / "template_cases.json"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
FILE_TOOL = {
    "type": "function",
    "function": {
        "name": "write_file",
        "description": "Write text to a file <html> & \"quotes\".",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "text": {"type": "string"},
                "options": {"type": "object"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "ratio": {"type": ["number", "null"]},
            },
        },
    },
}


def call(name, arguments, wrapped=True):
    return {"type": "function", "function": {"name": name, "arguments": arguments}} if wrapped else {
        "name": name,
        "arguments": arguments,
    }


USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "Paris."}
WEATHER_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [call("get_weather", {"city": "Paris", "days": 3, "metric": True})],
}
WEATHER_RESULT = {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'}
IMAGE = {"type": "image", "image": "file:///tmp/cat.png"}

CASES = [
    ("user, thinking on", [USER], {}),
    ("user, thinking off", [USER], {"enable_thinking": False}),
    ("user, thinking explicitly on", [USER], {"enable_thinking": True}),
    ("system and user", [{"role": "system", "content": "You are terse."}, USER], {}),
    ("no generation prompt", [{"role": "system", "content": "  padded system  "}, USER], {"add_generation_prompt": False}),
    ("multi-turn", [USER, ANSWER, {"role": "user", "content": "And of Italy?"}], {}),
    (
        "multi-turn, earlier reasoning dropped",
        [USER, {**ANSWER, "reasoning_content": "The user asks about France."}, {"role": "user", "content": "Why?"}],
        {"enable_thinking": False},
    ),
    (
        "assistant after the last query keeps its reasoning",
        [USER, {"role": "assistant", "content": "Paris.", "reasoning_content": "\nEasy question.\n"}],
        {"add_generation_prompt": False},
    ),
    (
        "reasoning written inline in content",
        [USER, {"role": "assistant", "content": "<think>\nInline thought.\n</think>\n\nParis."}],
        {"add_generation_prompt": False},
    ),
    (
        "reasoning under the name 'reasoning'",
        [USER, {"role": "assistant", "content": "Paris.", "reasoning": "Aliased thought."}],
        {"add_generation_prompt": False},
    ),
    ("tools", [USER], {"tools": [WEATHER_TOOL, FILE_TOOL]}),
    ("tools with system", [{"role": "system", "content": "Use tools."}, USER], {"tools": [WEATHER_TOOL]}),
    ("tools, thinking off", [USER], {"tools": [WEATHER_TOOL], "enable_thinking": False}),
    (
        "tool call and result",
        [{"role": "user", "content": "Weather in Paris?"}, WEATHER_CALL, WEATHER_RESULT],
        {"tools": [WEATHER_TOOL]},
    ),
    (
        "tool call with text before it and reasoning",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {**WEATHER_CALL, "content": "Let me check.", "reasoning_content": "Need the tool."},
            WEATHER_RESULT,
        ],
        {"tools": [WEATHER_TOOL]},
    ),
    (
        "several tool calls with typed arguments",
        [
            {"role": "user", "content": "Save the notes."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call(
                        "write_file",
                        {
                            "path": "notes/a b.txt",
                            "text": "line one\nline two\n  indented <tag> & \"q\"",
                            "options": {"mode": "w", "nested": {"x": [1, 2.5, None]}},
                            "tags": ["ü", "ß"],
                            "ratio": None,
                        },
                    ),
                    call("get_weather", {"city": "Zürich", "metric": False}, wrapped=False),
                ],
            },
            {"role": "tool", "content": "written"},
            {"role": "tool", "content": "cloudy"},
        ],
        {"tools": [FILE_TOOL, WEATHER_TOOL]},
    ),
    (
        "tool results then an answer then a new question",
        [
            {"role": "user", "content": "Weather in Paris?"},
            WEATHER_CALL,
            WEATHER_RESULT,
            {"role": "assistant", "content": "It is 21 degrees.", "reasoning_content": "Got it."},
            {"role": "user", "content": "Thanks!"},
        ],
        {"tools": [WEATHER_TOOL], "enable_thinking": False},
    ),
    (
        "image",
        [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What is this?"}]}],
        {},
    ),
    (
        "images and video with vision ids",
        [
            {
                "role": "user",
                "content": [
                    IMAGE,
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "video", "video": "clip.mp4"},
                    {"type": "text", "text": "Compare them."},
                ],
            },
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": [{"image": "x.png"}, {"type": "text", "text": "And this?"}]},
        ],
        {"add_vision_id": True},
    ),
    (
        "image, thinking off, system as parts",
        [
            {"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, IMAGE]},
        ],
        {"enable_thinking": False},
    ),
    (
        "unicode and markup in content",
        [{"role": "user", "content": "  Grüße 👋 <b>bold</b> {{ not a tag }} <|im_end|> \n"}],
        {},
    ),
    ("custom template variable ignored", [USER], {"unused_flag": 3, "enable_thinking": False}),
    ("system with image is refused", [{"role": "system", "content": [IMAGE]}, USER], {}),
    ("no user message is refused", [{"role": "system", "content": "hi"}], {}),
    ("unknown role is refused", [USER, {"role": "narrator", "content": "..."}], {}),
]


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny" / "dense-hf")
    cases = []
    for name, messages, options in CASES:
        options = dict(options)
        tools = options.pop("tools", None)
        add_generation_prompt = options.pop("add_generation_prompt", True)
        case = {
            "name": name,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "template_kwargs": options,
        }
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **options
            )
        except Exception as error:  # the refusals are part of what we record
            case["error"] = str(error)
        else:
            case["expected"] = text
            case["expected_ids"] = tokenizer(text, add_special_tokens=False)["input_ids"]
        cases.append(case)
    document = {
        "generator": f"scripts/make_template_cases.py with transformers {transformers.__version__}",
        "template": "tiny/dense-hf/tokenizer_config.json (the real Qwen 3.5 template)",
        "cases": cases,
    }
    OUTPUT.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    rendered = sum("expected" in case for case in cases)
    print(f"wrote {OUTPUT}: {rendered} rendered conversations, {len(cases) - rendered} refusals")


if __name__ == "__main__":
    main()
