"""What speculative decoding buys on this machine: the cost of checking k guesses, and the speed it gives.

A random-weights model (make_model.py) guesses nothing right, so acceptance cannot be measured here; what
can be is the price of each part, from which the speed at any acceptance rate follows:

- plain: one-token decode steps (tok/s), the baseline;
- check k: one step feeding the last token and k guesses (the products read each weight once for all of
  them; the MoE reads the experts each token picks), then rewinding, relative to a plain step;
- MTP guess: one pass of the MTP layer and the output head, per guess;
- all right: end-to-end decoding when every guess is right (a guesser that knows the greedy continuation),
  the upper bound;
- at acceptance a (each guess right with probability a, independently): tokens per step
  (1 - a^(k+1)) / (1 - a), over the step's measured time (check k + k MTP guesses).

    python benchmarks/speculative.py /work/bench-models/0.8b-L24-Q4_K_M.gguf -t 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import qwen35  # noqa: E402
from qwen35.engine.generate import generation_steps, resolve_sampling  # noqa: E402
from qwen35.engine.speculative import Speculation, mtp_predictor  # noqa: E402

ACCEPTANCE_RATES = (0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class KnowsTheAnswer(Speculation):
    """Guesses the greedy continuation `script` of a prompt of `prompt_length` tokens: every guess right."""

    script: tuple = ()
    prompt_length: int = 0

    def drafter(self, model, cached_ids, state=None):
        return _Knowing(self, len(cached_ids))


class _Knowing:
    def __init__(self, settings, fed):
        self.settings, self.fed = settings, fed

    def feed(self, token_ids, hidden):
        self.fed += len(token_ids)

    skip = feed

    def propose(self, next_token, limit):
        index = self.fed - self.settings.prompt_length
        return list(self.settings.script[index + 1: index + 1 + limit])


def _median_seconds(work, repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def decode_speed(model, prompt, tokens: int, speculation=None) -> float:
    """Decode tok/s of the model's greedy answer to `prompt` (`tokens` of it), plainly or speculating."""
    params = resolve_sampling(model, tokens, temperature=0, ignore_eos=True)
    last = list(generation_steps(model, prompt, params, speculation=speculation))[-1]
    return (last.generated_tokens - 1) / last.decode_seconds


@torch.inference_mode()
def _step_seconds(model, prompt, fed: int, repetitions: int, rows: int = 1) -> float:
    """One step feeding `fed` tokens (the last one and fed-1 guesses) to each of `rows` copies of the
    prompt's cache (a server's batch), with its logits."""
    from qwen35.engine.cache import HybridCache

    network = model.network
    cache = model.make_cache(1)
    network.hidden_states(torch.tensor([prompt]), cache)
    if rows > 1:
        cache = HybridCache.merge([cache.select([0]) for _ in range(rows)])
    ids = torch.tensor([prompt[:fed]] * rows)

    def step():  # rewound to before its first token: every repetition sees the same context
        cache.keep_steps()
        network.lm_head(network.hidden_states(ids, cache)).float()
        cache.rewind(fed, 0)

    step()
    return _median_seconds(step, repetitions)


@torch.inference_mode()
def _mtp_guess_seconds(model, prompt, repetitions: int, vocabulary: int = 0) -> float:
    predictor = mtp_predictor(model, vocabulary)
    cache = predictor.make_cache()
    hidden = model.network.hidden_states(torch.tensor([prompt]), model.make_cache(1))
    predictor(hidden[:, :-1], torch.tensor([prompt[1:]]), cache, logits=False)
    last, token = hidden[:, -1:], torch.tensor([[prompt[0]]])

    def guess():
        predictor(last, token, cache)
        cache.rewind(1, 0)

    guess()
    return _median_seconds(guess, repetitions)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("-n", "--n-gen", type=int, default=64, help="tokens decoded per speed measurement")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (random ids)")
    parser.add_argument("--draft-max", default="1,2,3,4", help="guesses a step to price (comma-separated)")
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument("--draft-vocab", type=int, default=0, help="the MTP guess reads the first N head rows (0: all)")
    parser.add_argument("--rows", type=int, default=1,
                        help="also price a server's batch of this many requests checking their guesses together")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = qwen35.load_model(str(args.model))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 100_000, (args.prompt,), generator=generator).tolist()
    draft_counts = [int(k) for k in args.draft_max.split(",")]

    plain_speed = decode_speed(model, prompt, args.n_gen)
    params = resolve_sampling(model, args.n_gen + max(draft_counts) + 1, temperature=0, ignore_eos=True)
    script = tuple(step.token_id for step in generation_steps(model, prompt, params))
    plain_step = _step_seconds(model, prompt, 1, args.repetitions)
    has_mtp = model.config.mtp_num_layers > 0
    guess = _mtp_guess_seconds(model, prompt, args.repetitions, args.draft_vocab) if has_mtp else None

    print(f"{args.model.name}, {torch.get_num_threads()} threads: plain decode {plain_speed:.1f} tok/s, "
          f"a one-token step {plain_step * 1e3:.1f} ms"
          + (f", an MTP guess {guess * 1e3:.1f} ms ({guess / plain_step:.2f} steps"
             + (f", head cut to {args.draft_vocab} rows" if args.draft_vocab else "") + ")" if guess else ""))
    rates = " | ".join(f"MTP at a={a}" for a in ACCEPTANCE_RATES)
    print(f"\n| guesses k | check k (x a step) | all right tok/s | {rates} |")
    print("|---|---|---|" + "---|" * len(ACCEPTANCE_RATES))
    for k in draft_counts:
        check = _step_seconds(model, prompt, k + 1, args.repetitions)
        knowing = KnowsTheAnswer(draft_max=k, p_min=0.0, script=script, prompt_length=len(prompt))
        all_right = decode_speed(model, prompt, args.n_gen, knowing)
        projected = []
        for a in ACCEPTANCE_RATES:
            if guess is None:
                projected.append("-")
                continue
            tokens = (1 - a ** (k + 1)) / (1 - a)
            projected.append(f"{tokens / (check + k * guess):.1f} ({tokens / (check + k * guess) / plain_speed:.2f}x)")
        print(f"| {k} | {check / plain_step:.2f} | {all_right:.1f} ({all_right / plain_speed:.2f}x) | "
              + " | ".join(projected) + " |")
    if args.rows > 1:
        _batch_table(model, prompt, args, draft_counts, guess)
    return 0


def _batch_table(model, prompt, args, draft_counts, guess) -> None:
    """`--rows` requests decoding together (engine/speculative_steps.py speculative_batch_step): a batch step
    of one token a row against one of k + 1 a row, the rows' k MTP guesses made together (propose_together:
    one head pass a round for all rows), and the batch's tok/s at acceptance a, from the measured prices."""
    rows = args.rows
    plain = _step_seconds(model, prompt, 1, args.repetitions, rows)
    print(f"\n{rows} rows: a plain batch step {plain * 1e3:.1f} ms ({rows / plain:.1f} tok/s)")
    rates = " | ".join(f"MTP at a={a}" for a in ACCEPTANCE_RATES)
    print(f"\n| guesses k | check k, {rows} rows (x a batch step) | {rows} rows' k guesses (x a batch step) | "
          f"all right tok/s | {rates} |")
    print("|---|---|---|---|" + "---|" * len(ACCEPTANCE_RATES))
    for k in draft_counts:
        check = _step_seconds(model, prompt, k + 1, args.repetitions, rows)
        drafting = _guesses_together_seconds(model, prompt, rows, k, args) if guess is not None else None
        all_right = rows * (k + 1) / check
        cells = ["-"] * len(ACCEPTANCE_RATES)
        if drafting is not None:
            speeds = [rows * (1 - a ** (k + 1)) / (1 - a) / (check + drafting) for a in ACCEPTANCE_RATES]
            cells = [f"{v:.1f} ({v * plain / rows:.2f}x)" for v in speeds]
        print(f"| {k} | {check / plain:.2f} | {drafting / plain if drafting is not None else float('nan'):.2f} | "
              f"{all_right:.1f} ({all_right * plain / rows:.2f}x) | " + " | ".join(cells) + " |")


@torch.inference_mode()
def _guesses_together_seconds(model, prompt, rows: int, k: int, args) -> float:
    """`rows` MTP drafters, each having read the prompt, making k guesses each together (median)."""
    from qwen35.engine.speculative import MtpDrafter, propose_together

    settings = Speculation(draft_max=k, p_min=0.0, vocabulary=args.draft_vocab)
    predictor = mtp_predictor(model, args.draft_vocab)
    hidden = model.network.hidden_states(torch.tensor([prompt]), model.make_cache(1))
    times = []
    for _ in range(args.repetitions + 1):
        drafters = [MtpDrafter(predictor, settings, 0) for _ in range(rows)]
        for drafter in drafters:
            drafter.feed(prompt, hidden)
        started = time.perf_counter()
        propose_together(drafters, [prompt[0]] * rows, [k] * rows)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


if __name__ == "__main__":
    sys.exit(main())
