"""The `qwen35` command: one subcommand per job, each defined next to the code it drives.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`, and keeps
its heavy imports (torch) inside `run` so that `--help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qwen35 import __version__
from qwen35.errors import Qwen35Error

# name -> (module, one-line help)
SUBCOMMANDS = {  # in the order a person meets them
    "plan": ("qwen35.plan.command", "which model, quant and context fit this machine, and how fast"),
    "pull": ("qwen35.hub.pull_command", "download a model by tag (qwen3.5:35b-a3b) or hub repo"),
    "run": ("qwen35.chat.command", "chat with a model: one-shot or interactive"),
    "serve": ("qwen35.server.command", "serve a model over HTTP: OpenAI-, Anthropic- and Ollama-compatible APIs"),
    "bench": ("qwen35.bench", "prefill and decode speed, comparable with llama-bench"),
    "list": ("qwen35.hub.list_command", "the models pulled so far"),
    "show": ("qwen35.hub.show_command", "what a model is: architecture, parameters, quantization, capabilities, defaults"),
    "rm": ("qwen35.hub.rm_command", "remove a pulled model and its files"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line, exit 2, like argparse but without the usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qwen35",
        description="Run the Qwen 3.5 model family on your own machine.",
    )
    parser.add_argument("--version", action="version", version=f"qwen35 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip().splitlines()[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    rest = getattr(getattr(args, "_module", None), "TRAILING_WORDS", None)
    if extras and rest and not any(word.startswith("-") and len(word) > 1 for word in extras):
        # `qwen35 run MODEL --no-think "hi"`: argparse closes the PROMPT list at the first flag;
        # words after the flags belong to it, as with ollama run.
        setattr(args, rest, [*getattr(args, rest), *extras])
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except Qwen35Error as error:
        print(f"qwen35 {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
