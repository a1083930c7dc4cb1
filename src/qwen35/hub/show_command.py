"""What a model is, from its files' headers: architecture, parameters, quantization, capabilities, defaults.

  qwen35 show MODEL [--modelfile | --parameters | --template | --system | --license | --json] [-v]

MODEL is what `qwen35 run` takes: a .gguf file (any shard of a split one), an HF model directory,
or a pulled name (qwen3.5:35b-a3b); a name not pulled yet is not pulled by show. As `ollama show`
prints it: the Model, Capabilities, Parameters (the sampling defaults `qwen35 run` uses) and License
sections, or one of them alone with its flag. -v adds every metadata key (long values cut as
llama.cpp's gguf-dump cuts them) and the tensors; --json prints Ollama's /api/show object.
Only headers are read, never the weights: a 20 GB file shows at once.
"""

from __future__ import annotations

import argparse
import json

SECTION_INDENT = 2
ROW_INDENT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a .gguf file, an HF model directory, or a pulled name (qwen3.5:35b-a3b)")
    parser.add_argument("--mmproj", default=None, metavar="FILE",
                        help="the model's vision projector GGUF (a pulled model brings its own)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--modelfile", action="store_true", help="an Ollama-style Modelfile of the model")
    only.add_argument("--parameters", action="store_true", help="the sampling defaults only")
    only.add_argument("--template", action="store_true", help="the chat template (Jinja) only")
    only.add_argument("--system", action="store_true", help="the system message the model ships (Qwen's: none)")
    only.add_argument("--license", action="store_true", help="the license only")
    only.add_argument("--json", action="store_true", help="Ollama's /api/show object on stdout")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="every metadata key and the tensors (with --json: the long arrays too)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen35.errors import Qwen35Error
    from qwen35.hub.details import modelfile, ollama_parameters, read_model_details, show_response
    from qwen35.hub.pull import resolve_model

    if args.mmproj is not None and not Path(args.mmproj).is_file():
        raise Qwen35Error(f"--mmproj {args.mmproj}: no such file")
    resolved = resolve_model(args.model, pull_if_missing=False)
    details = read_model_details(resolved.path, args.mmproj or resolved.mmproj)
    if args.json:
        print(json.dumps(show_response(details, verbose=args.verbose, name=resolved.name), indent=2,
                         ensure_ascii=False))
    elif args.modelfile:
        print(modelfile(details, details.parameters, resolved.name), end="")
    elif args.parameters:
        for key, value in ollama_parameters(details.parameters):
            print(f"{key:<30} {value}")
    elif args.template:
        print(details.template_in_use)
    elif args.license:
        if details.license:
            print(details.license)
    elif not args.system:  # Qwen's models ship no system message: --system prints nothing, as Ollama's does
        print_sections(details, args.verbose)
    return 0


def print_sections(details, verbose: bool) -> None:
    from rich.console import Console

    from qwen35.hub.details import human_number, ollama_parameters, summarise

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    count = human_number(details.parameter_count) if details.parameter_count else "unknown"
    _section(console, "Model", [("architecture", details.architecture), ("parameters", count),
                                ("context length", details.context_length),
                                ("embedding length", details.embedding_length),
                                ("quantization", details.quantization)])
    projector = details.projector
    if projector is not None:
        rows = [("architecture", projector.architecture), ("parameters", human_number(projector.parameter_count))]
        rows += [(label, value) for label, value in (("embedding length", projector.embedding_length),
                                                     ("dimensions", projector.dimensions)) if value is not None]
        if verbose:
            rows += [(key, summarise(value)) for key, value in projector.metadata.items()]
        _section(console, "Projector", rows)
    _section(console, "Capabilities", [(name,) for name in details.capabilities])
    _section(console, "Parameters", ollama_parameters(details.parameters))
    if details.license:
        lines = [line.strip() for line in details.license.splitlines() if line.strip()]
        _section(console, "License", [(line,) for line in lines[:2]] + ([("...",)] if len(lines) > 2 else []))
    if verbose:
        _section(console, "Metadata", [(key, summarise(value)) for key, value in details.metadata.items()])
        _section(console, "Tensors", [(row.name, row.type_name, f"[{', '.join(map(str, row.shape))}]")
                                      for row in details.tensors])


def _section(console, title: str, rows: list[tuple]) -> None:
    """A heading and its rows in aligned columns, as `ollama show` lays them out."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    if not rows:
        return
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 4, 0, 0))
    for _ in rows[0]:
        table.add_column(no_wrap=True)
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))  # Text: a value's [brackets] are not markup
    console.print(Text(" " * SECTION_INDENT + title))
    with console.capture() as captured:
        console.print(Padding(table, (0, 0, 1, ROW_INDENT), expand=False))
    # rich pads each cell to its column's width; `ollama show`'s lines end at their last character
    console.out("\n".join(line.rstrip() for line in captured.get().split("\n")), end="", highlight=False)
