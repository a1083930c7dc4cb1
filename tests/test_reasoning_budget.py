"""The reasoning budget (engine/reasoning_budget.py) in the generation loop, `qwen35 run` and the server.

The reference is transformers on the tiny dense checkpoint: with a budget of N, greedy decoding must
give transformers' first N greedy reasoning tokens (the fixture's `transformers_greedy`), then the end
sequence as transformers' own tokenizer encodes it, then transformers' greedy continuation of
(prompt + those N tokens + the end sequence). Budget 0 must equal thinking off (the fixture's
`chat_nothink` greedy tokens); a budget the reasoning never reaches must change nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import anthropic
import ollama
import openai
import pytest
import torch
from test_server_fakes import live_server

from qwen35.chat.parser import THINK_END, parse_output
from qwen35.engine.reasoning_budget import REASONING_END, ReasoningBudget, budget_constraint, check_budget
from qwen35.errors import Qwen35Error

BUDGET = 5
AFTER = 10  # answer tokens compared after the forced end
QUESTION = "Which Qwen 3.5 model fits a 24GB GPU?"
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def model(dense_hf):
    from qwen35 import load_model

    return load_model(dense_hf, precision="reference")


@pytest.fixture(scope="module")
def expected(dense_hf, dense_sequences):
    """Transformers' budgeted reply to the chat_think prompt: (output ids, the end sequence's ids)."""
    import transformers

    reasoning = dense_sequences["chat_think"]["transformers_greedy"][:BUDGET]
    end_ids = transformers.AutoTokenizer.from_pretrained(dense_hf).encode(REASONING_END, add_special_tokens=False)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(dense_hf, dtype=torch.float32).eval()
    prefix = dense_sequences["chat_think"]["ids"] + reasoning + end_ids
    with torch.inference_mode():
        output = hf.generate(torch.tensor([prefix]), max_new_tokens=AFTER, do_sample=False)
    answer = output[0, len(prefix):].tolist()
    eos = set(hf.generation_config.eos_token_id or []) if isinstance(hf.generation_config.eos_token_id, list) \
        else {hf.generation_config.eos_token_id}
    answer = answer[:next((i for i, token in enumerate(answer) if token in eos), len(answer))]
    return reasoning + end_ids + answer, end_ids


def _parsed(tokenizer, ids, thinking=True):
    parsed = parse_output(tokenizer.decode(ids), thinking=thinking)
    return parsed["reasoning_content"], parsed["content"]


# -- the constraint alone ----------------------------------------------------------------------


def test_masks_force_the_end_sequence_one_token_at_a_time(dense_tokenizer, dense_hf):
    import transformers

    end_ids = transformers.AutoTokenizer.from_pretrained(dense_hf).encode(REASONING_END, add_special_tokens=False)
    budget = budget_constraint(dense_tokenizer, 4160, 3)
    assert budget.end_ids == end_ids and dense_tokenizer.think_end_id in end_ids
    for token_id in (10, 11, 12):
        assert budget.allowed() is None
        budget.advance(token_id)
    for token_id in end_ids:
        mask = budget.allowed()
        assert mask.shape == (4160,) and mask.sum() == 1 and mask[token_id]
        budget.advance(token_id)
    assert budget.allowed() is None and not budget.complete and budget.reasoning_tokens == 3


def test_reasoning_closed_in_time_is_never_forced(dense_tokenizer):
    budget = budget_constraint(dense_tokenizer, 4160, 3)
    for token_id in (10, 11, dense_tokenizer.think_end_id, 12, 13, 14, 15):
        assert budget.allowed() is None
        budget.advance(token_id)
    assert budget.reasoning_tokens == 2


def test_a_json_grammar_takes_over_after_the_forced_end(dense_tokenizer):
    from qwen35.server.constraints import json_constraint

    inner = json_constraint(dense_tokenizer, 4160, None, thinking=True)
    budget = budget_constraint(dense_tokenizer, 4160, 2, inner=inner)
    budget.advance(10)
    budget.advance(11)
    for token_id in budget.end_ids:  # the grammar allows no </think>, yet the budget forces it
        assert budget.allowed().sum() == 1
        budget.advance(token_id)
    # Now the grammar alone decides: greedily write the shortest JSON object by its masks.
    text = ""
    for _ in range(10):
        if budget.complete:
            break
        mask = budget.allowed()
        choice = next(i for i in (dense_tokenizer.encode("{")[0], dense_tokenizer.encode("}")[0]) if mask[i])
        budget.advance(choice)
        text += dense_tokenizer.decode([choice])
    assert budget.complete and json.loads(text) == {}


def test_bad_budgets_are_one_line_errors(dense_tokenizer):
    assert check_budget(-1) == -1 and check_budget(7) == 7
    for bad in (-2, 1.5, True, "5"):
        with pytest.raises(Qwen35Error, match="whole number"):
            check_budget(bad)
    with pytest.raises(Qwen35Error, match="no thinking"):
        budget_constraint(dense_tokenizer, 4160, 0)
    assert budget_constraint(dense_tokenizer, 4160, -1, inner="inner") == "inner"
    with pytest.raises(Qwen35Error, match="</think>"):
        ReasoningBudget(3, [1, 2], 4115, 4160)


# -- the generation loop and `qwen35 run` ---------------------------------------------------------


def test_generation_loop_with_a_budget_equals_transformers(model, dense_tokenizer, dense_sequences, expected):
    from qwen35.engine.generate import generation_steps, resolve_sampling

    ids, end_ids = expected
    params = resolve_sampling(model, len(ids), temperature=0.0)
    constraint = budget_constraint(dense_tokenizer, model.config.vocab_size, BUDGET)
    steps = generation_steps(model, dense_sequences["chat_think"]["ids"], params, constraint=constraint)
    assert [step.token_id for step in steps if step.token_id is not None] == ids


def _session_answer(model, tokenizer, budget, max_new_tokens, command=None):
    from qwen35.chat.session import ChatSession, ChatSettings

    session = ChatSession(model, tokenizer, ChatSettings(context_size=256, max_new_tokens=max_new_tokens,
                                                         sampling={"temperature": 0.0}, reasoning_budget=budget))
    if command is not None:
        assert session.command(command).text.startswith("Set parameter")
    reasoning, content = [], []
    for event in session.answer(QUESTION):
        reasoning.append(getattr(event, "reasoning_content", "") or "")
        content.append(getattr(event, "content", "") or "")
    return "".join(reasoning).strip(), "".join(content).strip()


def test_session_budgets_zero_and_larger_than_the_reasoning(model, dense_tokenizer, dense_sequences, expected):
    ids, _ = expected
    assert _session_answer(model, dense_tokenizer, BUDGET, len(ids)) == _parsed(dense_tokenizer, ids)
    # 0: thinking off, the fixture's chat_nothink greedy answer.
    nothink = dense_sequences["chat_nothink"]["transformers_greedy"][:12]
    assert _session_answer(model, dense_tokenizer, 0, 12) == ("", dense_tokenizer.decode(nothink).strip())
    # A budget the reasoning does not reach within the answer changes nothing.
    think = dense_sequences["chat_think"]["transformers_greedy"][:12]
    assert _session_answer(model, dense_tokenizer, 100, 12) == (dense_tokenizer.decode(think).strip(), "")


def test_set_reasoning_budget_in_the_chat(model, dense_tokenizer, expected):
    from qwen35.chat.session import ChatSession, ChatSettings

    ids, _ = expected
    command = f"/set reasoning_budget {BUDGET}"
    assert _session_answer(model, dense_tokenizer, -1, len(ids), command) == _parsed(dense_tokenizer, ids)
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=256))
    assert session.command("/set reasoning_budget -4").text.startswith("Couldn't set 'reasoning_budget'")
    session.command("/set reasoning_budget 7")
    assert "at most 7 tokens" in session.command("/show").text


def test_run_reasoning_budget_flag(dense_hf, dense_tokenizer, expected):
    ids, _ = expected
    reasoning, content = _parsed(dense_tokenizer, ids)
    result = subprocess.run([sys.executable, "-m", "qwen35", "run", str(dense_hf), QUESTION, "--temp", "0",
                             "-n", str(len(ids)), "--reasoning-budget", str(BUDGET)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"Thinking...\n{reasoning}\n...done thinking.\n\n{content}\n"
    bad = subprocess.run([sys.executable, "-m", "qwen35", "run", str(dense_hf), "hi", "--reasoning-budget", "-3"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert bad.returncode == 1 and "--reasoning-budget" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# -- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model, dense_tokenizer):
    with live_server(model, dense_tokenizer, name="dense", context_length=512) as (url, state):
        yield url, state


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, stream=False, **extra):
    arguments = dict(model="dense", messages=MESSAGES, max_tokens=BUDGET + 3 + AFTER, temperature=0.0,
                     extra_body=extra)
    if not stream:
        message = client.chat.completions.create(**arguments).choices[0].message
        return (message.model_extra.get("reasoning_content") or "", message.content or "")
    reasoning, content = [], []
    for chunk in client.chat.completions.create(stream=True, **arguments):
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    return "".join(reasoning), "".join(content)


def test_chat_thinking_budget_streamed_and_not(client, dense_tokenizer, expected):
    ids, _ = expected
    reply = _parsed(dense_tokenizer, ids)
    assert reply[0] and reply[1]
    assert _chat(client, thinking_budget=BUDGET) == reply
    streamed = _chat(client, stream=True, thinking_budget=BUDGET)
    assert streamed == reply and THINK_END not in streamed[0] + streamed[1]


def test_chat_thinking_budget_zero_is_thinking_off(client):
    assert _chat(client, thinking_budget=0) == _chat(client, chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(openai.UnprocessableEntityError, match="thinking_budget"):
        _chat(client, thinking_budget=-2)


def test_chat_budget_then_json_grammar(client, dense_tokenizer, dense_sequences):
    reply = client.chat.completions.create(model="dense", messages=MESSAGES, max_tokens=60, temperature=0.0,
                                           response_format={"type": "json_object"},
                                           extra_body={"thinking_budget": 3})
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == \
        dense_tokenizer.decode(dense_sequences["chat_think"]["transformers_greedy"][:3]).strip()
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(message.content), dict)
    else:
        assert message.content.lstrip().startswith("{")


def test_server_default_budget_and_the_request_over_it(server, client, dense_tokenizer, expected):
    """The server's --reasoning-budget N caps every API's thinking replies; its 0 is a template default
    (thinking off, ServerState's own business), which a request that turns thinking on overrides."""
    state = server[1]
    ids, _ = expected
    unbudgeted = _chat(client)
    state.reasoning_budget = BUDGET
    try:
        assert _chat(client) == _parsed(dense_tokenizer, ids)
        assert _chat(client, thinking_budget=-1) == unbudgeted
        # Ollama's API has no budget field: the server's applies.
        reply = ollama.Client(host=server[0]).chat(model="dense", messages=MESSAGES, think=True,
                                                    options={"temperature": 0.0, "num_predict": len(ids)})
        assert (reply.message.thinking, reply.message.content) == _parsed(dense_tokenizer, ids)
        state.reasoning_budget = 0
        assert _chat(client, chat_template_kwargs={"enable_thinking": True}) == unbudgeted
    finally:
        state.reasoning_budget = -1


def test_anthropic_budget_tokens(server, dense_tokenizer, expected):
    ids, _ = expected
    reasoning, content = _parsed(dense_tokenizer, ids)
    client = anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0, timeout=60)
    arguments = dict(model="claude-test", max_tokens=len(ids), messages=MESSAGES, extra_body={"temperature": 0.0},
                     thinking={"type": "enabled", "budget_tokens": BUDGET})
    message = client.messages.create(**arguments)
    assert [(block.type, getattr(block, "thinking", None) or getattr(block, "text", None))
            for block in message.content] == [("thinking", reasoning), ("text", content)]
    thinking, text = [], []
    with client.messages.stream(**arguments) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                thinking.append(event.delta.thinking)
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text.append(event.delta.text)
    assert ("".join(thinking), "".join(text)) == (reasoning, content)
