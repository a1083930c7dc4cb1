"""The sampler against transformers' logits processors and OpenAI's penalty formula."""

import dataclasses
import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen35.engine.sampler import (
    InvalidSamplingError,
    Sampler,
    SamplingParams,
    apply_penalties,
    sample,
    warp_logits,
)
from qwen35.errors import Qwen35Error


def transformers_warpers(params: SamplingParams) -> LogitsProcessorList:
    """transformers' warpers in the order its generate() applies them."""
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    return warpers


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * 3


WARPER_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=10),
    dict(temperature=1.3, top_k=1),
    dict(top_p=0.9),
    dict(temperature=0.5, top_p=0.5),
    dict(min_p=0.1),
    dict(temperature=0.8, top_k=40, top_p=0.95),
    dict(temperature=0.6, top_k=20, top_p=0.8, min_p=0.05),
    dict(temperature=2.0, top_p=0.3, min_p=0.2),
]


@pytest.mark.parametrize("options", WARPER_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_warp_matches_transformers_warpers(options):
    params = SamplingParams(**options)
    logits = random_logits(16, 300, seed=len(str(options)))
    ours = warp_logits(logits, [params] * len(logits))
    theirs = transformers_warpers(params)(torch.zeros(len(logits), 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept])


@pytest.mark.parametrize("scale", [0.05, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_nucleus_of_any_size_matches_transformers(scale, top_p):
    """From flat logits (a nucleus of most of the vocabulary) to peaked ones (a few tokens)."""
    params = [SamplingParams(top_p=top_p, temperature=0.8), SamplingParams(top_p=top_p, min_p=0.01),
              SamplingParams(top_k=300, top_p=top_p)]
    logits = random_logits(len(params), 3000, seed=int(scale * 100)) * scale
    ours = warp_logits(logits, params)
    for row, p in enumerate(params):
        theirs = transformers_warpers(p)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs)), p
        torch.testing.assert_close(ours[row][~torch.isinf(theirs)], theirs[~torch.isinf(theirs)])


def test_warp_applies_each_rows_own_params():
    cases = [SamplingParams(**options) for options in WARPER_CASES]
    logits = random_logits(len(cases), 257, seed=5)
    ours = warp_logits(logits, cases)
    for row, params in enumerate(cases):
        theirs = transformers_warpers(params)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(theirs)), params
        torch.testing.assert_close(ours[row][~torch.isinf(theirs)], theirs[~torch.isinf(theirs)])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    vocab = 64
    logits = random_logits(1, vocab, seed=11)
    prompt, output = [3, 7, 7, 12, 40], [12, 5, 63, 5]
    sampler = Sampler(SamplingParams(repetition_penalty=penalty), prompt)
    for token_id in output:
        sampler.record(token_id)
    ours = apply_penalties(logits, [sampler])
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def openai_penalised(logits: list[float], output: list[int], presence: float, frequency: float) -> list[float]:
    """OpenAI's documented formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = Counter(output)
    return [
        value - counts[token] * frequency - (1.0 if counts[token] > 0 else 0.0) * presence
        for token, value in enumerate(logits)
    ]


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.8), (1.5, -0.4), (-1.0, 2.0)])
def test_presence_and_frequency_penalties_follow_openai_formula(presence, frequency):
    logits = random_logits(1, 50, seed=3)
    prompt, output = [1, 2, 2, 9], [9, 4, 4, 4, 30, 9]
    sampler = Sampler(SamplingParams(presence_penalty=presence, frequency_penalty=frequency), prompt)
    for token_id in output:
        sampler.record(token_id)
    ours = apply_penalties(logits, [sampler])[0]
    expected = torch.tensor(openai_penalised(logits[0].tolist(), output, presence, frequency))
    torch.testing.assert_close(ours, expected)


def test_penalties_track_tokens_sampled_after_first_use():
    """The count tensors are built lazily; tokens recorded afterwards must still count."""
    logits = random_logits(1, 30, seed=8)
    params = SamplingParams(temperature=0, presence_penalty=0.3, frequency_penalty=0.2, repetition_penalty=1.2)
    sampler = Sampler(params, [1, 2])
    output = []
    for _ in range(6):
        output.append(int(sample(logits, [sampler])[0]))
    expected = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[1, 2] + output]), logits.clone())[0]
    expected = torch.tensor(openai_penalised(expected.tolist(), output, 0.3, 0.2))
    torch.testing.assert_close(apply_penalties(logits, [sampler])[0], expected)


def test_greedy_is_argmax_whatever_the_filters():
    logits = random_logits(6, 500, seed=2)
    samplers = [Sampler(SamplingParams(temperature=0, top_k=3, top_p=0.2, min_p=0.5, seed=s)) for s in range(6)]
    assert torch.equal(sample(logits, samplers), logits.argmax(dim=-1))


def draw(logits_row: torch.Tensor, params: SamplingParams, count: int) -> list[int]:
    sampler = Sampler(params)
    return [int(sample(logits_row.unsqueeze(0), [sampler])[0]) for _ in range(count)]


def test_same_seed_same_tokens_and_different_seed_different_tokens():
    logits = random_logits(1, 100, seed=4)[0] / 3
    params = SamplingParams(temperature=1.0, seed=1234)
    first = draw(logits, params, 40)
    assert draw(logits, params, 40) == first
    assert draw(logits, SamplingParams(temperature=1.0, seed=1235), 40) != first


def test_seeded_request_is_unaffected_by_its_batch_neighbours():
    logits = random_logits(3, 100, seed=6) / 3
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=77)
    alone = draw(logits[1], params, 30)
    neighbours = [Sampler(SamplingParams(temperature=1.2, seed=1)), Sampler(params), Sampler(SamplingParams(seed=2))]
    batched = [int(sample(logits, neighbours)[1]) for _ in range(30)]
    assert batched == alone


def test_draws_follow_the_filtered_distribution():
    """Frequencies over many seeded draws against transformers' filtered distribution."""
    params = SamplingParams(temperature=0.8, top_k=9, top_p=0.9, min_p=0.05, seed=2024)
    logits = random_logits(1, 16, seed=9) / 2
    expected = transformers_warpers(params)(torch.zeros(1, 1, dtype=torch.long), logits.clone()).softmax(-1)[0]
    draws = 12000
    counts = torch.bincount(torch.tensor(draw(logits[0], params, draws)), minlength=16).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, "a filtered-out token was drawn"
    expected_counts = expected[allowed].double() * draws
    chi_square = float(((counts[allowed] - expected_counts) ** 2 / expected_counts).sum())
    degrees = int(allowed.sum()) - 1
    # Far out in the tail of chi-square (mean = degrees, sd = sqrt(2 * degrees)).
    assert chi_square < degrees + 8 * math.sqrt(2 * degrees)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_sampling_on_cuda_is_reproducible():
    logits = random_logits(1, 1000, seed=12).cuda()
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=5)
    first = draw(logits[0], params, 20)
    assert draw(logits[0], params, 20) == first
    assert all(0 <= token < 1000 for token in first)


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_token_ids=[1, -4]), "stop_token_ids"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=[3]), "stop"),
    ],
)
def test_invalid_options_give_a_clear_error(options, field):
    with pytest.raises(InvalidSamplingError, match=field) as caught:
        SamplingParams(**options)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, Qwen35Error)


def test_options_are_normalised():
    params = SamplingParams(temperature=1, top_k=-1, stop="###", stop_token_ids=[5, 6])
    assert params.temperature == 1.0 and params.top_k == 0
    assert params.stop == ("###",) and params.stop_token_ids == (5, 6)
    assert not hasattr(params, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 2.0


def test_options_merge_over_model_defaults():
    defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": 4098, "do_sample": True}
    params = SamplingParams.from_options(defaults, top_p=0.5, seed=None, min_p=None)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 20, 0.5, 0.0)
    assert SamplingParams.from_options({"do_sample": False, "temperature": 0.6}).greedy
    assert SamplingParams.from_options(None, temperature=0).greedy
    with pytest.raises(InvalidSamplingError, match="unknown sampling option 'top_a'"):
        SamplingParams.from_options(defaults, top_a=3)


@pytest.mark.parametrize("options", [dict(top_k=3), dict(top_k=2, min_p=0.3)])
def test_ties_at_the_kth_logit_are_kept_like_transformers(options):
    """Logits on a coarse grid tie often; every token tied with the k-th stays in.
    (Not with top_p: which of several tied tokens a nucleus cut keeps is arbitrary.)"""
    params = SamplingParams(**options)
    logits = torch.round(random_logits(32, 40, seed=21)).clamp(-2, 2)
    ours = warp_logits(logits, [params] * len(logits))
    theirs = transformers_warpers(params)(torch.zeros(len(logits), 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert (~torch.isinf(theirs)).sum(-1).max() > params.top_k  # the case under test happened


def test_mixed_batch_of_filters_samples_only_allowed_tokens():
    """Rows with top-k, with top-p only, and unfiltered share one call; each row draws
    only tokens that transformers' warpers leave in."""
    params = [SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.5, seed=2), SamplingParams(min_p=0.2, seed=3),
              SamplingParams(seed=4), SamplingParams(temperature=0, top_k=2)]
    logits = random_logits(len(params), 64, seed=13)
    samplers = [Sampler(p) for p in params]
    allowed = [
        torch.isfinite(transformers_warpers(p)(torch.zeros(1, 1, dtype=torch.long), logits[row : row + 1].clone())[0])
        for row, p in enumerate(params[:-1])
    ]
    for _ in range(50):
        tokens = sample(logits, samplers)
        assert tokens[-1] == logits[-1].argmax()
        for row, p in enumerate(params[:-1]):
            assert allowed[row][tokens[row]], (p, int(tokens[row]))


def test_masked_logits_only_yield_allowed_tokens():
    """A grammar constraint leaves -inf on forbidden tokens, sometimes fewer than top_k."""
    logits = random_logits(3, 1000, seed=14)
    allowed = torch.zeros(3, 1000, dtype=torch.bool)
    allowed[0, [5, 17, 999]] = True
    allowed[1, 100:400] = True
    allowed[2, [42]] = True
    masked = logits.masked_fill(~allowed, -math.inf)
    params = [SamplingParams(top_k=20, top_p=0.9, seed=1), SamplingParams(top_k=50, min_p=0.01, seed=2),
              SamplingParams(top_k=20, repetition_penalty=1.2, presence_penalty=0.5, seed=3)]
    samplers = [Sampler(p, prompt_ids=[5, 42]) for p in params]
    for _ in range(30):
        tokens = sample(masked, samplers)
        assert allowed[torch.arange(3), tokens].all()
