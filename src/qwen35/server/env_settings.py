"""`qwen35 serve`'s settings from environment variables, as llama-server and Ollama deployments set them.

Each flag may come from, in this order: the command line; QWEN35_<LONG FLAG> (QWEN35_CTX_SIZE for --ctx-size,
QWEN35_MODEL for MODEL); llama-server's LLAMA_ARG_* name for the flag; Ollama's OLLAMA_* name where one maps.
The first that is set wins; an empty variable counts as unset. Every variable that is set is checked, and a bad
value is one line naming it before any model loads.

The values become the parser's defaults (so a flag on the command line wins, as in llama.cpp); a bad one is kept
until `apply_environment` raises it, so that building the parser for another command never fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from qwen35.errors import Qwen35Error
from qwen35.speculation_options import SPEC_TYPES

UNSET = object()  # a reader's answer for a value that spells "the default" (llama.cpp's -c 0, -np -1, -ngl auto)
ALL_LAYERS = 999  # llama.cpp's `-ngl all`; -ngl N above the layer count puts the whole model on the GPU
OLLAMA_PORT = 11434  # Ollama's port when OLLAMA_HOST names none
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
    """llama.cpp's and Ollama's ways of writing "the default" (-c 0, -np -1, OLLAMA_NUM_PARALLEL=0)."""
    def read(value: str):
        return UNSET if value.lower() in spellings else reader(value)
    return read


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
    # llama-server's draft-simple is drafting with -md, which is what -md alone means here.
    return UNSET if value == "draft-simple" else spec_type(value)


class ContextPerRequest(int):
    """-c from OLLAMA_CONTEXT_LENGTH: tokens for one request, multiplied by -np once that is known."""


def host(value: str) -> str:
    from qwen35.server.command import split_host

    split_host(value)  # ValueError with the reason
    return value


def api_key(value: str) -> str:
    if not value.strip():  # a key no client can send (they strip it): refused rather than left open
        raise ValueError("only blanks; give a key, or leave the variable empty for none")
    return value


def llama_api_key(value: str) -> str:
    if "," in value:  # llama-server's list of keys
        raise ValueError("several comma-separated keys are not supported here; give one key")
    return api_key(value)


def device(value: str) -> str:
    """--device's spellings, checked without importing torch (device_options.resolve_device says the rest)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise ValueError("not a device (auto, cpu, cuda or cuda:N)")
    return value


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    dest: str
    spellings: tuple[str, ...]  # as on the command line, the QWEN35_ name from the first long one
    read: Reader

    @property
    def variable(self) -> str:
        long = next((spelling for spelling in self.spellings if spelling.startswith("--")), self.spellings[0])
        return "QWEN35_" + long.lstrip("-").replace("-", "_").upper()


TOKENS, LAYERS = count("a number of tokens"), count("a number of layers")
FLAGS = [Flag(*row) for row in (
    ("model", ("MODEL",), text),
    ("mmproj", ("--mmproj",), text),
    ("no_mmproj", ("--no-mmproj",), boolean),
    ("host", ("--host",), host),
    ("port", ("--port",), count("a port number")),
    ("api_key", ("--api-key",), api_key),
    ("context", ("-c", "--ctx-size"), TOKENS),
    ("parallel", ("-np", "--parallel"), count("a number of requests")),
    ("queue", ("--queue",), count("a number of requests")),
    ("prefix_cache_mb", ("--prefix-cache-mb",), count("a number of megabytes")),
    ("name", ("--name", "-a", "--alias"), text),
    ("threads", ("-t", "--threads"), count("a number of threads")),
    ("temp", ("--temp",), decimal),
    ("top_k", ("--top-k",), whole("a whole number")),
    ("top_p", ("--top-p",), decimal),
    ("min_p", ("--min-p",), decimal),
    ("repeat_penalty", ("--repeat-penalty",), decimal),
    ("presence_penalty", ("--presence-penalty",), decimal),
    ("frequency_penalty", ("--frequency-penalty",), decimal),
    ("seed", ("--seed",), whole("a whole number")),
    ("n_predict", ("-n", "--n-predict", "--predict"), whole("a number of tokens")),
    ("chat_template_file", ("--chat-template-file",), text),
    ("chat_template_kwargs", ("--chat-template-kwargs",), text),
    ("jinja", ("--jinja",), boolean),
    ("reasoning_format", ("--reasoning-format",), text),
    ("reasoning_budget", ("--reasoning-budget",), whole("a number of tokens")),
    ("flash_attn", ("-fa", "--flash-attn"), flash_attention),
    ("batch_size", ("-b", "--batch-size"), TOKENS),
    ("ubatch_size", ("-ub", "--ubatch-size"), TOKENS),
    ("cont_batching", ("-cb", "--cont-batching"), boolean),
    ("metrics", ("--metrics",), boolean),
    ("no_webui", ("--no-webui",), boolean),
    ("mlock", ("--mlock",), boolean),
    ("no_mmap", ("--no-mmap",), boolean),
    ("device", ("--device",), device),
    ("gpu_layers", ("-ngl", "--n-gpu-layers"), LAYERS),
    ("cpu_moe_layers", ("--n-cpu-moe",), LAYERS),
    ("cache_type_k", ("-ctk", "--cache-type-k"), text),
    ("cache_type_v", ("-ctv", "--cache-type-v"), text),
    ("spec_type", ("--spec-type",), spec_type),
    ("draft_model", ("-md", "--model-draft", "--spec-draft-model"), text),
    ("draft_max", ("--draft-max", "--draft", "--spec-draft-n-max"), TOKENS),
    ("draft_min", ("--draft-min", "--spec-draft-n-min"), TOKENS),
    ("draft_p_min", ("--draft-p-min",), decimal),
    ("draft_vocab", ("--draft-vocab",), TOKENS),
    ("speculative_config", ("--speculative-config",), text),
)]
FLAGS_BY_DEST = {flag.dest: flag for flag in FLAGS}

# llama-server's variables for the flags serve has: the names llama.cpp's tools/server/README.md lists
# ("(env: ...)", generated from common/arg.cpp's set_env calls), newer name first where one was renamed
# (LLAMA_ARG_DRAFT_MAX -> LLAMA_ARG_SPEC_DRAFT_N_MAX, LLAMA_ARG_NO_MMAP -> LLAMA_ARG_MMAP ...).
# variable -> (dest, reader; None: the flag's own)
LLAMA_SERVER_VARIABLES = {
    "LLAMA_ARG_MODEL": ("model", None),
    "LLAMA_ARG_HF_REPO": ("model", None),  # -hf owner/name[:quant], a name MODEL takes too
    "LLAMA_ARG_MMPROJ": ("mmproj", None),
    "LLAMA_ARG_MMPROJ_AUTO": ("no_mmproj", negated),
    "LLAMA_ARG_HOST": ("host", None),
    "LLAMA_ARG_PORT": ("port", None),
    "LLAMA_API_KEY": ("api_key", llama_api_key),
    "LLAMA_ARG_CTX_SIZE": ("context", default_when(("0",), TOKENS)),  # 0: the model's, here the default
    "LLAMA_ARG_N_PARALLEL": ("parallel", default_when(("-1",), count("a number of requests"))),  # -1: auto
    "LLAMA_ARG_ALIAS": ("name", None),
    "LLAMA_ARG_THREADS": ("threads", default_when(("-1",), count("a number of threads"))),
    "LLAMA_ARG_TEMPERATURE": ("temp", None),
    "LLAMA_ARG_TOP_K": ("top_k", None),
    "LLAMA_ARG_TOP_P": ("top_p", None),
    "LLAMA_ARG_MIN_P": ("min_p", None),
    "LLAMA_ARG_REPEAT_PENALTY": ("repeat_penalty", None),
    "LLAMA_ARG_PRESENCE_PENALTY": ("presence_penalty", None),
    "LLAMA_ARG_FREQUENCY_PENALTY": ("frequency_penalty", None),
    "LLAMA_ARG_N_PREDICT": ("n_predict", None),
    "LLAMA_ARG_CHAT_TEMPLATE_FILE": ("chat_template_file", None),
    "LLAMA_ARG_CHAT_TEMPLATE_KWARGS": ("chat_template_kwargs", None),
    "LLAMA_ARG_JINJA": ("jinja", None),
    "LLAMA_ARG_THINK": ("reasoning_format", None),
    "LLAMA_ARG_THINK_BUDGET": ("reasoning_budget", None),
    "LLAMA_ARG_FLASH_ATTN": ("flash_attn", None),
    "LLAMA_ARG_BATCH": ("batch_size", None),
    "LLAMA_ARG_UBATCH": ("ubatch_size", None),
    "LLAMA_ARG_CONT_BATCHING": ("cont_batching", None),
    "LLAMA_ARG_ENDPOINT_METRICS": ("metrics", None),
    "LLAMA_ARG_UI": ("no_webui", negated),
    "LLAMA_ARG_NO_WEBUI": ("no_webui", None),
    "LLAMA_ARG_MLOCK": ("mlock", None),
    "LLAMA_ARG_MMAP": ("no_mmap", negated),
    "LLAMA_ARG_NO_MMAP": ("no_mmap", None),
    "LLAMA_ARG_N_GPU_LAYERS": ("gpu_layers", gpu_layers),
    "LLAMA_ARG_N_CPU_MOE": ("cpu_moe_layers", None),
    "LLAMA_ARG_CACHE_TYPE_K": ("cache_type_k", None),
    "LLAMA_ARG_CACHE_TYPE_V": ("cache_type_v", None),
    "LLAMA_ARG_SPEC_TYPE": ("spec_type", llama_spec_type),
    "LLAMA_ARG_SPEC_DRAFT_MODEL": ("draft_model", None),
    "LLAMA_ARG_MODEL_DRAFT": ("draft_model", None),
    "LLAMA_ARG_SPEC_DRAFT_N_MAX": ("draft_max", None),
    "LLAMA_ARG_DRAFT_MAX": ("draft_max", None),
    "LLAMA_ARG_SPEC_DRAFT_N_MIN": ("draft_min", None),
    "LLAMA_ARG_DRAFT_MIN": ("draft_min", None),
    "LLAMA_ARG_SPEC_DRAFT_P_MIN": ("draft_p_min", None),
    "LLAMA_ARG_DRAFT_P_MIN": ("draft_p_min", None),
}

def context_per_request(value: str):
    """OLLAMA_CONTEXT_LENGTH, Ollama's num_ctx (0: Ollama picks one; here the default)."""
    tokens = default_when(("0",), TOKENS)(value)
    return tokens if tokens is UNSET else ContextPerRequest(tokens)


# Ollama's server variables that map (ollama/ollama envconfig/config.go). OLLAMA_CONTEXT_LENGTH is Ollama's
# num_ctx, the context of one request: -c here is shared by the -np slots, so it becomes that times -np.
OLLAMA_VARIABLES = [
    ("OLLAMA_HOST", "host", None),  # without a port, Ollama's 11434
    ("OLLAMA_CONTEXT_LENGTH", "context", context_per_request),
    ("OLLAMA_NUM_PARALLEL", "parallel", default_when(("0",), count("a number of requests"))),
    ("OLLAMA_MAX_QUEUE", "queue", None),
    ("OLLAMA_KV_CACHE_TYPE", "cache_type_k", None),  # K and V both
    ("OLLAMA_KV_CACHE_TYPE", "cache_type_v", None),
]


def variables_for(dest: str) -> list[tuple[str, Reader]]:
    """The variables `dest` reads, first first, each with its reader."""
    flag = FLAGS_BY_DEST[dest]
    found = [(flag.variable, flag.read)]
    found += [(name, read or flag.read) for name, (to, read) in LLAMA_SERVER_VARIABLES.items() if to == dest]
    found += [(name, read or flag.read) for name, to, read in OLLAMA_VARIABLES if to == dest]
    return found


# --- resolution ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    variable: str
    text: str
    value: object

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


def read_environment(environ) -> Environment:
    sources, errors = {}, []
    for flag in FLAGS:
        for variable, read in variables_for(flag.dest):
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
                sources[flag.dest] = Source(variable, value_text, value)
    return Environment(sources, tuple(errors))


def add_environment_defaults(parser, environ) -> None:
    """The variables' values as `parser`'s defaults (checked later, by apply_environment)."""
    environment = read_environment(environ)
    parser.set_defaults(**{dest: source.value for dest, source in environment.sources.items()},
                        _environment=environment)


def apply_environment(args) -> dict:
    """Raise the first bad variable; turn a per-request -c into -np slots' worth; the Sources of the settings
    that came from the environment (dest -> Source), also kept as args._environment_sources."""
    if hasattr(args, "_environment_sources"):
        return args._environment_sources
    environment = getattr(args, "_environment", None) or Environment({}, ())
    if environment.errors:
        raise Qwen35Error(environment.errors[0])
    in_effect = {}
    for dest, source in environment.sources.items():
        value = getattr(args, dest)
        if isinstance(source.value, ContextPerRequest):
            if isinstance(value, ContextPerRequest):  # else -c was on the command line
                args.context = int(value) * args.parallel
                in_effect[dest] = source
        elif value == source.value:  # else the command line set it
            in_effect[dest] = source
    args._environment_sources = in_effect
    return in_effect


FLAG_WORD = re.compile(r"(?<![\w-])(-{1,2}[a-z][a-z-]*)")


def blame(message: str, sources: dict) -> str:
    """`message` (about flags) with the variables that set the flags it names, so that it names them."""
    words = set(FLAG_WORD.findall(message))
    named = [str(source) for dest, source in sources.items() if words & set(FLAGS_BY_DEST[dest].spellings)]
    named = list(dict.fromkeys(named))  # OLLAMA_KV_CACHE_TYPE sets -ctk and -ctv: named once
    return f"{message} (from {', '.join(named)})" if named else message


def summary(sources: dict) -> str | None:
    """One line saying which settings came from which variables (keys not shown)."""
    if not sources:
        return None
    parts = [f"{FLAGS_BY_DEST[dest].spellings[0]} from {source}" for dest, source in sources.items()]
    return "settings from the environment: " + ", ".join(parts)


DESCRIPTION = """\
Every flag may also come from the environment: QWEN35_<LONG FLAG> (QWEN35_CTX_SIZE, QWEN35_PARALLEL,
QWEN35_MODEL ...), else llama-server's LLAMA_ARG_* name, else Ollama's OLLAMA_* where one maps (listed
below). The command line wins; an empty variable counts as unset; a bad value stops serve with one line."""


def epilog() -> str:
    """The LLAMA_ARG_* and OLLAMA_* variables each flag reads, after its QWEN35_ one."""
    notes = {"OLLAMA_HOST": " (no port: 11434)", "OLLAMA_CONTEXT_LENGTH": " (per request: times -np)",
             "LLAMA_ARG_MMPROJ_AUTO": "=0", "LLAMA_ARG_UI": "=0", "LLAMA_ARG_MMAP": "=0"}
    lines = ["environment variables, after QWEN35_<LONG FLAG> (the command line wins over all):"]
    for flag in FLAGS:
        names = [name + notes.get(name, "") for name, _ in variables_for(flag.dest)[1:]]
        if names:
            lines.append(f"  {flag.spellings[0]:<22} {', '.join(names)}")
    return "\n".join(lines)
