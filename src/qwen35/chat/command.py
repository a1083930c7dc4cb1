"""Chat with a model in the terminal: one answer to PROMPT, or an interactive session.

  qwen35 run MODEL [PROMPT... | -p PROMPT] [--mmproj FILE] [--image FILE]... [-c CTX] [-n N] [--temp T]
             [--think | --no-think] [--hide-thinking] [--reasoning-budget N]

MODEL is a .gguf file (or the first shard of a split one), an HF model directory, or a name
`qwen35 pull` takes (qwen3.5:35b-a3b, owner/name:Q4_K_M), pulled first if it is not yet. With a
PROMPT (or text piped into stdin) it prints the answer and exits; otherwise it opens a chat
at the ">>> " prompt: /? lists the commands, \"\"\" begins and ends a multi-line message,
Ctrl+C stops an answer, /bye or Ctrl+D exits. The reasoning is shown dimmed (with NO_COLOR
set, or when the output is not a terminal, between "Thinking..." and "...done thinking.").
Sampling follows the model's own generation settings unless flags override them.

Images, for a model that reads them (an HF directory with a vision tower, or a GGUF file with
--mmproj, its vision projector): --image FILE goes with the one-shot PROMPT (or the chat's first
message), /image FILE with the next message, and a path to an image file typed in a message is
attached and taken out of the text, as `ollama run` does (chat/attachments.py says which words count).

Every flag but the prompt and --image may also come from the environment (qwen35/env_settings.py), as llama-cli
reads it: QWEN35_<LONG FLAG>, else llama.cpp's LLAMA_ARG_* name; the command line wins. Ollama's OLLAMA_*
variables configure its server, which `ollama run` talks to; there is none here, and run reads none of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from qwen35.chat.template import read_template_file
from qwen35.cache_options import add_cache_arguments, cache_options
from qwen35.device_options import add_device_arguments, load_options
from qwen35.env_settings import (SHARED_FLAGS, TOKENS, CommandVariables, add_environment_defaults, apply_environment,
                                 blaming, boolean, decimal, epilog, flags, overridden, summary, text)
from qwen35.errors import Qwen35Error
from qwen35.hub import resolve_model_argument
from qwen35.speculation_options import add_speculation_arguments, check_speculation_arguments, speculation_from_arguments

DEFAULT_CONTEXT = 8192
TRAILING_WORDS = "prompt"  # cli.py: PROMPT words may also follow the flags
PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
EXIT_HINT = "Use Ctrl + d or /bye to exit."
DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="a .gguf file, an HF model directory, or a name to pull (qwen3.5:35b-a3b, "
                             "owner/name:QUANT); may come from the environment (then give the prompt as -p TEXT)")
    parser.add_argument("prompt", metavar="PROMPT", nargs="*",
                        help="answer this and exit (default: an interactive chat)")
    parser.add_argument("-p", "--prompt", default=None, dest="prompt_flag", metavar="TEXT",
                        help="the one-shot prompt, llama.cpp's spelling (instead of the PROMPT words)")
    parser.add_argument("--mmproj", default=None, metavar="FILE",
                        help="the model's vision projector GGUF, so that messages may carry images "
                             "(an HF directory with a vision tower needs none; a pulled model brings its own)")
    parser.add_argument("--no-mmproj", action="store_true", help="do not load a pulled model's vision projector")
    parser.add_argument("--image", action="append", default=[], dest="images", metavar="FILE",
                        help="an image for the PROMPT (interactive: for the first message); repeatable")
    parser.add_argument("-c", "--ctx-size", type=int, default=DEFAULT_CONTEXT, dest="context", metavar="N",
                        help=f"context in tokens, prompt and answers together (default {DEFAULT_CONTEXT}; "
                             "0 = the model's own)")
    parser.add_argument("-n", "--n-predict", "--predict", type=int, default=-1, dest="n_predict", metavar="N",
                        help="most tokens per answer (default -1: until the model stops or the context is full)")
    parser.add_argument("--temp", type=float, default=None, dest="temperature", metavar="T",
                        help="temperature (0 = greedy; default: the model's own)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k (0 = off; default: the model's own)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p (1 = off; default: the model's own)")
    parser.add_argument("--min-p", type=float, default=None, help="min-p (0 = off; default: the model's own)")
    parser.add_argument("--repeat-penalty", type=float, default=None, help="repetition penalty (1 = off)")
    parser.add_argument("--presence-penalty", type=float, default=None, help="presence penalty (0 = off)")
    parser.add_argument("--frequency-penalty", type=float, default=None, help="frequency penalty (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default -1: a fresh one)")
    parser.add_argument("-sys", "--system-prompt", default=None, dest="system", metavar="TEXT", help="the system message")
    thinking = parser.add_mutually_exclusive_group()
    thinking.add_argument("--think", action="store_true", default=None, dest="think",
                          help="let the model reason before answering (the Qwen 3.5 default)")
    thinking.add_argument("--no-think", action="store_false", dest="think", help="answer without reasoning")
    parser.add_argument("--hide-thinking", action="store_true", help="do not show the reasoning")
    parser.add_argument("--reasoning-budget", type=int, default=-1, metavar="N",
                        help="most reasoning tokens per answer, then </think> is inserted "
                             "(-1 = unlimited, the default; 0 = no thinking)")
    parser.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                        help="a JSON object of extra chat-template variables, "
                             "e.g. '{\"enable_thinking\": false}'")
    parser.add_argument("--chat-template-file", default=None, metavar="FILE",
                        help="a Jinja chat template to use instead of the model's")
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="CPU threads for the model (default: torch's choice, one per core)")
    add_device_arguments(parser)
    add_cache_arguments(parser)
    add_speculation_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="after a one-shot answer, print its speed line on stderr")
    parser.description = f"{parser.description or ''}\n\n{ENVIRONMENT}".strip()
    parser.epilog = epilog(RUN_VARIABLES, {"LLAMA_ARG_REASONING": "=on|off|auto"})
    add_environment_defaults(parser, os.environ, RUN_VARIABLES)


# Every flag but the prompt (PROMPT, -p) and --image: a variable set for a one-shot prompt would turn every chat
# into one answer. llama.cpp's names are llama-cli's (tools/cli/README.md), the ones llama-server shares.
RUN_VARIABLES = CommandVariables(flags(
    ("model", ("MODEL",), text),
    ("context", ("-c", "--ctx-size"), TOKENS),  # 0: the model's own, as LLAMA_ARG_CTX_SIZE=0 means
    ("temperature", ("--temp",), decimal),
    ("system", ("-sys", "--system-prompt"), text),
    ("think", ("--think", "--no-think"), boolean),
    ("hide_thinking", ("--hide-thinking",), boolean),
    ("verbose", ("--verbose",), boolean),
) + sum(SHARED_FLAGS.values(), ()))

ENVIRONMENT = """\
Every flag but the prompt and --image may also come from the environment: QWEN35_<LONG FLAG> (QWEN35_CTX_SIZE,
QWEN35_TEMP, QWEN35_THINK, QWEN35_MODEL ...), else llama-cli's LLAMA_ARG_* name (listed below); no OLLAMA_*.
The command line wins; an empty variable counts as unset; a bad value stops run with one line."""


def run(args) -> int:
    sources = apply_environment(args)  # a bad variable: one line, before anything else
    if not args.model:
        raise Qwen35Error("give the MODEL to run (or set QWEN35_MODEL or LLAMA_ARG_MODEL)")
    with blaming(sources):
        settings = _settings(args)
        if args.threads is not None and args.threads < 1:
            raise Qwen35Error(f"-t must be at least 1, got {args.threads}")
        check_speculation_arguments(args)
        cache_options(args)  # a bad -ctk/-ctv fails before a pull or a load
        template_source = read_template_file(args.chat_template_file) if args.chat_template_file else None
        _check_image_files(args)
    if summary(sources):  # before the model loads: a setting one did not expect shows at once
        print(f"qwen35 run: {summary(sources)}", file=sys.stderr, flush=True)
    if args.prompt_flag is not None and args.prompt:
        raise Qwen35Error("give the prompt once: as PROMPT or as -p TEXT")
    prompt = _one_shot_prompt([args.prompt_flag] if args.prompt_flag is not None else args.prompt)
    try:
        resolved = resolve_model_argument(args.model, "qwen35 run")
    except Qwen35Error as error:
        if (source := overridden(args, "model")) is None:
            raise
        # `qwen35 run "a question"` with the model in the environment: the question is taken for MODEL.
        raise Qwen35Error(f"{error} (MODEL on the command line goes over {source}; to run that model, give the "
                          "prompt as -p TEXT)") from None
    path = resolved.path
    mmproj = args.mmproj or (str(resolved.mmproj) if resolved.mmproj and not args.no_mmproj else None)
    if args.images and mmproj is None and not path.is_dir():
        raise Qwen35Error(f"--image: a GGUF file holds no vision tower; {NO_VISION_FIX}")

    from qwen35 import load_model, load_tokenizer
    from qwen35.chat.attachments import check_vision
    from qwen35.chat.session import ChatSession
    from qwen35.chat.template import ChatTemplate

    from qwen35.progress import byte_progress

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(path))
    with blaming(sources):  # --device, -ngl: checked here, with the GPU in view
        options = load_options(args, path, context=args.context, command="qwen35 run")
    options.update(cache_options(args))
    with byte_progress(f"loading {path.name}") as progress:
        model = load_model(str(path), mmproj=mmproj, progress=progress, **options)
    settings.speculation = speculation_from_arguments(args, model, options, command="qwen35 run")
    template = None
    if template_source is not None:
        template = ChatTemplate(template_source, special_tokens=tokenizer.template_tokens)
    session = ChatSession(model, tokenizer, settings, template=template)
    session.render([{"role": "user", "content": "Hello"}])  # a broken template fails now, not mid-chat
    if args.images:
        check_vision(model, NO_VISION_FIX)
    for image in args.images:
        session.attach_image(Path(image).expanduser(), name=image)

    if prompt is not None:
        return _one_shot(session, prompt, args.verbose)
    return _interactive(session, resolved.name)


NO_VISION_FIX = "give --mmproj FILE (the model's vision projector GGUF), or use an HF checkpoint with a vision tower"


def _check_image_files(args) -> None:
    """Missing files fail before a pull or a load."""
    if args.mmproj is not None and not Path(args.mmproj).is_file():
        raise Qwen35Error(f"--mmproj {args.mmproj}: no such file")
    for image in args.images:
        if not Path(image).expanduser().is_file():
            raise Qwen35Error(f"--image {image}: no such file")


# -- flags ---------------------------------------------------------------------------------


SAMPLING_FLAGS = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                  "repetition_penalty": "--repeat-penalty", "presence_penalty": "--presence-penalty",
                  "frequency_penalty": "--frequency-penalty", "seed": "--seed"}


def _settings(args):
    from qwen35.chat.session import MIN_CONTEXT, ChatSettings
    from qwen35.engine.reasoning_budget import check_budget
    from qwen35.engine.sampler import InvalidSamplingError, SamplingParams

    if args.context != 0 and args.context < MIN_CONTEXT:
        raise Qwen35Error(f"-c must be at least {MIN_CONTEXT} tokens (or 0 for the model's own), got {args.context}")
    if args.n_predict == 0 or args.n_predict < -2:
        raise Qwen35Error(f"-n must be a number of tokens >= 1, or -1 for no limit, got {args.n_predict}")
    sampling = {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repetition_penalty": args.repeat_penalty, "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty, "seed": None if args.seed == -1 else args.seed,
    }
    sampling = {key: value for key, value in sampling.items() if value is not None}
    for option, value in sampling.items():  # a bad value fails before the model loads, naming its flag
        try:
            SamplingParams.from_options({}, **{option: value})
        except InvalidSamplingError as error:
            raise Qwen35Error(f"{SAMPLING_FLAGS[option]} {value}: {error}") from None
    check_budget(args.reasoning_budget, "--reasoning-budget")
    template_kwargs = {}
    if args.chat_template_kwargs is not None:
        try:
            template_kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as error:
            raise Qwen35Error(f"--chat-template-kwargs is not valid JSON: {error.msg}") from None
        if not isinstance(template_kwargs, dict):
            raise Qwen35Error("--chat-template-kwargs must be a JSON object, like '{\"enable_thinking\": false}'")
    return ChatSettings(
        context_size=args.context,
        system=args.system or None,
        think=args.think,
        hide_thinking=args.hide_thinking,
        max_new_tokens=args.n_predict if args.n_predict > 0 else None,
        sampling=sampling,
        template_kwargs=template_kwargs,
        reasoning_budget=args.reasoning_budget,
    )


def _one_shot_prompt(words: list[str]) -> str | None:
    """The one-shot message: PROMPT, then whatever is piped into stdin; None for a chat."""
    parts = [" ".join(words)] if words else []
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        if piped.strip():
            parts.append(piped.strip("\n"))
        elif not parts:
            raise Qwen35Error("stdin is not a terminal and holds no text: give a PROMPT, or run in a terminal to chat")
    return "\n\n".join(parts) if parts else None


# -- output ------------------------------------------------------------------------------------


def colour_enabled(stream, environ=os.environ) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (no-color.org) or TERM=dumb."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


class AnswerPrinter:
    """Writes one streamed answer: reasoning dimmed between "Thinking..." and "...done thinking."
    (or not at all), content as it is, tool calls one per line, notices dimmed."""

    def __init__(self, out, colour: bool, hide_thinking: bool):
        self.out = out
        self.colour = colour
        self.hide_thinking = hide_thinking
        self._in_reasoning = False
        self._at_line_start = True

    def show(self, event) -> None:
        from qwen35.chat.session import Notice

        if isinstance(event, Notice):
            self._line(event.text, dim=True)
            return
        if event.reasoning_content and not self.hide_thinking:
            if not self._in_reasoning:
                self._line("", dim=False)
                self._write("Thinking...\n", dim=True)
                self._in_reasoning = True
            self._write(event.reasoning_content, dim=True)
        if event.content:
            self._end_reasoning()
            self._write(event.content)
        for call in event.tool_calls:
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            self._line(f"[tool call] {call['name']} {arguments}", dim=False)

    def finish(self) -> None:
        """End the answer on a fresh line."""
        self._end_reasoning()
        if not self._at_line_start:
            self._write("\n")

    def interrupted(self) -> None:
        if self.colour:
            self.out.write(RESET)  # in case the stop came in the middle of dimmed text
        self._in_reasoning = False
        self.finish()

    def speed_line(self, text: str) -> None:
        if text:
            self._line(text, dim=True)

    def _end_reasoning(self) -> None:
        if self._in_reasoning:
            self._in_reasoning = False
            self._write("\n...done thinking.\n\n", dim=True)

    def _line(self, text: str, dim: bool) -> None:
        """`text` on a line of its own (nothing but a line break when empty)."""
        self._end_reasoning()
        if not self._at_line_start:
            self._write("\n")
        if text:
            self._write(text + "\n", dim=dim)

    def _write(self, text: str, dim: bool = False) -> None:
        if not text:
            return
        if dim and self.colour:
            body = text.rstrip("\n")  # line breaks outside the codes: a reset never waits on the next line
            text = f"{DIM}{body}{RESET}{text[len(body):]}" if body else text
        self.out.write(text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")


# -- the two modes --------------------------------------------------------------------------


def _one_shot(session, text: str, verbose: bool) -> int:
    from qwen35.chat.session import ImageAdded

    printer = AnswerPrinter(sys.stdout, colour_enabled(sys.stdout), session.settings.hide_thinking)
    for event in session.answer(text):
        if isinstance(event, ImageAdded):  # as Ollama does: the answer alone goes to stdout
            print(event.text, file=sys.stderr, flush=True)
            continue
        printer.show(event)
    printer.finish()
    if verbose:
        print(session.last_turn.speed_line(), file=sys.stderr)
    return 0


def _interactive(session, name: str) -> int:
    from qwen35.chat.slash_commands import LineAssembler

    try:
        import readline  # line editing and history for input()
    except ImportError:
        readline = None

    out = sys.stdout
    colour = colour_enabled(out)
    hint = f"{name}: context {session.settings.context_size} tokens. Type /? for help, /bye or Ctrl + d to exit."
    lines = [hint] + [f"Added image '{image.name}' ({image.num_tokens} tokens); it goes with your first message."
                      for image in session.pending_images]
    for line in lines:
        out.write(f"{DIM}{line}{RESET}\n" if colour else f"{line}\n")
    assembler = LineAssembler()
    while True:
        try:
            line = input(CONTINUATION_PROMPT if assembler.pending else PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            typed = readline.get_line_buffer() if readline is not None else ""
            if assembler.pending:
                assembler.reset()  # Ctrl+C drops the unfinished multi-line message
            elif not typed:  # Ctrl+C on a typed line just clears it, as in Ollama
                out.write(EXIT_HINT + "\n\n")
            continue
        # Bytes that are not UTF-8 reach input() as lone surrogates; they become U+FFFD.
        line = line.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        try:
            if not assembler.pending and line.lstrip().startswith("/"):
                result = session.command(line)
                if result.exit:
                    return 0
                if result.text:
                    out.write(result.text + "\n\n")
                continue
            message = assembler.feed(line)
            if message is not None and message.strip():
                _chat_turn(session, message, out, colour)
        except KeyboardInterrupt:  # a Ctrl+C outside an answer (or a second one while it stops)
            out.write((RESET if colour else "") + "\n")


def _chat_turn(session, message: str, out, colour: bool) -> None:
    printer = AnswerPrinter(out, colour, session.settings.hide_thinking)
    events = session.answer(message)
    try:
        with contextlib.closing(events):
            for event in events:
                printer.show(event)
        printer.finish()
    except KeyboardInterrupt:
        printer.interrupted()
    except Qwen35Error as error:
        printer.finish()
        out.write(f"error: {error}\n\n")
        return
    printer.speed_line(session.last_turn.speed_line())
    out.write("\n")
