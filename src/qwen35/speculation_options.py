"""The speculative-decoding flags that `run`, `serve` and `bench` share, with llama.cpp's spellings.

--spec-type draft-mtp (or --mtp) guesses with the model's own MTP layer; -md FILE with a draft model of
the family (a pulled name works too); --draft-max, --draft-min and --draft-p-min bound the guesses, and
--draft-vocab N makes each guess cheaper by reading only the first N rows of the guesser's output head.
The output is the same token for token; only the speed changes (engine/speculative.py).
"""

from __future__ import annotations

import json
import sys

from qwen35.errors import Qwen35Error

SPEC_TYPES = ("none", "draft-mtp", "mtp")
# llama.cpp's defaults (--spec-draft-n-max, --draft-p-min): the MTP layer guesses 3 tokens a step whatever
# their probability; a draft model up to 16 while its own probability stays at 0.75 or more.
MTP_DEFAULTS = (3, 0.0)
DRAFT_MODEL_DEFAULTS = (16, 0.75)


def add_speculation_arguments(parser) -> None:
    parser.add_argument("--spec-type", choices=SPEC_TYPES, default=None, dest="spec_type",
                        help="speculative decoding: draft-mtp (or mtp) guesses with the model's own MTP layer "
                             "(default: none, or draft with -md)")
    parser.add_argument("--mtp", action="store_const", const="draft-mtp", dest="spec_type",
                        help="the same as --spec-type draft-mtp")
    parser.add_argument("-md", "--model-draft", "--spec-draft-model", default=None, dest="draft_model",
                        metavar="MODEL", help="a draft model of the same family that guesses the next tokens")
    parser.add_argument("--draft-max", "--draft", "--spec-draft-n-max", type=int, default=None, dest="draft_max",
                        metavar="N", help=f"at most N guesses a step (default {MTP_DEFAULTS[0]} with the MTP layer, "
                                          f"{DRAFT_MODEL_DEFAULTS[0]} with a draft model)")
    parser.add_argument("--draft-min", "--spec-draft-n-min", type=int, default=0, dest="draft_min", metavar="N",
                        help="check guesses only when there are at least N (default 0)")
    parser.add_argument("--draft-p-min", type=float, default=None, dest="draft_p_min", metavar="P",
                        help="guess only while the drafter's probability is at least P (default "
                             f"{MTP_DEFAULTS[1]} with the MTP layer, {DRAFT_MODEL_DEFAULTS[1]} with a draft model)")
    parser.add_argument("--draft-vocab", type=int, default=0, dest="draft_vocab", metavar="N",
                        help="guess among the first N tokens only: a cheaper guess (default 0: all tokens)")
    parser.add_argument("--speculative-config", default=None, dest="speculative_config", metavar="JSON",
                        help="vLLM's spelling: '{\"method\": \"mtp\", \"num_speculative_tokens\": 2}'")


# vLLM's method names for Qwen 3.5's MTP layer (`--speculative-config`).
VLLM_MTP_METHODS = ("mtp", "qwen3_next_mtp", "qwen3_5_mtp", "qwen3_5_moe_mtp")


def _apply_vllm_config(args) -> None:
    """vLLM's --speculative-config as the llama.cpp flags: the MTP method, or a draft `model`;
    num_speculative_tokens guesses a step, each checked whatever its probability (vLLM has no p-min)."""
    try:
        config = json.loads(args.speculative_config)
    except json.JSONDecodeError as error:
        raise Qwen35Error(f"--speculative-config is not valid JSON: {error.msg}") from None
    if not isinstance(config, dict):
        raise Qwen35Error("--speculative-config must be a JSON object, like '{\"method\": \"mtp\", "
                          "\"num_speculative_tokens\": 2}'")
    method, model = config.get("method"), config.get("model")
    if method in VLLM_MTP_METHODS and model is None:
        args.spec_type = "draft-mtp"
    elif isinstance(model, str) and method in (None, "draft_model"):
        args.draft_model = model
    else:
        raise Qwen35Error(f"--speculative-config: method {method!r} is not supported here "
                          f"(use {', '.join(VLLM_MTP_METHODS)}, or a draft \"model\")")
    count = config.get("num_speculative_tokens", args.draft_max if args.draft_max is not None else MTP_DEFAULTS[0])
    if not isinstance(count, int) or isinstance(count, bool):
        raise Qwen35Error(f"--speculative-config: num_speculative_tokens must be a whole number, got {count!r}")
    args.draft_max, args.draft_p_min = count, 0.0
    args.speculative_config = None  # applied


def check_speculation_arguments(args) -> None:
    """Bad values fail before any model loads."""
    from qwen35.engine.speculative import Speculation

    if args.speculative_config is not None:
        if args.spec_type is not None or args.draft_model is not None:
            raise Qwen35Error("give --speculative-config or the --spec-type/-md flags, not both")
        _apply_vllm_config(args)
    if args.spec_type in ("draft-mtp", "mtp") and args.draft_model is not None:
        raise Qwen35Error("give one drafter: --spec-type draft-mtp (the model's MTP layer) or -md MODEL")
    Speculation(draft_model=args.draft_model, draft_max=args.draft_max, draft_min=args.draft_min, p_min=args.draft_p_min,
                vocabulary=args.draft_vocab)


def speculation_from_arguments(args, model, load_options: dict, command: str = "qwen35"):
    """The Speculation these flags ask for on `model` (None: plain decoding); a draft model is loaded with
    the same device options. Fails with one line where it cannot run (no MTP layer, another vocabulary)."""
    from qwen35.engine.speculative import Speculation

    check_speculation_arguments(args)
    draft = None
    if args.draft_model is not None:
        from qwen35 import load_model
        from qwen35.hub import resolve_model_argument
        from qwen35.progress import byte_progress

        resolved = resolve_model_argument(args.draft_model, command)
        with byte_progress(f"loading draft {resolved.path.name}") as progress:
            draft = load_model(str(resolved.path), progress=progress, **load_options)
    elif args.spec_type not in ("draft-mtp", "mtp"):
        return None
    speculation = Speculation(draft_model=draft, draft_max=args.draft_max, draft_min=args.draft_min,
                              p_min=args.draft_p_min, vocabulary=args.draft_vocab)
    speculation.check(model)
    if draft is None:
        print(f"{command}: speculative decoding with the model's MTP layer (up to {speculation.draft_max} guesses a step)",
              file=sys.stderr, flush=True)
    if model.device.type == "cuda":
        print(f"{command}: note: speculative decoding has not been timed on a GPU yet (guesses are made eagerly; "
              "`qwen35 bench --spec-type ...` compares it with plain decoding)", file=sys.stderr, flush=True)
    return speculation
