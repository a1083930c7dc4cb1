"""Flags from environment variables, as llama.cpp's tools read them: what `qwen35 serve` and `qwen35 run` share.

Each flag of a command may come from, in this order: the command line; QWEN35_<LONG FLAG> (QWEN35_CTX_SIZE for
--ctx-size, QWEN35_MODEL for MODEL); llama.cpp's LLAMA_ARG_* name for the flag (LLAMA_VARIABLES: as in llama.cpp,
where a name set once applies to every tool that has its flag, each command reads the names of the flags it
has); then the command's own further names (serve's: Ollama's OLLAMA_*). The first that is set wins; an empty
variable counts as unset. Every variable that is set is checked, and a bad value is one line naming it before
any model loads. Each command's table: server/env_settings.py (serve), chat/command.py (run); `bench` reads
none, as llama-bench reads none.

The values become the parser's defaults (so a flag on the command line wins, as in llama.cpp); a bad one is kept
until `apply_environment` raises it, so that building the parser for another command never fails.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable

from qwen35.errors import Qwen35Error
from qwen35.speculation_options import SPEC_TYPES

UNSET = object()  # a reader's answer for a value that spells "the default" (llama.cpp's -np -1, -ngl auto)
ALL_LAYERS = 999  # llama.cpp's `-ngl all`; -ngl N above the layer count puts the whole model on the GPU
RANKS = {"QWEN35_": 1, "LLAMA_": 2, "OLLAMA_": 3}  # 0 is the command line

Reader = Callable[[str], object]  # the text to the flag's value; ValueError(reason) when it is not one


# --- readers ---------------------------------------------------------------------------------------


def text(value: str) -> str:
    return value


def count(noun: str, signed: bool = False) -> Reader:
    """An integer written in digits (a sign too, where `signed`): `noun` names it in the error."""
    pattern = r"[+-]?[0-9]+" if signed else r"[0-9]+"

    def read(value: str) -> int:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"not {noun}")
        return int(value)
    return read


def whole(noun: str) -> Reader:
    return count(noun, signed=True)


def decimal(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return number


# llama.cpp's spellings of a boolean variable (common/arg.cpp: is_truthy / is_falsey).
TRUE_WORDS, FALSE_WORDS = ("1", "true", "on", "enabled"), ("0", "false", "off", "disabled")


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"not a boolean (use one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")
    return lowered in TRUE_WORDS


def negated(value: str) -> bool:
    """LLAMA_ARG_MMAP=0 for --no-mmap: the variable names the flag's opposite."""
    return not boolean(value)


def default_when(spellings: tuple[str, ...], reader: Reader) -> Reader:
    """llama.cpp's and Ollama's ways of writing "the default" (-np -1, -t -1, OLLAMA_NUM_PARALLEL=0)."""
    def read(value: str):
        return UNSET if value.lower() in spellings else reader(value)
    return read


def reasoning(value: str):
    """llama.cpp's -rea on|off|auto (common/arg.cpp: is_truthy, is_falsey, is_autoy) as --think/--no-think."""
    if value.lower() in ("auto", "-1"):
        return UNSET
    if value.lower() not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError("not on, off or auto")
    return boolean(value)


def gpu_layers(value: str):
    lowered = value.lower()
    if lowered in ("auto", "-1"):
        return UNSET
    return ALL_LAYERS if lowered == "all" else count("a number of layers, auto or all")(value)


def flash_attention(value: str) -> str:
    """on/off/auto, or the boolean that older llama.cpp took for -fa; other words fail in serve's own check."""
    lowered = value.lower()
    return "on" if lowered in TRUE_WORDS else "off" if lowered in FALSE_WORDS else lowered


def spec_type(value: str) -> str:
    if value not in SPEC_TYPES:
        raise ValueError(f"not a speculation type here (use one of {', '.join(SPEC_TYPES)})")
    return value


def llama_spec_type(value: str):
    # llama.cpp's draft-simple is drafting with -md, which is what -md alone means here.
    return UNSET if value == "draft-simple" else spec_type(value)


def device(value: str) -> str:
    """--device's spellings, checked without importing torch (device_options.resolve_device says the rest)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError("not a device (auto, cpu, cuda or cuda:N)")
    return value


TOKENS, LAYERS = count("a number of tokens"), count("a number of layers")


class Deferred:
    """A variable's value that needs the other flags to become the flag's (serve: OLLAMA_CONTEXT_LENGTH)."""

    def settle(self, args):
        raise NotImplementedError


# --- the tables ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    dest: str
    spellings: tuple[str, ...]  # as on the command line, the QWEN35_ name from the first long one
    read: Reader

    @property
    def variable(self) -> str:
        long = next((spelling for spelling in self.spellings if spelling.startswith("--")), self.spellings[0])
        return "QWEN35_" + long.lstrip("-").replace("-", "_").upper()


def flags(*rows) -> tuple[Flag, ...]:
    return tuple(Flag(*row) for row in rows)


# The rows both commands have, as device_options, cache_options and speculation_options add their flags to both.
SHARED_FLAGS = {
    "vision": flags(("mmproj", ("--mmproj",), text), ("no_mmproj", ("--no-mmproj",), boolean)),
    "sampling": flags(  # --temp aside: its dest differs (serve: temp, run: temperature)
        ("top_k", ("--top-k",), whole("a whole number")),
        ("top_p", ("--top-p",), decimal),
        ("min_p", ("--min-p",), decimal),
        ("repeat_penalty", ("--repeat-penalty",), decimal),
        ("presence_penalty", ("--presence-penalty",), decimal),
        ("frequency_penalty", ("--frequency-penalty",), decimal),
        ("seed", ("--seed",), whole("a whole number")),
        ("n_predict", ("-n", "--n-predict", "--predict"), whole("a number of tokens")),
    ),
    "template": flags(
        ("chat_template_file", ("--chat-template-file",), text),
        ("chat_template_kwargs", ("--chat-template-kwargs",), text),
        ("reasoning_budget", ("--reasoning-budget",), whole("a number of tokens")),
    ),
    "machine": flags(
        ("threads", ("-t", "--threads"), count("a number of threads")),
        ("device", ("--device",), device),
        ("gpu_layers", ("-ngl", "--n-gpu-layers"), LAYERS),
        ("cpu_moe_layers", ("--n-cpu-moe",), LAYERS),
        ("cache_type_k", ("-ctk", "--cache-type-k"), text),
        ("cache_type_v", ("-ctv", "--cache-type-v"), text),
    ),
    "speculation": flags(
        ("spec_type", ("--spec-type",), spec_type),
        ("draft_model", ("-md", "--model-draft", "--spec-draft-model"), text),
        ("draft_max", ("--draft-max", "--draft", "--spec-draft-n-max"), TOKENS),
        ("draft_min", ("--draft-min", "--spec-draft-n-min"), TOKENS),
        ("draft_p_min", ("--draft-p-min",), decimal),
        ("draft_vocab", ("--draft-vocab",), TOKENS),
        ("speculative_config", ("--speculative-config",), text),
    ),
}

# llama.cpp's variables: the names its tools/server/README.md and tools/cli/README.md list ("(env: ...)",
# generated from common/arg.cpp's set_env calls), newer name first where one was renamed (LLAMA_ARG_DRAFT_MAX ->
# LLAMA_ARG_SPEC_DRAFT_N_MAX, LLAMA_ARG_NO_MMAP -> LLAMA_ARG_MMAP ...). A command reads the names of the flags it
# has, as each llama.cpp tool does; llama.cpp gives -s/--seed, -sys and -p none.
# variable -> (a spelling of the flag, reader; None: the flag's own)
LLAMA_VARIABLES = {
    "LLAMA_ARG_MODEL": ("MODEL", None),
    "LLAMA_ARG_HF_REPO": ("MODEL", None),  # -hf owner/name[:quant], a name MODEL takes too
    "LLAMA_ARG_MMPROJ": ("--mmproj", None),
    "LLAMA_ARG_MMPROJ_AUTO": ("--no-mmproj", negated),
    "LLAMA_ARG_HOST": ("--host", None),
    "LLAMA_ARG_PORT": ("--port", None),
    "LLAMA_API_KEY": ("--api-key", None),
    "LLAMA_ARG_CTX_SIZE": ("--ctx-size", None),  # 0: the model's own context
    "LLAMA_ARG_N_PARALLEL": ("--parallel", default_when(("-1",), count("a number of requests"))),  # -1: auto
    "LLAMA_ARG_ALIAS": ("--alias", None),
    "LLAMA_ARG_THREADS": ("--threads", default_when(("-1",), count("a number of threads"))),
    "LLAMA_ARG_TEMPERATURE": ("--temp", None),
    "LLAMA_ARG_TOP_K": ("--top-k", None),
    "LLAMA_ARG_TOP_P": ("--top-p", None),
    "LLAMA_ARG_MIN_P": ("--min-p", None),
    "LLAMA_ARG_REPEAT_PENALTY": ("--repeat-penalty", None),
    "LLAMA_ARG_PRESENCE_PENALTY": ("--presence-penalty", None),
    "LLAMA_ARG_FREQUENCY_PENALTY": ("--frequency-penalty", None),
    "LLAMA_ARG_N_PREDICT": ("--n-predict", None),
    "LLAMA_ARG_CHAT_TEMPLATE_FILE": ("--chat-template-file", None),
    "LLAMA_ARG_CHAT_TEMPLATE_KWARGS": ("--chat-template-kwargs", None),
    "LLAMA_ARG_JINJA": ("--jinja", None),
    "LLAMA_ARG_THINK": ("--reasoning-format", None),
    "LLAMA_ARG_REASONING": ("--think", reasoning),  # -rea on|off|auto
    "LLAMA_ARG_THINK_BUDGET": ("--reasoning-budget", None),
    "LLAMA_ARG_FLASH_ATTN": ("--flash-attn", None),
    "LLAMA_ARG_BATCH": ("--batch-size", None),
    "LLAMA_ARG_UBATCH": ("--ubatch-size", None),
    "LLAMA_ARG_CONT_BATCHING": ("--cont-batching", None),
    "LLAMA_ARG_ENDPOINT_METRICS": ("--metrics", None),
    "LLAMA_ARG_UI": ("--no-webui", negated),
    "LLAMA_ARG_NO_WEBUI": ("--no-webui", None),
    "LLAMA_ARG_POOLING": ("--pooling", None),
    "LLAMA_ARG_EMBEDDINGS": ("--embeddings", None),
    "LLAMA_ARG_MLOCK": ("--mlock", None),
    "LLAMA_ARG_MMAP": ("--no-mmap", negated),
    "LLAMA_ARG_NO_MMAP": ("--no-mmap", None),
    "LLAMA_ARG_N_GPU_LAYERS": ("--n-gpu-layers", gpu_layers),
    "LLAMA_ARG_N_CPU_MOE": ("--n-cpu-moe", None),
    "LLAMA_ARG_CACHE_TYPE_K": ("--cache-type-k", None),
    "LLAMA_ARG_CACHE_TYPE_V": ("--cache-type-v", None),
    "LLAMA_ARG_SPEC_TYPE": ("--spec-type", llama_spec_type),
    "LLAMA_ARG_SPEC_DRAFT_MODEL": ("--model-draft", None),
    "LLAMA_ARG_MODEL_DRAFT": ("--model-draft", None),
    "LLAMA_ARG_SPEC_DRAFT_N_MAX": ("--draft-max", None),
    "LLAMA_ARG_DRAFT_MAX": ("--draft-max", None),
    "LLAMA_ARG_SPEC_DRAFT_N_MIN": ("--draft-min", None),
    "LLAMA_ARG_DRAFT_MIN": ("--draft-min", None),
    "LLAMA_ARG_SPEC_DRAFT_P_MIN": ("--draft-p-min", None),
    "LLAMA_ARG_DRAFT_P_MIN": ("--draft-p-min", None),
}


@dataclass(frozen=True)
class CommandVariables:
    """One command's flags, and the variables each reads: its QWEN35_ name, llama.cpp's, then `others`."""

    flags: tuple[Flag, ...]
    llama_readers: dict = field(default_factory=dict)  # a LLAMA_VARIABLES name this command reads its own way
    others: tuple = ()  # (variable, a spelling of the flag, reader or None), after llama.cpp's names

    def flag(self, dest: str) -> Flag:
        return next(flag for flag in self.flags if flag.dest == dest)

    def variables_for(self, dest: str) -> list[tuple[str, Reader]]:
        """The variables `dest` reads, first first, each with its reader."""
        flag = self.flag(dest)
        found = [(name, self.llama_readers.get(name, read)) for name, (spelling, read) in LLAMA_VARIABLES.items()
                 if spelling in flag.spellings]
        found += [(name, read) for name, spelling, read in self.others if spelling in flag.spellings]
        return [(flag.variable, flag.read)] + [(name, read or flag.read) for name, read in found]

    def names(self) -> set[str]:
        return {name for flag in self.flags for name, _ in self.variables_for(flag.dest)}


# --- resolution ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    variable: str
    text: str
    value: object
    flag: Flag | None = None  # the flag it sets

    @property
    def rank(self) -> int:
        return next(rank for prefix, rank in RANKS.items() if self.variable.startswith(prefix))

    def __str__(self) -> str:  # never shows a key
        return self.variable if self.variable.endswith("API_KEY") else f"{self.variable}={shown(self.text)}"


def shown(value: str, limit: int = 60) -> str:
    one_line = value.replace("\n", "\\n").replace("\r", "\\r")
    return one_line if len(one_line) <= limit else one_line[:limit] + "..."


@dataclass(frozen=True)
class Environment:
    sources: dict  # dest -> the Source that sets its default
    errors: tuple  # one line each, for apply_environment to raise


def read_environment(environ, table: CommandVariables) -> Environment:
    sources, errors = {}, []
    for flag in table.flags:
        for variable, read in table.variables_for(flag.dest):
            raw = environ.get(variable)
            is_key = variable.endswith("API_KEY")  # taken as it is, as before; only an empty one is unset
            if raw is None or not (raw if is_key else raw.strip()):
                continue
            value_text = raw if is_key else raw.strip()
            if variable.startswith("OLLAMA_"):  # Ollama's envconfig drops quotes around a value
                value_text = value_text.strip("\"'")
            try:
                value = read(value_text)
            except ValueError as error:
                line = f"{Source(variable, value_text, None)}: {error}"
                if line not in errors:
                    errors.append(line)
                continue
            if value is not UNSET and flag.dest not in sources:
                sources[flag.dest] = Source(variable, value_text, value, flag)
    return Environment(sources, tuple(errors))


def add_environment_defaults(parser, environ, table: CommandVariables) -> None:
    """The variables' values as `parser`'s defaults (checked later, by apply_environment)."""
    environment = read_environment(environ, table)
    parser.set_defaults(**{dest: source.value for dest, source in environment.sources.items()},
                        _environment=environment)


def apply_environment(args) -> dict:
    """Raise the first bad variable; settle the values that need the other flags; the Sources of the settings
    that came from the environment (dest -> Source), also kept as args._environment_sources."""
    if hasattr(args, "_environment_sources"):
        return args._environment_sources
    environment = getattr(args, "_environment", None) or Environment({}, ())
    if environment.errors:
        raise Qwen35Error(environment.errors[0])
    in_effect = {}
    for dest, source in environment.sources.items():
        value = getattr(args, dest)
        if isinstance(source.value, Deferred):
            if isinstance(value, Deferred):  # else the command line set it
                setattr(args, dest, value.settle(args))
                in_effect[dest] = source
        elif value == source.value:  # else the command line set it
            in_effect[dest] = source
    args._environment_sources = in_effect
    return in_effect


def overridden(args, dest: str) -> Source | None:
    """The Source of the variable that the command line went over for `dest`, if one did."""
    environment = getattr(args, "_environment", None)
    source = environment.sources.get(dest) if environment else None
    return None if source is None or dest in apply_environment(args) else source


FLAG_WORD = re.compile(r"(?<![\w-])(-{1,2}[a-z][a-z-]*)")


def blame(message: str, sources: dict) -> str:
    """`message` (about flags) with the variables that set the flags it names, so that it names them."""
    words = set(FLAG_WORD.findall(message))
    named = [str(source) for source in sources.values() if words & set(source.flag.spellings)]
    named = list(dict.fromkeys(named))  # OLLAMA_KV_CACHE_TYPE sets -ctk and -ctv: named once
    return f"{message} (from {', '.join(named)})" if named else message


@contextlib.contextmanager
def blaming(sources: dict):
    """A Qwen35Error raised inside, named with the variables that set the flags it names (`blame`)."""
    try:
        yield
    except Qwen35Error as error:
        raise Qwen35Error(blame(str(error), sources)) from None


def summary(sources: dict) -> str | None:
    """One line saying which settings came from which variables (keys not shown)."""
    if not sources:
        return None
    parts = [f"{source.flag.spellings[0]} from {source}" for source in sources.values()]
    return "settings from the environment: " + ", ".join(parts)


def epilog(table: CommandVariables, notes: dict | None = None) -> str:
    """The variables each flag reads after its QWEN35_ one; `notes` (name -> text) said after a name."""
    lines = ["environment variables, after QWEN35_<LONG FLAG> (the command line wins over all):"]
    for flag in table.flags:
        names = [name + ("=0" if read is negated else (notes or {}).get(name, ""))
                 for name, read in table.variables_for(flag.dest)[1:]]
        if names:
            lines.append(f"  {flag.spellings[0]:<22} {', '.join(names)}")
    return "\n".join(lines)
