"""Images in `qwen35 run`: --image, /image and image paths typed in a message, against transformers'
fixture for one image and a question (ref/dense.vision.*: its prompt ids, logits and greedy tokens).

The HF checkpoint in reference precision is the network transformers ran, so its logits agree within
2e-3 (tests/test_vision_model.py's bound) and its greedy tokens are transformers' own.
"""

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_run_command import CACHED_SPEED_LINE, SPEED_LINE, Terminal, _reference_text, _terminal_env

from qwen35.chat.attachments import image_paths_in, message_images
from qwen35.chat.session import ChatSession, ChatSettings, ImageAdded, Notice
from qwen35.errors import Qwen35Error

HF_TOLERANCE = 2e-3
QUESTION = "What is in this picture?"
IMAGE_TOKEN = 4108  # <|image_pad|>


def qwen35(*args):
    return subprocess.run([sys.executable, "-m", "qwen35", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def vision(fixtures):
    """(the fixture's record, transformers' logits [tokens, vocab], the image's path)."""
    reference = json.loads((fixtures / "ref" / "dense.vision.json").read_text())
    logits = np.load(fixtures / "ref" / "dense.vision.transformers.logits.npy")
    return reference, logits, fixtures / "ref" / reference["image"]


@pytest.fixture(scope="module")
def reference_model(dense_hf):
    from qwen35 import load_model

    return load_model(dense_hf, precision="reference")


@pytest.fixture(scope="module")
def tokenizer(dense_hf):
    from qwen35 import load_tokenizer

    return load_tokenizer(dense_hf)


@pytest.fixture(scope="module")
def text_only_model(fixtures):
    from qwen35 import load_model

    return load_model(fixtures / "tiny" / "dense-Q8_0.gguf")


def _settings(**extra):
    return ChatSettings(**{"context_size": 1024, "max_new_tokens": 8, "sampling": {"temperature": 0.0},
                           "think": False, **extra})


class RecordingModel:
    """The model, recording the logits after each prompt piece the session and its generation loop feed,
    keyed by how many tokens the cache holds then (so position key - 1 of the prompt)."""

    def __init__(self, model):
        self._model = model
        self.logits = {}
        self.prompts = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_prompt(self, prompt, cache, start=0, stop=None, last_only=False):
        self.prompts.append(prompt)
        return self._keep(self._model.forward_prompt(prompt, cache, start, stop, last_only=last_only), cache)

    def forward(self, input_ids, cache, positions=None, embeddings=None, last_only=False):
        return self._keep(self._model.forward(input_ids, cache, positions, embeddings, last_only=last_only), cache)

    def _keep(self, logits, cache):
        self.logits[int(cache.lengths[0])] = logits[0, -1].float().numpy()
        return logits


# -- one-shot ---------------------------------------------------------------------------------


def test_session_prompt_and_prefill_logits_are_transformers(vision, reference_model, tokenizer):
    """The session's image prompt is the processor's, token for token, and every logit row its prefill
    produces (the history's end, the answer's opening) is transformers' within 2e-3."""
    reference, expected, image = vision
    recorder = RecordingModel(reference_model)
    session = ChatSession(recorder, tokenizer, _settings(max_new_tokens=1))
    session.attach_image(image)
    list(session.answer(QUESTION))
    assert recorder.prompts and all(p.token_ids == reference["ids"] for p in recorder.prompts)
    assert session.last_turn.prompt_tokens == len(reference["ids"])
    prefill = {end: row for end, row in recorder.logits.items() if end <= len(reference["ids"])}
    assert len(reference["ids"]) in prefill and len(prefill) >= 2  # the history's end and the prompt's end
    for end, row in prefill.items():
        assert np.abs(row - expected[end - 1]).max() <= HF_TOLERANCE, end
    # The image is in the history, as the template renders it: a part before the text.
    assert session.messages[0]["content"][1] == {"type": "text", "text": QUESTION}
    assert [i.num_tokens for i in message_images(session.messages)] == [reference["n_image_tokens"]]


def test_one_shot_with_image_prints_transformers_greedy_answer(vision, dense_hf, reference_model, tokenizer,
                                                               monkeypatch, capsys):
    from qwen35.cli import main

    reference, _, image = vision
    expected = _reference_text(tokenizer, reference["transformers_greedy"])
    loaded = {}
    monkeypatch.setattr("qwen35.load_model", lambda path, **options: loaded.update(options) or reference_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    count = len(reference["transformers_greedy"])
    status = main(["run", str(dense_hf), "--image", str(image), "--no-think", "--temp", "0",
                   "-n", str(count), "--verbose", "-p", QUESTION])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert printed.out == expected + "\n"
    speed = SPEED_LINE.search(printed.err)
    assert speed and int(speed[1]) == len(reference["ids"]) and int(speed[2]) == count
    assert loaded["mmproj"] is None  # an HF checkpoint brings its own vision tower


def test_image_path_in_a_one_shot_prompt_is_attached(vision, dense_hf, tokenizer, tmp_path):
    """As `ollama run MODEL "... ./photo.png"`: the path leaves the text, the image goes in; fast precision,
    in a process of its own, as a person runs it."""
    reference, _, image = vision
    copy = tmp_path / "my photo.png"
    copy.write_bytes(image.read_bytes())
    result = qwen35("run", str(dense_hf), f"{QUESTION} '{copy}'", "--no-think", "--temp", "0", "-n", "8",
                    "--verbose")
    assert result.returncode == 0, result.stderr
    assert f"Added image '{copy}'." in result.stderr  # on stderr: stdout holds the answer alone
    assert result.stdout == _reference_text(tokenizer, reference["transformers_greedy"][:8]) + "\n"
    speed = SPEED_LINE.search(result.stderr)
    assert speed and int(speed[1]) == len(reference["ids"])


def test_gguf_with_mmproj_reads_the_image(fixtures, vision):
    reference, _, image = vision
    result = qwen35("run", str(fixtures / "tiny" / "dense-Q8_0.gguf"), QUESTION,
                    "--mmproj", str(fixtures / "tiny" / "dense-mmproj-F32.gguf"), "--image", str(image),
                    "--no-think", "--temp", "0", "-n", "2", "--verbose")
    assert result.returncode == 0, result.stderr
    speed = SPEED_LINE.search(result.stderr)
    assert speed and int(speed[1]) == len(reference["ids"]) and int(speed[2]) == 2


@pytest.mark.parametrize("case", ["gguf without mmproj", "missing mmproj", "missing image", "prompt twice"])
def test_image_flag_mistakes_are_one_line_before_loading(fixtures, vision, dense_hf, case):
    _, _, image = vision
    gguf = fixtures / "tiny" / "dense-Q8_0.gguf"
    argv, complaint = {
        "gguf without mmproj": ([str(gguf), "hi", "--image", str(image)], "holds no vision tower; give --mmproj"),
        "missing mmproj": ([str(gguf), "hi", "--mmproj", "/nonexistent/mmproj.gguf"],
                           "--mmproj /nonexistent/mmproj.gguf: no such file"),
        "missing image": ([str(dense_hf), "hi", "--image", "/nonexistent/cat.png"],
                          "--image /nonexistent/cat.png: no such file"),
        "prompt twice": ([str(dense_hf), "hi", "-p", "there"], "give the prompt once"),
    }[case]
    result = qwen35("run", *argv)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and complaint in result.stderr
    assert "loading" not in result.stderr


def _huge_png(path):
    """A PNG declaring 10000 x 7000 pixels (more than the decoder's limit) in a few kilobytes."""
    Image.new("1", (10000, 7000)).save(path)
    return path


@pytest.mark.parametrize("kind", ["not an image", "too large"])
def test_a_bad_image_is_one_line_and_exit_1(dense_hf, reference_model, monkeypatch, capsys, tmp_path, kind):
    from qwen35.cli import main

    if kind == "not an image":
        bad = tmp_path / "notes.png"
        bad.write_text("not a picture")
        complaint = "is not an image in a format Pillow can read"
    else:
        bad = _huge_png(tmp_path / "huge.png")
        complaint = "the image is 10000x7000 pixels"
    monkeypatch.setattr("qwen35.load_model", lambda path, **options: reference_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    status = main(["run", str(dense_hf), "hi", "--image", str(bad)])
    printed = capsys.readouterr()
    assert status == 1 and printed.out == ""
    assert printed.err.count("\n") == 1 and complaint in printed.err


def test_one_shot_image_for_a_model_without_vision_is_one_line(dense_hf, vision, text_only_model, monkeypatch,
                                                                capsys):
    """An HF directory is only known to lack a vision tower once loaded: still one line and exit 1."""
    from qwen35.cli import main

    monkeypatch.setattr("qwen35.load_model", lambda path, **options: text_only_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    status = main(["run", str(dense_hf), "hi", "--image", str(vision[2])])
    printed = capsys.readouterr()
    assert status == 1 and printed.out == ""
    assert printed.err.count("\n") == 1 and "no vision tower" in printed.err and "--mmproj" in printed.err


# -- the conversation -------------------------------------------------------------------------


def _answer(session, text):
    events = list(session.answer(text))
    return events, session.last_turn


def _said(events):
    return [(type(event).__name__, getattr(event, "reasoning_content", None), getattr(event, "content", None),
             getattr(event, "text", None)) for event in events]


def test_a_turn_after_an_image_reads_only_its_new_tokens_and_answers_as_transformers(vision, reference_model,
                                                                                    tokenizer):
    """The second turn restores the first turn's snapshot (the image inside it) and equals both a fresh
    session given the same history and the one-request generation loop with the image."""
    reference, _, image = vision
    session = ChatSession(reference_model, tokenizer, _settings())
    session.attach_image(image)
    _, first = _answer(session, QUESTION)
    assert first.cached_tokens == 0
    history = [dict(message) for message in session.messages]
    events, second = _answer(session, "And the colours?")

    fresh = ChatSession(reference_model, tokenizer, _settings())
    fresh.messages = list(history)
    fresh_events, fresh_turn = _answer(fresh, "And the colours?")
    assert fresh_turn.cached_tokens == 0
    assert _said(events) == _said(fresh_events) and session.messages == fresh.messages
    assert second.cached_tokens + second.prompt_tokens == fresh_turn.prompt_tokens
    # The cached part holds the image's 70 tokens and the first question, but not the answer's opening.
    assert reference["n_image_tokens"] < second.cached_tokens < first.prompt_tokens

    # The generation loop alone, from the rendered conversation and the image: the same answer.
    prompt = tokenizer.apply_chat_template(history + [{"role": "user", "content": "And the colours?"}],
                                           enable_thinking=False)
    tokens = reference_model.generate(tokenizer.encode(prompt), max_new_tokens=8, images=[image], temperature=0)
    assert "".join(e.content for e in events) == tokenizer.decode(tokens).strip()


def test_a_snapshot_is_not_reused_for_another_image_of_the_same_size(vision, reference_model, tokenizer):
    """Two images of one size render to the same token ids: the snapshot is keyed by their pixels too."""
    _, _, image = vision
    flipped = np.ascontiguousarray(np.asarray(Image.open(image).convert("RGB"))[::-1])
    session = ChatSession(reference_model, tokenizer, _settings())
    session.attach_image(image)
    _answer(session, QUESTION)
    other = session.attach_image(flipped, name="flipped")
    session.pending_images.clear()
    session.messages[0]["content"][0]["image"] = other  # the same conversation, with the other picture
    history = list(session.messages)
    events, turn = _answer(session, "And the colours?")
    assert turn.cached_tokens == 0
    fresh = ChatSession(reference_model, tokenizer, _settings())
    fresh.messages = history
    assert _said(events) == _said(_answer(fresh, "And the colours?")[0])


def test_dropped_turns_take_their_images_with_them(vision, reference_model, tokenizer):
    reference, _, image = vision
    context = len(reference["ids"]) + 40
    session = ChatSession(reference_model, tokenizer, _settings(context_size=context, max_new_tokens=4))
    session.attach_image(image)
    _answer(session, QUESTION)
    assert len(message_images(session.messages)) == 1
    notices = []
    for number in range(3):
        events, turn = _answer(session, f"question number {number}")
        notices += [event.text for event in events if isinstance(event, Notice)]
        # Counted with the image expanded: prompt and answer fit the context.
        assert turn.cached_tokens + turn.prompt_tokens + turn.generated_tokens <= context
    assert any("outgrew the context" in notice for notice in notices)
    assert message_images(session.messages) == []
    assert session.messages[0]["content"].startswith("question number")


def test_an_image_alone_does_not_fit_a_small_context(vision, reference_model, tokenizer):
    from qwen35.chat.session import ContextFullError

    _, _, image = vision
    session = ChatSession(reference_model, tokenizer, _settings(context_size=64))
    session.attach_image(image)
    with pytest.raises(ContextFullError, match="context holds 64"):
        _answer(session, QUESTION)
    assert session.messages == [] and len(session.pending_images) == 1  # kept: a larger -c can take it


def test_image_command_attaches_to_the_next_message_only(vision, reference_model, tokenizer, tmp_path):
    reference, _, image = vision
    session = ChatSession(reference_model, tokenizer, _settings(max_new_tokens=2))
    assert session.command("/image").text == "Usage: /image PATH"
    missing = session.command("/image /nonexistent/cat.png").text
    assert missing == "Couldn't add image: no such image file: /nonexistent/cat.png"
    (tmp_path / "notes.png").write_text("not a picture")
    bad = session.command(f"/image {tmp_path / 'notes.png'}").text
    assert bad.startswith("Couldn't add image:") and "not an image" in bad and "\n" not in bad
    added = session.command(f'/image "{image}"').text
    assert added == f"Added image '{image}' ({reference['n_image_tokens']} tokens); it goes with your next message."
    assert "1 image attached for the next message" in session.command("/show").text
    _, turn = _answer(session, QUESTION)
    assert turn.prompt_tokens == len(reference["ids"]) and session.pending_images == []
    assert "1 turn in the history, with 1 image" in session.command("/show").text
    _, turn = _answer(session, "And now?")
    assert len(message_images(session.messages)) == 1  # the second message brought none
    session.command(f"/image {image}")
    assert session.command("/clear").text == "Cleared session context and 1 image not yet sent."
    assert session.pending_images == [] and session.messages == []
    assert "/image PATH" in session.command("/?").text
    spaced = tmp_path / "my photo.png"  # typed as drag and drop types it, or quoted
    spaced.write_bytes(image.read_bytes())
    escaped = str(spaced).replace(" ", "\\ ")
    assert session.command(f"/image {escaped}").text.startswith(f"Added image '{spaced}' (70 tokens)")
    assert session.command(f"/image '{spaced}'").text.startswith(f"Added image '{spaced}' (70 tokens)")


def test_image_path_in_a_message_is_attached_and_taken_out(vision, reference_model, tokenizer):
    reference, _, image = vision
    session = ChatSession(reference_model, tokenizer, _settings(max_new_tokens=2))
    events, turn = _answer(session, f"{QUESTION} {image}")
    assert [e.text for e in events if isinstance(e, ImageAdded)] == [f"Added image '{image}'."]
    assert turn.prompt_tokens == len(reference["ids"])  # exactly the fixture's prompt: the path is gone
    assert session.messages[0]["content"][1] == {"type": "text", "text": QUESTION}


def test_without_a_vision_tower_images_are_refused_in_one_line_and_paths_stay_text(vision, text_only_model,
                                                                                 tokenizer):
    _, _, image = vision
    session = ChatSession(text_only_model, tokenizer, _settings(max_new_tokens=1))
    refusal = session.command(f"/image {image}").text
    assert refusal.startswith("Couldn't add image: this model has no vision tower") and "\n" not in refusal
    assert session.pending_images == []
    events, _ = _answer(session, f"Where is {image}?")  # a text model: the path is just text
    assert not any(isinstance(e, ImageAdded) for e in events)
    assert session.messages[0] == {"role": "user", "content": f"Where is {image}?"}
    with pytest.raises(Qwen35Error, match="no vision tower"):
        session.attach_image(image)


def test_image_paths_in_text_follow_ollamas_rules(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "pics").mkdir(parents=True)
    for name in ("cat.png", "dog photo.JPG", "notes.txt", "plain.webp"):
        (home / "pics" / name).write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    cat, dog = home / "pics" / "cat.png", home / "pics" / "dog photo.JPG"

    assert image_paths_in(f"What is in {cat}?") == ("What is in?", [(str(cat), cat)])
    assert image_paths_in("Compare ~/pics/cat.png with './pics/dog photo.JPG' please") == (
        "Compare with please", [("~/pics/cat.png", cat), ("./pics/dog photo.JPG", dog)])
    assert image_paths_in("see ./pics/dog\\ photo.JPG, then (./pics/cat.png)") == (
        "see, then ()", [("./pics/dog photo.JPG", dog), ("./pics/cat.png", cat)])
    assert image_paths_in(f"{cat}") == ("", [(str(cat), cat)])
    # The same file twice is one image; both mentions go.
    assert image_paths_in(f"{cat} and {cat}") == ("and", [(str(cat), cat)])
    # Not attachments: bare names, other kinds of file, files that do not exist, and the lines around stay.
    for text in ("describe pics/cat.png", "plain.webp", "./pics/notes.txt", "/nonexistent/cat.png",
                 "line one\n  indented ./pics/missing.png"):
        assert image_paths_in(text) == (text, [])
    assert image_paths_in("first line\n./pics/cat.png\n  second") == ("first line\n\n  second",
                                                                      [("./pics/cat.png", cat)])


# -- the interactive chat through a pseudo-terminal ---------------------------------------------


def test_interactive_images_as_a_person_uses_them(vision, dense_hf, tokenizer, tmp_path):
    reference, _, image = vision
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    expected = _reference_text(tokenizer, reference["transformers_greedy"][:4])
    with Terminal([sys.executable, "-m", "qwen35", "run", str(dense_hf), "--image", str(image),
                   "--no-think", "--temp", "0", "-n", "4"], _terminal_env(NO_COLOR="1")) as terminal:
        terminal.expect(rf"Added image '{re.escape(str(image))}' \(70 tokens\); it goes with your first message\.",
                        timeout=120)
        terminal.expect(r">>> ")
        # --image went with the first message: the fixture's prompt, transformers' answer.
        terminal.type(QUESTION + "\r")
        first = terminal.expect(rf"{re.escape(expected)}\n{SPEED_LINE.pattern}")
        assert int(first[1]) == len(reference["ids"])
        terminal.expect(r">>> ")

        terminal.type(f"/image {not_image}\r")
        terminal.expect(r"Couldn't add image: .*notes\.png is not an image")
        terminal.expect(r">>> ")
        terminal.type(f"/image {image}\r")
        terminal.expect(r"Added image .* \(70 tokens\); it goes with your next message\.")
        terminal.expect(r">>> ")
        terminal.type("/clear\r")
        terminal.expect(r"Cleared session context and 1 image not yet sent\.")
        terminal.expect(r">>> ")

        # After /clear, a path in the message: again the fixture's prompt, and the same answer.
        terminal.type(f"{QUESTION} '{image}'\r")
        terminal.expect(rf"Added image '{re.escape(str(image))}'\.")
        again = terminal.expect(rf"{re.escape(expected)}\n{SPEED_LINE.pattern}")
        assert int(again[1]) == len(reference["ids"])
        terminal.expect(r">>> ")

        # A broken file named in a message: one line, nothing sent, the chat goes on.
        terminal.type(f"and this? {not_image}\r")
        terminal.expect(r"error: .*notes\.png is not an image in a format Pillow can read")
        terminal.expect(r">>> ")

        # The next turn reads only its own tokens: the image is in the cached history.
        terminal.type("And the colours?\r")
        follow_up = terminal.expect(CACHED_SPEED_LINE.pattern)
        assert int(follow_up[2]) > reference["n_image_tokens"]
        terminal.expect(r">>> ")
        terminal.bye()
