"""Image prompts end to end: our logits and greedy continuations vs transformers' fixture outputs.

- The HF checkpoint (bf16, with its vision tower) in reference precision is the same
  network transformers ran in fp32: logits within 2e-3, the same greedy tokens.
- GGUF text models with the F32 mmproj: the vision tower is exact (tests/test_vision_tower.py);
  the text model's weights are quantized, so the logits carry that quantization's error.
  The bounds are llama.cpp's own figures for the same files on text prompts (fixtures'
  <name>.json: Q8_0 vs transformers mean KL 0.005, top-1 0.91; MoE Q4_K_M mean KL
  0.54-0.60, top-1 0.31-0.36), and greedy agreement only as far as Q8_0 keeps it.
"""

import json

import numpy as np
import pytest
import torch

import qwen35
from qwen35.errors import Qwen35Error

HF_TOLERANCE = 2e-3


def mean_kl(reference: np.ndarray, ours: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(reference).double(), dim=-1)
    q = torch.log_softmax(torch.from_numpy(ours).double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def load_case(fixtures, name):
    reference = json.loads((fixtures / "ref" / f"{name}.vision.json").read_text())
    logits = np.load(fixtures / "ref" / f"{name}.vision.transformers.logits.npy")
    return reference, logits, fixtures / "ref" / f"{name}.vision.image.png"


def template_ids(ids, image_token_id):
    """The ids as the chat template writes them: one placeholder per image."""
    first = ids.index(image_token_id)
    last = len(ids) - ids[::-1].index(image_token_id)
    return ids[: first + 1] + ids[last:]


@pytest.fixture(scope="module")
def hf_model(fixtures):
    return qwen35.load_model(fixtures / "tiny" / "dense-hf", precision="reference")


def test_hf_checkpoint_logits_match_transformers(fixtures, hf_model):
    reference, expected, image = load_case(fixtures, "dense")
    assert hf_model.vision is not None and hf_model.image_token_id == 4108
    prompt = hf_model.prepare_prompt(template_ids(reference["ids"], 4108), [image])
    assert prompt.token_ids == reference["ids"]
    assert prompt.image_grids == [tuple(g) for g in reference["image_grid_thw"]]
    cache = hf_model.make_cache(1)
    logits = hf_model.forward_prompt(prompt, cache)[0].numpy()
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= HF_TOLERANCE
    # Text after the image continues from the image's advanced position, not the token count.
    assert int(cache.next_positions[0]) == prompt.next_position < len(prompt)


def test_hf_checkpoint_greedy_continuation_matches_transformers(fixtures, hf_model):
    reference, _, image = load_case(fixtures, "dense")
    expected = reference["transformers_greedy"]
    # A prefill chunk of 29 tokens cuts through the image's 70 placeholders.
    for chunk, count in ((512, len(expected)), (29, 6)):
        tokens = hf_model.generate(template_ids(reference["ids"], 4108), max_new_tokens=count,
                                   images=[image], temperature=0, ignore_eos=True, prefill_chunk=chunk)
        assert tokens == expected[:count]


def _gguf_case(fixtures, name, text_file):
    reference, expected, image = load_case(fixtures, name)
    model = qwen35.load_model(fixtures / "tiny" / text_file, mmproj=fixtures / "tiny" / f"{name}-mmproj-F32.gguf")
    prompt = model.prepare_prompt(reference["ids"], [image])
    assert prompt.token_ids == reference["ids"]
    logits = model.forward_prompt(prompt, model.make_cache(1))[0].numpy()
    top1 = float((logits.argmax(-1) == expected.argmax(-1)).mean())
    return model, reference, image, logits, expected, top1


def test_dense_q8_0_with_mmproj_agrees_with_transformers(fixtures):
    model, reference, image, logits, expected, top1 = _gguf_case(fixtures, "dense", "dense-Q8_0.gguf")
    assert mean_kl(expected, logits) <= 0.01
    assert top1 >= 0.85
    # The first choice is a near-tie (0.13 apart in exact arithmetic): the fast path's 8-bit
    # activations may flip it, as llama.cpp's would. The exact arithmetic of the same file must not.
    exact = qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf", precision="reference",
                              mmproj=fixtures / "tiny" / "dense-mmproj-F32.gguf")
    tokens = exact.generate(reference["ids"], max_new_tokens=8, images=[image], temperature=0, ignore_eos=True)
    # Q8_0's rounding lets greedy paths part after a few tokens (llama.cpp's own Q8_0 keeps 6-12).
    assert tokens[:4] == reference["transformers_greedy"][:4]


def test_moe_q4_k_m_with_mmproj_agrees_as_far_as_q4_allows(fixtures):
    _, _, _, logits, expected, top1 = _gguf_case(fixtures, "moe", "moe-Q4_K_M.gguf")
    # A wrong image (features zeroed or out of order) gives a mean KL near 3 here.
    assert mean_kl(expected, logits) <= 0.6
    assert top1 >= 0.2


def test_images_without_a_vision_tower_or_placeholder_are_refused(fixtures, hf_model):
    reference, _, image = load_case(fixtures, "dense")
    text_only = qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf")
    with pytest.raises(Qwen35Error, match="no vision tower"):
        text_only.prepare_prompt(reference["ids"], [image])
    with pytest.raises(Qwen35Error, match="placeholder"):
        hf_model.prepare_prompt([1, 2, 3], [image])
    with pytest.raises(Qwen35Error, match="placeholder"):
        hf_model.prepare_prompt(template_ids(reference["ids"], 4108), [image, image])
    with pytest.raises(Qwen35Error, match="not an image"):
        hf_model.generate(template_ids(reference["ids"], 4108), max_new_tokens=2, images=[b"not a picture"])
    with pytest.raises(Qwen35Error, match="placeholder"):
        hf_model.prepare_prompt(reference["ids"], [])


def test_cache_keys_tell_images_apart(fixtures, hf_model):
    reference, _, image = load_case(fixtures, "dense")
    ids = template_ids(reference["ids"], 4108)
    other = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    first, again, different = (hf_model.prepare_prompt(ids, [i]) for i in (image, image.read_bytes(), other))
    assert first.cache_key == again.cache_key
    assert first.cache_key != different.cache_key
    is_image = [t == 4108 for t in first.token_ids]
    for key, token, image_token in zip(first.cache_key, first.token_ids, is_image):
        assert (key < 0) if image_token else (key == token)


def test_chat_template_prompt_expands_to_the_processor_ids(fixtures, hf_model):
    from qwen35.chat.tokenizer import load_tokenizer

    reference, _, image = load_case(fixtures, "dense")
    tokenizer = load_tokenizer(fixtures / "tiny" / "dense-hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
    text = tokenizer.apply_chat_template(messages, enable_thinking=False)
    assert tokenizer.image_pad_id == hf_model.image_token_id
    assert hf_model.prepare_prompt(tokenizer.encode(text), [image]).token_ids == reference["ids"]


def test_image_prompt_continuing_a_cached_prefix(fixtures, hf_model):
    """A later turn's image: the prefix is in the cache, the rest is prepared from its next position."""
    reference, expected, image = load_case(fixtures, "dense")
    ids = reference["ids"]
    split = ids.index(4105)  # <|vision_start|>
    cache = hf_model.make_cache(1)
    hf_model.forward(torch.tensor([ids[:split]]), cache)
    rest = hf_model.prepare_prompt(ids[split:], [image], start_position=int(cache.next_positions[0]))
    logits = hf_model.forward_prompt(rest, cache)[0].numpy()
    assert np.abs(logits - expected[split:]).max() <= HF_TOLERANCE
