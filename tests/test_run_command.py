"""`qwen35 run`: one-shot answers against transformers' greedy tokens, and the interactive
chat driven through a pseudo-terminal as a person would, reading what the screen shows."""

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from qwen35.chat.command import AnswerPrinter, colour_enabled
from qwen35.chat.parser import THINK_END, THINK_START, TOOL_CALL_START, ParsedDelta
from qwen35.chat.session import ChatSession, ChatSettings, ContextFullError, Notice
from qwen35.chat.slash_commands import LineAssembler

SPEED_LINE = re.compile(r"prompt (\d+) tok(?: \(\+\d+ cached\))?, [\d.]+ tok/s · answer (\d+) tok, [\d.]+ tok/s")
CACHED_SPEED_LINE = re.compile(r"prompt (\d+) tok \(\+(\d+) cached\), [\d.]+ tok/s · answer (\d+) tok")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
DIM = "\x1b[2m"


def qwen35(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qwen35", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, env=env)


@pytest.fixture(scope="module")
def model(dense_hf):
    from qwen35 import load_model

    return load_model(dense_hf)


# -- one-shot ---------------------------------------------------------------------------------


def _reference_text(tokenizer, ids):
    """Transformers' greedy tokens as text, checked to hold no markup the output parser would
    split on and no end of turn (the reference is then one reasoning or one content block)."""
    assert not set(ids) & set(tokenizer.eos_token_ids)
    text = tokenizer.decode(ids)
    assert not any(marker in text for marker in (THINK_START, THINK_END, TOOL_CALL_START, "<function="))
    return text.strip()


def test_one_shot_thinking_prints_transformers_greedy_reasoning(dense_hf, dense_sequences, dense_tokenizer):
    sequence = dense_sequences["chat_think"]
    question = "Which Qwen 3.5 model fits a 24GB GPU?"
    assert dense_tokenizer.apply_chat_template([{"role": "user", "content": question}]) == sequence["text"]
    expected = _reference_text(dense_tokenizer, sequence["transformers_greedy"])

    result = qwen35("run", str(dense_hf), question, "--temp", "0", "-n", "24", "--think")
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes
    # A pipe gets the reasoning between Ollama's markers, and nothing else: all 24 tokens are reasoning.
    assert result.stdout == f"Thinking...\n{expected}\n...done thinking.\n\n"


def test_one_shot_with_template_file_and_kwargs_prints_transformers_greedy_answer(
    fixtures, dense_hf, dense_sequences, dense_tokenizer, model, monkeypatch, capsys
):
    """The real Qwen 3.5 template from a file, thinking turned off through --chat-template-kwargs:
    the prompt is the reference's (its length shows in the speed line) and the answer its greedy tokens.
    In-process, with the module's copy of the model, to spare a second load."""
    from qwen35.cli import main

    sequence = dense_sequences["chat_nothink"]
    question = "Which Qwen 3.5 model fits a 24GB GPU?"
    expected = _reference_text(dense_tokenizer, sequence["transformers_greedy"][:12])
    monkeypatch.setattr("qwen35.load_model", lambda path, **options: model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    status = main(["run", str(dense_hf), question, "--temp", "0", "-n", "12", "--hide-thinking", "--verbose",
                   "--chat-template-file", str(fixtures / "tokenizer" / "Qwen3.5-4B.jinja"),
                   "--chat-template-kwargs", '{"enable_thinking": false}'])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert printed.out == expected + "\n"
    speed = SPEED_LINE.search(printed.err)
    assert speed and int(speed[1]) == len(sequence["ids"]) and int(speed[2]) == 12


def test_prompt_words_may_follow_the_flags_as_with_ollama_run(dense_hf, dense_sequences, dense_tokenizer, model,
                                                              monkeypatch, capsys):
    """`qwen35 run MODEL --no-think "question"`: words after the flags are the prompt (argparse alone
    refuses them); the answer is transformers' greedy one for that question. An unknown flag still fails."""
    from qwen35.cli import main

    expected = _reference_text(dense_tokenizer, dense_sequences["chat_nothink"]["transformers_greedy"][:12])
    monkeypatch.setattr("qwen35.load_model", lambda path, **options: model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))

    status = main(["run", str(dense_hf), "Which Qwen 3.5 model", "--temp", "0", "-n", "12", "--no-think",
                   "--hide-thinking", "fits a 24GB", "GPU?"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert printed.out == expected + "\n"

    with pytest.raises(SystemExit) as exited:
        main(["run", str(dense_hf), "--no-think", "--bogus", "hi"])
    assert exited.value.code == 2 and "unrecognized arguments: --bogus hi" in capsys.readouterr().err


@pytest.mark.parametrize("drafter", [["--spec-type", "draft-mtp"], ["-md", "DRAFT"]], ids=["mtp", "draft model"])
def test_speculative_decoding_prints_the_same_greedy_answer_and_counts_guesses(
        dense_hf, dense_sequences, dense_tokenizer, model, monkeypatch, capsys, drafter):
    """llama.cpp's --spec-type draft-mtp / -md: the answer is transformers' greedy one, the speed line says how
    many guesses were kept (the model drafting for itself keeps them all)."""
    from qwen35.cli import main

    expected = _reference_text(dense_tokenizer, dense_sequences["chat_nothink"]["transformers_greedy"][:12])
    monkeypatch.setattr("qwen35.load_model", lambda path, **options: model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    flags = [str(dense_hf) if flag == "DRAFT" else flag for flag in drafter]
    status = main(["run", str(dense_hf), "Which Qwen 3.5 model fits a 24GB GPU?", "--temp", "0", "-n", "12",
                   "--no-think", "--hide-thinking", "--verbose", "--draft-p-min", "0", *flags])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert printed.out == expected + "\n"
    kept = re.search(r"(\d+)/(\d+) guesses kept", printed.err)
    assert kept and int(kept[2]) > 0
    if drafter[0] == "-md":
        assert kept[1] == kept[2]


def test_missing_model_is_one_line_and_exit_1(tmp_path):
    result = qwen35("run", str(tmp_path / "nope.gguf"), "hi")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no model at" in result.stderr and "nope.gguf" in result.stderr
    assert result.stdout == ""


def test_llama_cpp_spellings_reach_the_session(dense_hf):
    from qwen35.chat.command import _settings
    from qwen35.cli import build_parser

    args = build_parser().parse_args([
        "run", str(dense_hf), "-c", "2048", "-n", "64", "--temp", "0.3", "--top-k", "7", "--top-p", "0.8",
        "--min-p", "0.05", "--seed", "11", "-sys", "Be brief.", "--no-think",
        "--chat-template-kwargs", '{"custom": 1}',
    ])
    settings = _settings(args)
    assert settings.context_size == 2048 and settings.max_new_tokens == 64
    assert settings.system == "Be brief." and settings.think is False
    assert settings.sampling == {"temperature": 0.3, "top_k": 7, "top_p": 0.8, "min_p": 0.05, "seed": 11}
    assert settings.template_kwargs == {"custom": 1}
    assert args.prompt == []
    long_form = build_parser().parse_args(["run", "m", "--ctx-size", "512", "--n-predict", "-1",
                                           "--system-prompt", "S"])
    assert (long_form.context, long_form.n_predict, long_form.system) == (512, -1, "S")


@pytest.mark.parametrize("flags, complaint", [
    (["--chat-template-kwargs", "{enable_thinking: false}"], "not valid JSON"),
    (["--chat-template-kwargs", "[1]"], "must be a JSON object"),
    (["--chat-template-file", "/nonexistent/template.jinja"], "cannot read the chat template"),
    (["--temp", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["-c", "5"], "-c must be at least"),
    (["-n", "0"], "-n must be"),
    (["--draft-max", "0"], "--draft-max must be"),
    (["--draft-p-min", "2"], "--draft-p-min must be"),
    (["--mtp", "-md", "draft.gguf"], "give one drafter"),
])
def test_bad_flags_are_one_line_errors_before_loading(tmp_path, flags, complaint):
    from qwen35.cli import build_parser
    from qwen35.errors import Qwen35Error

    # The model path does not exist either: the flags are checked first, before any loading.
    args = build_parser().parse_args(["run", str(tmp_path / "missing.gguf"), "hi", *flags])
    with pytest.raises(Qwen35Error, match=re.escape(complaint)) as error:
        args._module.run(args)
    assert "\n" not in str(error.value)


# -- the interactive chat through a pseudo-terminal ---------------------------------------------


class Terminal:
    """A program on a pseudo-terminal: what it writes (escapes kept in `raw`, dropped in `screen`)
    and keys typed into it. Ctrl+C typed here reaches it as SIGINT through the terminal, as for a person."""

    def __init__(self, argv, env):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                        start_new_session=True, preexec_fn=_take_controlling_terminal)
        os.close(slave)
        self.master = master
        self.raw = ""
        self.position = 0  # how far `expect` has read into `screen`

    @property
    def screen(self) -> str:
        return ANSI_ESCAPE.sub("", self.raw).replace("\r", "")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode("utf-8", "surrogateescape"))  # "\udcff" types the byte 0xff

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait for `pattern` (a regex) in the screen after what earlier expects consumed."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.screen, self.position)
            if match:
                self.position = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{pattern!r} never appeared; the screen ends:\n{self.screen[-2000:]}")

    def wait_for_output(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self._read(left):
            pass

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the program closed the terminal
            return False
        self.raw += data.decode("utf-8", errors="replace")
        return bool(data)

    def close(self) -> int:
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self.master)

    def bye(self) -> None:
        """/bye at the prompt: the program ends with status 0."""
        self.type("/bye\r")
        assert self.close() == 0

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:  # a failed test leaves no program behind
            self.process.kill()


def _take_controlling_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _terminal_env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    env.update(TERM="xterm", INPUTRC="/dev/null", **extra)
    return env


def test_interactive_chat_as_a_person_uses_it(dense_hf, dense_tokenizer):
    with Terminal([sys.executable, "-m", "qwen35", "run", str(dense_hf), "-n", "6", "--seed", "7"],
                  _terminal_env()) as terminal:
        terminal.expect(r">>> ", timeout=120)
        terminal.type("/?\r")
        terminal.expect(r"/set think on\|off")
        terminal.expect(r">>> ")
        terminal.type("/frobnicate\r")
        terminal.expect(r"Unknown command '/frobnicate'. Type /\? for help")
        terminal.expect(r">>> ")
        # readline reads the new line only after it has drawn the prompt: a person's key comes
        # well after that, a test's could come before (it would then see the previous line).
        terminal.wait_for_output(0.3)
        terminal.type("\x03")  # Ctrl+C at an empty prompt: a hint, not an exit
        terminal.expect(r"Use Ctrl \+ d or /bye to exit\.")
        terminal.expect(r">>> ")
        terminal.type("never mind")
        terminal.expect(r"never mind")
        terminal.type("\x03")  # Ctrl+C on a typed line clears it, without the hint
        cleared = terminal.expect(r"\n>>> ")
        assert "Use Ctrl" not in terminal.screen[cleared.start() - 40:]

        # A first answer: reasoning (on by default) shown dimmed, then a dimmed speed line.
        # The message holds a byte that is not UTF-8: it must not upset anything.
        start = len(terminal.raw)
        terminal.type("hello \udcff\r")
        terminal.expect(r"Thinking\.\.\.")
        first = terminal.expect(SPEED_LINE.pattern)
        terminal.expect(r">>> ")
        answer_raw = terminal.raw[start:]
        assert DIM + "Thinking..." in answer_raw and DIM + first[0] in answer_raw

        terminal.type("/set think off\r")
        terminal.expect(r"Set thinking off\.")
        terminal.type("/set temperature 0\r")
        terminal.expect(r"Set parameter 'temperature' to '0'")
        terminal.type("/set system You are terse.\r")
        terminal.expect(r"Set system message\.")
        terminal.type("/clear\r")
        terminal.expect(r"Cleared session context\.")
        terminal.expect(r">>> ")

        # A multi-line message after /clear: the model sees exactly the system message and it.
        terminal.type('"""first line\r')
        terminal.expect(r"\.\.\. ")
        terminal.type('second line"""\r')
        turn = terminal.expect(SPEED_LINE.pattern)
        terminal.expect(r">>> ")
        expected_prompt = dense_tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "first line\nsecond line"}],
            enable_thinking=False,
        )
        assert int(turn[1]) == len(dense_tokenizer.encode(expected_prompt))
        assert "Thinking..." not in terminal.screen[terminal.screen.rfind("second line"):]

        # The next turn carries the history: its prompt holds the previous one and the answer.
        terminal.type("and more\r")
        # It reads only what follows the history cached at the end of the previous user message.
        follow_up = terminal.expect(CACHED_SPEED_LINE.pattern)
        terminal.expect(r">>> ")
        assert int(follow_up[1]) + int(follow_up[2]) > int(turn[1]) + len(dense_tokenizer.encode("and more"))
        assert 0 < int(follow_up[2]) < int(turn[1])

        # Ctrl+C in the middle of a long answer stops it; the chat goes on.
        terminal.type("/set num_predict 2000\r")
        terminal.expect(r"Set parameter 'num_predict' to '2000'")
        terminal.expect(r">>> ")
        terminal.type("tell me a long story\r")
        terminal.expect(r"tell me a long story\n\S")  # the answer has begun
        terminal.wait_for_output(1.0)
        interrupted_at = time.monotonic()
        terminal.type("\x03")
        terminal.expect(r"stopped")
        terminal.expect(r">>> ", timeout=10)
        assert time.monotonic() - interrupted_at < 10

        terminal.type("/set num_predict 3\r")
        terminal.expect(r">>> ")
        terminal.type("go on\r")
        after = terminal.expect(SPEED_LINE.pattern)
        assert int(after[2]) <= 3
        terminal.expect(r">>> ")

        terminal.bye()


def test_gguf_chat_without_colour_ends_with_ctrl_d(fixtures, dense_sequences):
    """On the GGUF fixture, with NO_COLOR: the file's own template and tokenizer give the model
    the reference prompt (its length shows in the speed line), no colour codes reach the screen,
    and Ctrl+D at the prompt ends the chat."""
    model_path = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    with Terminal([sys.executable, "-m", "qwen35", "run", str(model_path), "-n", "1", "--temp", "0"],
                  _terminal_env(NO_COLOR="1")) as terminal:
        terminal.expect(r"Type /\? for help", timeout=120)
        terminal.expect(r">>> ")
        terminal.type("Which Qwen 3.5 model fits a 24GB GPU?\r")
        speed = terminal.expect(SPEED_LINE.pattern, timeout=60)
        assert int(speed[1]) == len(dense_sequences["chat_think"]["ids"]) and int(speed[2]) == 1
        terminal.expect(r">>> ")
        terminal.type("\x04")  # Ctrl+D
        assert terminal.close() == 0
        assert "\x1b[2m" not in terminal.raw and "\x1b[0m" not in terminal.raw


# -- the session without a terminal -----------------------------------------------------------------


def test_multiline_messages_join_like_ollama():
    assembler = LineAssembler()
    assert assembler.feed("plain") == "plain"
    assert assembler.feed('"""one line"""') == "one line"
    assert assembler.feed('"""') is None and assembler.pending
    assert assembler.feed("a") is None
    assert assembler.feed("b") is None
    assert assembler.feed('"""') == "a\nb"
    assert not assembler.pending
    assert assembler.feed('"""x') is None
    assert assembler.feed('y"""') == "x\ny"


def _answer(session, text):
    events = list(session.answer(text))
    return events, session.last_turn


def test_outgrown_context_drops_the_oldest_turns(model, dense_tokenizer):
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=40, max_new_tokens=2,
                                                         sampling={"temperature": 0.0}, think=False))
    notices = []
    for number in range(4):
        events, turn = _answer(session, f"question number {number}")
        notices += [event.text for event in events if isinstance(event, Notice)]
        assert turn.cached_tokens + turn.prompt_tokens + turn.generated_tokens <= 40
    users = [message["content"] for message in session.messages if message["role"] == "user"]
    assert users[-1] == "question number 3" and "question number 0" not in users
    assert any("outgrew the context of 40 tokens" in notice for notice in notices)
    # What is left is the latest turns, whole: each user message with its answer.
    roles = [message["role"] for message in session.messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2)


@pytest.fixture(scope="module")
def reference_model(dense_hf):
    from qwen35 import load_model

    return load_model(dense_hf, precision="reference")


def _said(events):
    return [(type(event).__name__, getattr(event, "reasoning", None), getattr(event, "content", None),
             getattr(event, "text", None)) for event in events]


@pytest.mark.parametrize("think", [False, None])
def test_a_second_turn_reads_only_its_new_tokens_and_answers_as_a_fresh_session(reference_model, dense_tokenizer,
                                                                                 think):
    settings = dict(context_size=512, max_new_tokens=12, sampling={"temperature": 0.0}, think=think)
    session = ChatSession(reference_model, dense_tokenizer, ChatSettings(**settings))
    _, first = _answer(session, "What is the capital of France?")
    assert first.cached_tokens == 0
    history = [dict(message) for message in session.messages]
    events, second = _answer(session, "And of Italy?")

    fresh = ChatSession(reference_model, dense_tokenizer, ChatSettings(**settings))
    fresh.messages = history
    fresh_events, fresh_turn = _answer(fresh, "And of Italy?")
    assert fresh_turn.cached_tokens == 0
    assert _said(events) == _said(fresh_events) and session.messages == fresh.messages
    # The whole prompt was the same; the continued session read only what the first turn had not.
    assert second.cached_tokens + second.prompt_tokens == fresh_turn.prompt_tokens
    assert 0 < second.prompt_tokens < fresh_turn.prompt_tokens
    assert 0 < second.cached_tokens < first.prompt_tokens  # the history, without the answer's opening
    assert f"prompt {second.prompt_tokens} tok (+{second.cached_tokens} cached)" in second.speed_line()


@pytest.mark.parametrize("drafter", ["mtp", "draft model"])
def test_speculating_turns_answer_as_plain_ones_and_keep_the_drafter_with_the_history(model, dense_tokenizer,
                                                                                      dense_hf, drafter):
    """With speculation, a chat answers as without it, turn after turn; the turn cache keeps the drafter's state
    beside the history's, so the next turn's drafter has read the whole history (not only the new part)."""
    from qwen35 import load_model
    from qwen35.engine.speculative import Speculation

    draft = load_model(dense_hf) if drafter == "draft model" else None
    settings = dict(context_size=512, max_new_tokens=10, sampling={"temperature": 0.0}, think=False)
    plain = ChatSession(model, dense_tokenizer, ChatSettings(**settings))
    speculating = ChatSession(model, dense_tokenizer, ChatSettings(
        **settings, speculation=Speculation(draft_model=draft, draft_max=2, p_min=0.0)))
    for message in ("What is the capital of France?", "And of Italy?", "And of Spain?"):
        plain_events, _ = _answer(plain, message)
        events, turn = _answer(speculating, message)
        assert _said(events) == _said(plain_events)
        assert turn.draft_tokens > 0
        history_key, _, drafter_state = speculating._turn_cache._snapshot
        # The drafter's state at the history's end: an MTP layer paired every token but the last; a draft
        # model read them all.
        read = drafter_state[0].lengths[0] + 1 if drafter == "mtp" else drafter_state.lengths[0]
        assert int(read) == len(history_key)
    assert plain.messages == speculating.messages


def test_a_message_too_long_for_the_context_is_refused_and_not_kept(model, dense_tokenizer):
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=32, max_new_tokens=2,
                                                         sampling={"temperature": 0.0}))
    _answer(session, "hi")
    history = list(session.messages)
    with pytest.raises(ContextFullError, match="context holds 32"):
        _answer(session, "word " * 40)
    assert session.messages == history


def test_commands_change_settings_and_refuse_bad_values(model, dense_tokenizer):
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=256))
    assert session.command("/set temperature 0.2").text == "Set parameter 'temperature' to '0.2'"
    assert session.sampling_params().temperature == 0.2
    assert "Couldn't set 'temperature'" in session.command("/set temperature -3").text
    assert session.sampling_params().temperature == 0.2
    assert session.command("/set top_p lots").text == "Couldn't set 'top_p': 'lots' is not a number"
    assert session.command("/set num_predict 0").text.startswith("Couldn't set 'num_predict'")
    session.command("/set parameter top_k 5")
    assert session.sampling_params().top_k == 5
    session.command("/set nothink")
    assert session.template_kwargs()["enable_thinking"] is False
    session.command("/set think on")
    assert session.template_kwargs()["enable_thinking"] is True
    assert session.command("/set think maybe").text == "Usage: /set think on|off"
    assert session.command("/set wibble 3").text.startswith("Unknown parameter 'wibble'")
    assert session.command("/bye").exit and session.command("/exit").exit
    assert session.command("/nonsense").text == "Unknown command '/nonsense'. Type /? for help"


def test_an_interrupted_answer_keeps_what_was_produced(model, dense_tokenizer):
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=256, max_new_tokens=50,
                                                         sampling={"temperature": 0.0}, think=False))
    events = session.answer("tell me")
    shown = ""
    for event in events:
        shown += getattr(event, "content", "")
        if len(shown) > 3:
            break
    events.close()  # what the terminal does on Ctrl+C
    assert session.last_turn.finish_reason == "interrupted"
    assert session.messages[0] == {"role": "user", "content": "tell me"}
    assert session.messages[1]["role"] == "assistant" and session.messages[1]["content"].startswith(shown.strip())


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_without_no_color():
    assert colour_enabled(FakeTerminal(), {"TERM": "xterm"})
    assert not colour_enabled(FakeTerminal(), {"TERM": "xterm", "NO_COLOR": "1"})
    assert not colour_enabled(FakeTerminal(), {"TERM": "dumb"})
    assert not colour_enabled(io.StringIO(), {"TERM": "xterm"})


def _printed(events, colour, hide_thinking):
    out = FakeTerminal()
    printer = AnswerPrinter(out, colour=colour, hide_thinking=hide_thinking)
    for event in events:
        printer.show(event)
    printer.finish()
    return out.getvalue()


def test_printer_dims_or_hides_reasoning_and_shows_tool_calls_plainly():
    events = [ParsedDelta(reasoning_content="let me see"), ParsedDelta(reasoning_content=" more"),
              ParsedDelta(content="It is 4."),
              ParsedDelta(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])]
    assert _printed(events, colour=False, hide_thinking=False) == (
        'Thinking...\nlet me see more\n...done thinking.\n\nIt is 4.\n[tool call] get_weather {"city": "Paris"}\n'
    )
    assert _printed(events, colour=False, hide_thinking=True) == (
        'It is 4.\n[tool call] get_weather {"city": "Paris"}\n'
    )
    coloured = _printed(events, colour=True, hide_thinking=False)
    assert "\x1b[2mlet me see\x1b[0m" in coloured and "\x1b[2m" not in coloured[coloured.index("It is"):]


def test_sampling_follows_the_models_generation_defaults_unless_overridden(model, dense_tokenizer):
    defaults = model.generation_defaults  # generation_config.json, or Qwen 3.5's published defaults
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=256))
    params = session.sampling_params()
    assert (params.temperature, params.top_k, params.top_p) == (
        defaults["temperature"], defaults["top_k"], defaults["top_p"])
    session = ChatSession(model, dense_tokenizer, ChatSettings(context_size=256, sampling={"top_k": 3}))
    params = session.sampling_params()
    assert (params.temperature, params.top_k, params.top_p) == (defaults["temperature"], 3, defaults["top_p"])


def test_piped_stdin_is_the_one_shot_message(monkeypatch):
    from qwen35.chat.command import _one_shot_prompt
    from qwen35.errors import Qwen35Error

    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n"))
    assert _one_shot_prompt([]) == "line one\nline two"
    monkeypatch.setattr(sys, "stdin", io.StringIO("the text"))
    assert _one_shot_prompt(["Summarize:"]) == "Summarize:\n\nthe text"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert _one_shot_prompt(["just", "words"]) == "just words"
    with pytest.raises(Qwen35Error, match="holds no text"):
        _one_shot_prompt([])
