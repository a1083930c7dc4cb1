"""Speculative decoding (engine/speculative.py): the same tokens as plain decoding, whatever the guesses.

References: transformers' greedy continuations of the HF checkpoint and llama.cpp's exact-arithmetic greedy
continuations of the GGUF files (ref/*.json). A random network's MTP layer guesses badly, so the accept
path is also driven by guessers that know the reference continuation (a draft model that is the model
itself, and a scripted drafter with wrong guesses at chosen places): every kept guess, every rewind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import qwen35
from qwen35.engine.generate import generate_result, generation_steps, resolve_sampling
from qwen35.engine.speculative import Speculation
from qwen35.errors import Qwen35Error

TOKENS = 24
EVERY_GUESS = 0.0  # p_min: check every guess, however unsure the drafter is


@pytest.fixture(scope="module")
def models(fixtures):
    loaded = {}

    def load(name: str, precision: str = "fast"):
        if (name, precision) not in loaded:
            loaded[name, precision] = qwen35.load_model(fixtures / "tiny" / name, precision=precision)
        return loaded[name, precision]

    return load


def _reference(fixtures, model_name: str) -> dict:
    return json.loads((fixtures / "ref" / f"{model_name}.json").read_text())


def _run(model, prompt, speculation=None, tokens=TOKENS, **options):
    options.setdefault("temperature", 0)
    steps = list(generation_steps(model, prompt, resolve_sampling(model, tokens, ignore_eos=True, **options),
                                  prefill_chunk=64, speculation=speculation))
    return [s.token_id for s in steps if s.token_id is not None], steps[-1]


@dataclass(frozen=True)
class Scripted(Speculation):
    """Guesses the continuation `script` (token ids after the prompt), wrong where `wrong(index)` says."""

    script: tuple = ()
    prompt_length: int = 0
    wrong: object = None

    def drafter(self, model, cached_ids, state=None):
        return _ScriptedDrafter(self, len(cached_ids), model.config.vocab_size)


class _ScriptedDrafter:
    def __init__(self, settings: Scripted, fed: int, vocab: int):
        self.settings, self.fed, self.vocab = settings, fed, vocab

    def feed(self, token_ids, hidden):
        self.fed += len(token_ids)

    def skip(self, token_ids):
        self.fed += len(token_ids)

    def snapshot(self, copy=True):
        return self.fed  # all it knows: how far it has read

    @staticmethod
    def snapshot_bytes(state):
        return 0

    def propose(self, next_token, limit):
        index = self.fed - self.settings.prompt_length  # next_token is output token `index`
        guesses = list(self.settings.script[index + 1 : index + 1 + limit])
        return [(g + 1) % self.vocab if self.settings.wrong(index + 1 + i) else g for i, g in enumerate(guesses)]


@pytest.mark.parametrize("prompt_name", ["text", "chat_think"])
@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_mtp_speculation_of_the_hf_checkpoint_gives_transformers_greedy_tokens(fixtures, models, dense_sequences,
                                                                               prompt_name, precision):
    sequence = dense_sequences[prompt_name]
    model = models("dense-hf", precision)
    tokens, last = _run(model, sequence["ids"], Speculation(p_min=EVERY_GUESS))
    assert tokens == sequence["transformers_greedy"][:TOKENS]
    assert last.draft_tokens > 0  # guesses were checked (and, on a random MTP layer, mostly refused)


@pytest.mark.parametrize("file_name", ["dense-Q8_0", "moe-Q4_K_M"])
def test_mtp_speculation_of_gguf_files_gives_llama_cpp_exact_greedy_tokens(fixtures, models, file_name):
    model_name, quant = file_name.split("-", 1)
    reference = _reference(fixtures, model_name)
    expected = reference["llama_cpp"][quant]["text"]["exact_greedy"][:TOKENS]
    model = models(f"{file_name}.gguf", "reference")
    tokens, _ = _run(model, reference["sequences"]["text"]["ids"], Speculation(p_min=EVERY_GUESS))
    assert tokens == expected


def test_a_draft_model_that_guesses_right_has_every_guess_kept(fixtures, models, dense_sequences):
    """The model as its own draft model (loaded twice): every guess is the model's own choice."""
    sequence = dense_sequences["text"]
    model, draft = models("dense-hf", "fast"), qwen35.load_model(fixtures / "tiny" / "dense-hf")
    tokens, last = _run(model, sequence["ids"], Speculation(draft_model=draft, draft_max=4, p_min=EVERY_GUESS))
    assert tokens == sequence["transformers_greedy"][:TOKENS]
    # Each step feeds one token and up to 4 guesses (no more than the length leaves room for), all kept.
    left, guesses = TOKENS - 1, 0  # the first token comes from the prompt
    while left:
        step_guesses = min(4, left - 1)
        guesses, left = guesses + step_guesses, left - step_guesses - 1
    assert last.accepted_tokens == last.draft_tokens == guesses


@pytest.mark.parametrize("draft_max", [1, 3])
@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_wrong_guesses_are_rewound_without_a_trace(models, dense_sequences, draft_max, precision):
    """Guesses from transformers' continuation, every third one wrong: each step keeps the guesses up to the
    first wrong one and rewinds the rest, DeltaNet states and K/V alike; the tokens stay transformers'."""
    sequence = dense_sequences["text"]
    expected = sequence["transformers_greedy"][:TOKENS]
    model = models("dense-hf", precision)
    scripted = Scripted(draft_max=draft_max, script=tuple(expected), prompt_length=len(sequence["ids"]),
                        wrong=lambda index: index % 3 == 2)
    tokens, last = _run(model, sequence["ids"], scripted)
    assert tokens == expected
    assert 0 < last.accepted_tokens < last.draft_tokens


@pytest.mark.parametrize("file_name", ["dense-Q8_0.gguf", "moe-Q4_K_M.gguf"])
def test_fast_path_speculation_gives_the_tokens_of_plain_decoding_bit_for_bit(models, fixtures, file_name):
    """The fast path's plain decoding is pinned to llama.cpp elsewhere (test_generate.py); speculation must
    not move a single token of it, greedy or sampled (same seed: same random draws, position by position)."""
    model = models(file_name)
    reference = _reference(fixtures, file_name.split("-")[0])
    prompt = reference["sequences"]["chat_think"]["ids"]
    expected = reference["llama_cpp"]["Q8_0" if "Q8_0" in file_name else "Q4_K_M"]["chat_think"]["exact_greedy"]
    script = tuple(expected)
    scripted = Scripted(draft_max=3, script=script, prompt_length=len(prompt), wrong=lambda index: index % 4 == 3)
    sampled = dict(temperature=0.9, top_p=0.95, top_k=40, seed=11, repetition_penalty=1.1, presence_penalty=0.3)
    for options in (dict(temperature=0), sampled):
        plain, _ = _run(model, prompt, **options)
        for speculation in (Speculation(p_min=EVERY_GUESS), scripted):
            assert _run(model, prompt, speculation, **options)[0] == plain


def test_a_stop_token_or_the_length_inside_a_step_ends_the_reply_there(models, dense_sequences):
    sequence = dense_sequences["text"]
    expected = sequence["transformers_greedy"][:TOKENS]
    model = models("dense-hf", "fast")
    everything_right = Scripted(draft_max=4, script=tuple(expected), prompt_length=len(sequence["ids"]),
                                wrong=lambda index: False)
    stop = expected[7]
    params = resolve_sampling(model, TOKENS, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    steps = list(generation_steps(model, sequence["ids"], params, speculation=everything_right))
    assert [s.token_id for s in steps if s.token_id is not None] == expected[:7]
    assert (steps[-1].finish_reason, steps[-1].stop_reason) == ("stop", stop)
    for limit in (1, 2, 6, 9):  # at most `limit` tokens, whatever the step size
        result = generate_result(model, sequence["ids"], limit, temperature=0, ignore_eos=True,
                                 speculation=everything_right)
        assert result.token_ids == expected[:limit] and result.finish_reason == "length"


def test_unsure_guesses_are_not_checked(models, dense_sequences):
    """p_min 1: no guess is ever sure enough; the reply is plain decoding's."""
    sequence = dense_sequences["text"]
    tokens, last = _run(models("dense-hf", "fast"), sequence["ids"], Speculation(p_min=1.0))
    assert tokens == sequence["transformers_greedy"][:TOKENS]
    assert last.draft_tokens == 0


def test_speculation_continues_a_given_cache(models, dense_sequences):
    """A chat's next turn restores a cache holding the start of its prompt; the MTP layer starts there."""
    sequence = dense_sequences["text"]
    model = models("dense-hf", "fast")
    held = 100
    cache = model.make_cache(1)
    model.forward(torch.tensor([sequence["ids"][:held]]), cache)
    params = resolve_sampling(model, TOKENS, temperature=0, ignore_eos=True)
    steps = list(generation_steps(model, sequence["ids"], params, cache=cache, speculation=Speculation(p_min=0.0)))
    assert [s.token_id for s in steps] == sequence["transformers_greedy"][:TOKENS]
    assert steps[-1].cached_tokens == held


@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_rewound_cache_equals_a_cache_fed_only_the_kept_tokens(models, dense_sequences, precision):
    ids = dense_sequences["text"]["ids"][:40]
    model = models("dense-hf", precision)
    for keep in (1, 3, 5):
        plain = model.make_cache(1)
        model.forward(torch.tensor([ids[:30]]), plain)
        for token in ids[30 : 30 + keep]:
            model.forward(torch.tensor([[token]]), plain)
        rewound = model.make_cache(1)
        model.forward(torch.tensor([ids[:30]]), rewound)
        with torch.inference_mode():
            rewound.keep_steps()
            model.forward(torch.tensor([ids[30:35]]), rewound)
            rewound.rewind(5, keep)
        assert rewound.lengths.tolist() == plain.lengths.tolist() == [30 + keep]
        following = torch.tensor([ids[35:38]])
        after_rewind, after_plain = model.forward(following, rewound), model.forward(following, plain)
        if precision == "fast":  # its products give a row the same bits in a batch of any size
            assert torch.equal(after_rewind, after_plain)
        else:  # fp32 products of 5 rows and of 1 round differently
            torch.testing.assert_close(after_rewind, after_plain, rtol=0, atol=1e-4)


def test_bad_settings_and_bad_rewinds_are_clear_errors(models):
    model = models("dense-hf", "fast")
    for bad in (dict(draft_max=0), dict(draft_max=65), dict(draft_min=5, draft_max=3), dict(p_min=1.5)):
        with pytest.raises(Qwen35Error):
            Speculation(**bad)
    other_vocabulary = SimpleNamespace(config=SimpleNamespace(vocab_size=151936))
    with pytest.raises(Qwen35Error, match="vocabulary"):
        Speculation(draft_model=other_vocabulary).check(model)
    cache = model.make_cache(1)
    with pytest.raises(Qwen35Error, match="kept no steps"):
        cache.rewind(2, 1)
    with pytest.raises(Qwen35Error, match="cannot keep"):
        cache.rewind(2, 3)


@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_a_cut_output_head_gives_the_first_columns_of_the_whole_heads_logits(models, dense_sequences, precision):
    from qwen35.model.mtp import first_rows

    model = models("dense-Q8_0.gguf", precision)
    head = model.network.lm_head
    hidden = model.network.hidden_states(torch.tensor([dense_sequences["text"]["ids"][:20]]), model.make_cache(1))
    cut = first_rows(head, 1024)
    assert cut.out_features == 1024 and first_rows(head, 0) is head and first_rows(head, 10**6) is head
    whole = head(hidden)
    # The same rows' dot products: equal, to the fp32 rounding of a product cut into other tiles.
    torch.testing.assert_close(cut(hidden), whole[..., :1024], rtol=0, atol=1e-5)


def test_guessing_among_the_first_tokens_only_keeps_the_reply(models, fixtures, dense_sequences):
    """--draft-vocab: the guesser's head reads 1024 of the 4160 rows; the model still samples from all."""
    sequence = dense_sequences["text"]
    model = models("dense-hf", "fast")
    tokens, last = _run(model, sequence["ids"], Speculation(p_min=EVERY_GUESS, vocabulary=1024))
    assert tokens == sequence["transformers_greedy"][:TOKENS] and last.draft_tokens > 0
    draft = qwen35.load_model(fixtures / "tiny" / "dense-hf")
    tokens, last = _run(model, sequence["ids"], Speculation(draft_model=draft, p_min=EVERY_GUESS, vocabulary=1024))
    assert tokens == sequence["transformers_greedy"][:TOKENS]
    # The model drafting for itself guesses right wherever its choice lies in the first 1024 tokens.
    expected_right = sum(token < 1024 for token in sequence["transformers_greedy"][1:TOKENS])
    assert 0 < last.accepted_tokens <= expected_right
    with pytest.raises(Qwen35Error, match="--draft-vocab"):
        Speculation(vocabulary=-1)


@pytest.mark.parametrize("kind", ["mtp", "draft model"])
def test_a_drafter_restored_from_its_snapshot_guesses_as_one_that_read_everything(models, fixtures, dense_sequences,
                                                                                   kind):
    """A restored prefix brings its drafter's snapshot: from there the drafter goes on exactly as one that read
    the whole prompt (same K/V, same guesses), instead of starting without the prompt's context."""
    ids = dense_sequences["text"]["ids"][:60]
    model = models("dense-hf", "fast")
    draft = None if kind == "mtp" else qwen35.load_model(fixtures / "tiny" / "dense-hf", precision="reference")
    speculation = Speculation(draft_model=draft, draft_max=3, p_min=0.0)
    with torch.inference_mode():
        hidden = model.network.hidden_states(torch.tensor([ids]), model.make_cache(1))
        for copy in (True, False):
            whole = speculation.drafter(model, [])
            whole.feed(ids, hidden)
            whole.snapshot()  # a draft model reads what it was fed now, not at its first guess
            first = speculation.drafter(model, [])
            first.feed(ids[:40], hidden[:, :40])
            restored = speculation.drafter(model, ids[:40], state=first.snapshot(copy=copy))
            restored.feed(ids[40:], hidden[:, 40:])
            restored.snapshot()
            fresh = speculation.drafter(model, ids[:40])  # no snapshot: the MTP layer starts at token 40, blind
            fresh.feed(ids[40:], hidden[:, 40:])
            length = int(whole.cache.lengths[0])
            if kind == "mtp":
                assert int(fresh.cache.lengths[0]) < length
            else:  # a fresh draft model must read the whole prompt itself
                assert fresh.unfed == ids
            assert int(restored.cache.lengths[0]) == length
            for got, expected in zip(restored.cache.layers[-1].view(length), whole.cache.layers[-1].view(length)):
                # The MTP layer's K/V are the same bits; the draft model read 60 tokens at once or 40 + 20,
                # products of other row counts: fp32 rounding apart.
                torch.testing.assert_close(got, expected, rtol=0, atol=0 if kind == "mtp" else 1e-4)
            assert restored.propose(ids[0], 3) == whole.propose(ids[0], 3) != []


def test_the_mtp_layer_takes_memory_only_once_speculation_uses_it(fixtures):
    """Loading leaves the MTP layer's weights as views of the file (the planner does not count them by
    default either); the first MTP speculation gives them the fast kernels' form."""
    from qwen35.engine.speculative import mtp_predictor
    from qwen35.kernels.quant_linear import QuantExperts, QuantLinear

    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf")
    modules = [m for m in model.network.mtp_weights.values() if isinstance(m, (QuantLinear, QuantExperts))]
    assert modules and all(m.mode == "reference" and m.fast_weights is None for m in modules)
    assert model.network.layers[0].mlp.gates.fast_weights is not None  # the main model's are packed
    mtp_predictor(model)
    assert all(m.mode == "fast" for m in modules) and any(m.fast_weights is not None for m in modules)


def test_the_mtp_layer_keeps_its_kv_as_the_model_does(fixtures):
    """-ctk/-ctv reach the MTP layer's K/V too (as llama.cpp's MTP context takes the main context's types, and
    as the planner prices it), and speculation over such caches keeps plain decoding's tokens."""
    from qwen35.engine.quantized_kv import stored_cache_types
    from qwen35.engine.speculative import mtp_predictor

    model = qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf", cache_type_k="q8_0", cache_type_v="q4_0")
    assert stored_cache_types(mtp_predictor(model).make_cache().layers[0]) == ("q8_0", "q4_0")
    prompt = _reference(fixtures, "dense")["sequences"]["chat_think"]["ids"]
    plain, _ = _run(model, prompt)
    speculative, last = _run(model, prompt, Speculation(p_min=EVERY_GUESS))
    assert speculative == plain and last.draft_tokens > 0


@pytest.mark.parametrize("p_min", [0.0, 0.04])
def test_mtp_drafters_guessing_together_guess_as_each_alone(fixtures, models, p_min):
    """propose_together (a server's batch): each row's MTP layer pass on its own cache, one head pass for all
    rows a round; the guesses and each layer's cache are those of each drafter proposing alone, round after
    round, for rows of different limits (one of them guessing nothing)."""
    from qwen35.engine.speculative import MtpDrafter, mtp_predictor, propose_together

    model = models("dense-Q8_0.gguf")
    reference = _reference(fixtures, "dense")
    prompts = [reference["sequences"][name]["ids"][:n] for name, n in
               (("text", 20), ("chat_think", 25), ("chat_nothink", 14))]
    settings = Speculation(draft_max=3, p_min=p_min)

    def drafters():
        made = []
        for prompt in prompts:
            drafter = MtpDrafter(mtp_predictor(model), settings, 0)
            cache = model.make_cache(1)
            with torch.inference_mode():
                drafter.feed(prompt, model.network.hidden_states(torch.tensor([prompt]), cache))
            made.append(drafter)
        return made

    alone, together = drafters(), drafters()
    generator = torch.Generator().manual_seed(3)
    made, cut_short = 0, 0
    for step, limits in enumerate(([3, 2, 3], [1, 3, 0], [3, 3, 3])):
        tokens = [prompt[step] for prompt in prompts]
        with torch.inference_mode():
            expected = [drafter.propose(token, limit) for drafter, token, limit in zip(alone, tokens, limits)]
            got = propose_together(together, tokens, limits)
        assert got == expected, step
        assert [d.cache.lengths.tolist() for d in together] == [d.cache.lengths.tolist() for d in alone]
        made += sum(len(guesses) for guesses in expected)
        cut_short += sum(len(guesses) < limit for guesses, limit in zip(expected, limits))
        for pair in zip(alone, together):  # the model kept the token and one guess
            hidden = torch.randn(1, 2, model.config.hidden_size, generator=generator)
            for drafter in pair:
                drafter.feed([1, 2], hidden)
    assert made > 0 and (cut_short > 0) == (p_min > 0)  # guesses made; with p_min, some stopped by it
    for ours, theirs in zip(together, alone):
        length = int(theirs.cache.lengths[0])
        for got_kv, expected_kv in zip(ours.cache.layers[0].view(length), theirs.cache.layers[0].view(length)):
            assert torch.equal(got_kv, expected_kv)
