"""`qwen35 bench --spec-type draft-mtp` / `-md MODEL`: decode with and without speculative decoding.

llama-bench's tg feeds random tokens, which no guesser can follow; this test lets the model write: a chat
prompt asking for ordinary prose (or `--spec-prompt FILE`), then -n tokens greedily, timed plainly and with
the asked speculation, each the median of -r repetitions after the warm-up. The two outputs are the same
tokens (speculative decoding does not change them; the result says so); what differs is the speed, and
how many guesses were kept, which is what real weights and real text decide.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from qwen35.errors import Qwen35Error

DEFAULT_PROMPT = ("Write a few paragraphs for a general audience about how a local language model turns a "
                  "question into an answer: the tokenizer, the layers, the cache and the sampling.")


def add_arguments(parser) -> None:
    parser.add_argument("--spec-prompt", default=None, dest="spec_prompt", metavar="FILE",
                        help="with --spec-type/-md: the request the model answers while timed (default: a "
                             "question asking for prose)")


def speculative_prompt(args, path: Path) -> list[int]:
    """The token ids of the chat prompt the speculative test decodes after."""
    from qwen35 import load_tokenizer

    text = DEFAULT_PROMPT
    if args.spec_prompt is not None:
        try:
            text = Path(args.spec_prompt).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise Qwen35Error(f"--spec-prompt {args.spec_prompt}: cannot read it ({error})") from None
    tokenizer = load_tokenizer(str(path))
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                          enable_thinking=False))


def _decode(model, prompt: list[int], tokens: int, speculation):
    from qwen35.engine.generate import generation_steps, resolve_sampling

    params = resolve_sampling(model, tokens, temperature=0, ignore_eos=True)
    steps = list(generation_steps(model, prompt, params, speculation=speculation))
    last = steps[-1]
    rate = (last.generated_tokens - 1) / last.decode_seconds if last.decode_seconds > 0 else 0.0
    return [step.token_id for step in steps], rate, last


def speculative_test(model, prompt: list[int], n_gen: int, speculation, repetitions: int, warm_up: bool,
                     progress) -> dict:
    """Plain and speculative decode speed of the same greedy answer, and the guesses checked and kept."""
    results = {}
    for label, setting in (("plain", None), (speculation.name, speculation)):
        rates = []
        for rep in range(repetitions + (1 if warm_up else 0)):
            progress.show(f"tg{n_gen} {label} {'warm-up' if warm_up and rep == 0 else 'rep'}")
            tokens, rate, last = _decode(model, prompt, n_gen, setting)
            if not (warm_up and rep == 0):
                rates.append(rate)
        results[label] = (tokens, statistics.median(rates), last)
    plain_tokens, plain_rate, _ = results["plain"]
    tokens, rate, last = results[speculation.name]
    return {
        "name": f"tg{n_gen} {speculation.name}",
        "n_gen": n_gen,
        "spec_type": speculation.name,
        "draft_max": speculation.draft_max,
        "draft_p_min": speculation.p_min,
        "draft_vocab": speculation.vocabulary,
        "prompt_tokens": len(prompt),
        "plain_tok_s": plain_rate,
        "tok_s": rate,
        "speedup": rate / plain_rate if plain_rate else None,
        "draft_tokens": last.draft_tokens,
        "accepted_tokens": last.accepted_tokens,
        "same_tokens": tokens == plain_tokens,
    }


def markdown_line(test: dict) -> str:
    kept = f"{test['accepted_tokens']}/{test['draft_tokens']} guesses kept" if test["draft_tokens"] else "no guesses"
    return (f"{test['name']} (greedy answer to a {test['prompt_tokens']}-token chat prompt): "
            f"{test['tok_s']:.2f} tok/s against {test['plain_tok_s']:.2f} plain ({test['speedup']:.2f}x), {kept}"
            + ("" if test["same_tokens"] else " -- THE TOKENS DIFFER FROM PLAIN DECODING"))
