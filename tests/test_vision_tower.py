"""The vision tower and its weights vs transformers' Qwen3_5VisionModel; M-RoPE positions vs get_rope_index."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen35.errors import FormatError, Qwen35Error
from qwen35.formats import weights_hf, weights_mmproj
from qwen35.formats.gguf import GGUFModel
from qwen35.model import vision
from qwen35.model.multimodal import expand_placeholders, mrope_positions, prepare_prompt

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

IMAGE_PAD, VISION_START, VISION_END = 4108, 4105, 4106


@pytest.fixture(scope="module")
def hf_visual(fixtures):
    """transformers' own vision model holding the fixture checkpoint's model.visual.* weights, in fp32."""
    path = fixtures / "tiny" / "dense-hf"
    config = transformers.AutoConfig.from_pretrained(path)
    visual = modeling.Qwen3_5VisionModel._from_config(config.vision_config, dtype=torch.float32).eval()
    state = {k.removeprefix("model.visual."): v.float() for k, v in load_file(path / "model.safetensors").items()
             if k.startswith("model.visual.")}
    visual.load_state_dict(state)
    return visual


def reference_features(visual, pixel_values, grids):
    with torch.no_grad():
        return visual(pixel_values, grid_thw=torch.tensor(grids)).pooler_output


def test_mmproj_weights_equal_the_checkpoint(fixtures):
    """The converter's mmproj holds the HF tensors, renamed and the Conv3d split (bf16 values, exact in F32)."""
    checkpoint = weights_hf.HFCheckpoint(fixtures / "tiny" / "dense-hf")
    from_hf, _ = weights_mmproj.load_vision_hf(checkpoint, torch.float32)
    from_gguf, settings, gguf = weights_mmproj.load_vision_gguf(fixtures / "tiny" / "dense-mmproj-F32.gguf")
    # GGUF keeps eps as float32 (1e-6 rounded); every other number is the same.
    assert abs(from_gguf.config.layer_norm_eps - 1e-6) < 1e-12
    assert dataclasses.replace(from_gguf.config, layer_norm_eps=1e-6) == from_hf.config
    hf_modules = dict(from_hf.weight_modules.items())
    for name, module in from_gguf.weight_modules.items():
        assert torch.equal(module.dequantized(), hf_modules[name].dequantized()), name
    for ours, theirs in zip(from_gguf.dense_tensors(), from_hf.dense_tensors()):
        assert torch.equal(ours, theirs)
    assert settings.image_mean == (0.5, 0.5, 0.5) and settings.patch_size == 16
    gguf.close()


@pytest.mark.parametrize("source", ["hf", "mmproj"])
def test_tower_matches_transformers_on_the_fixture_image(fixtures, hf_visual, source):
    pixel_values = torch.from_numpy(np.load(fixtures / "ref" / "dense.vision.pixel_values.npy"))
    grid = json.loads((fixtures / "ref" / "dense.vision.json").read_text())["image_grid_thw"]
    if source == "hf":
        tower, _ = weights_mmproj.load_vision_hf(weights_hf.HFCheckpoint(fixtures / "tiny" / "dense-hf"), torch.float32)
    else:
        tower, _, _ = weights_mmproj.load_vision_gguf(fixtures / "tiny" / "dense-mmproj-F32.gguf")
    features = tower(pixel_values, [tuple(g) for g in grid])
    expected = reference_features(hf_visual, pixel_values, grid)
    assert features.shape == expected.shape == (70, 256)
    assert (features - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("slab_rows", [4096, 50])
def test_several_images_of_different_sizes_attend_apart(fixtures, hf_visual, monkeypatch, slab_rows):
    """Grids other than the fixture's (pos-embedding resize both ways, 1-block sides), per-image
    attention, and the MLP run in slabs of rows that cut across images."""
    monkeypatch.setattr(vision, "MLP_SLAB_ROWS", slab_rows)
    tower, _ = weights_mmproj.load_vision_hf(weights_hf.HFCheckpoint(fixtures / "tiny" / "dense-hf"), torch.float32)
    grids = [(1, 4, 6), (1, 2, 2), (1, 10, 2), (1, 16, 12)]
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), 1536, generator=torch.Generator().manual_seed(0))
    features = tower(pixel_values, grids)
    expected = reference_features(hf_visual, pixel_values, grids)
    assert (features - expected).abs().max() <= 1e-5
    alone = tower(pixel_values[:24], grids[:1])
    assert (alone - features[:6]).abs().max() <= 1e-5


def test_tower_refuses_bad_inputs(fixtures):
    tower, _, _ = weights_mmproj.load_vision_gguf(fixtures / "tiny" / "dense-mmproj-F32.gguf")
    with pytest.raises(Qwen35Error, match="pixel values"):
        tower(torch.zeros(10, 1536), [(1, 4, 4)])
    with pytest.raises(Qwen35Error, match="merge blocks"):
        tower(torch.zeros(15, 1536), [(1, 3, 5)])


def test_text_gguf_is_not_a_projector(fixtures):
    with pytest.raises(FormatError, match="not a vision projector"):
        weights_mmproj.load_vision_gguf(fixtures / "tiny" / "dense-Q8_0.gguf")
    with GGUFModel(fixtures / "tiny" / "dense-mmproj-F32.gguf") as gguf:
        metadata = {**gguf.metadata, "clip.projector_type": "mlp"}
        with pytest.raises(FormatError, match="projector type"):
            weights_mmproj.vision_config_from_gguf(metadata, gguf.tensors, "test")
        metadata = {**gguf.metadata, "clip.vision.block_count": 10**9}
        with pytest.raises(FormatError, match="cannot fit"):
            weights_mmproj.vision_config_from_gguf(metadata, gguf.tensors, "test")


def _rope_index_reference(ids, grids):
    """transformers' Qwen3_5Model.get_rope_index on a small model (merge size 2)."""
    config = transformers.Qwen3_5Config(
        text_config=dict(vocab_size=4160, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=32, layer_types=["full_attention"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=16),
        image_token_id=IMAGE_PAD,
    )
    model = modeling.Qwen3_5Model(config)
    input_ids = torch.tensor([ids])
    positions, deltas = model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == IMAGE_PAD).int(), image_grid_thw=torch.tensor(grids)
    )
    return positions[:, 0], int(deltas[0, 0])


def test_positions_equal_get_rope_index_with_several_images():
    grids = [(1, 4, 6), (1, 10, 2), (1, 2, 2)]
    template_ids = [1, 2, VISION_START, IMAGE_PAD, VISION_END, 3, VISION_START, IMAGE_PAD, VISION_END,
                    VISION_START, IMAGE_PAD, VISION_END, 4, 5, 6]
    counts = [t * h * w // 4 for t, h, w in grids]
    ids = expand_placeholders(template_ids, IMAGE_PAD, counts)
    assert len(ids) == len(template_ids) + sum(counts) - 3
    expected, delta = _rope_index_reference(ids, grids)
    merged = [(t, h // 2, w // 2) for t, h, w in grids]
    positions = mrope_positions(ids, IMAGE_PAD, merged)
    assert torch.equal(positions, expected)
    # transformers decodes token n at position n + delta: the next position after the prompt.
    prompt = prepare_prompt(template_ids, [torch.zeros(c, 8) for c in counts], grids, IMAGE_PAD, 2)
    assert prompt.cache_key[:3] == ids[:3] and len(set(k for k in prompt.cache_key if k < 0)) == 3
    assert prompt.token_ids == ids and torch.equal(prompt.positions, expected)
    assert prompt.next_position == len(ids) + delta


def test_placeholders_that_do_not_fit_are_refused():
    with pytest.raises(Qwen35Error, match="placeholder"):
        expand_placeholders([1, IMAGE_PAD, 2], IMAGE_PAD, [4, 4])
    with pytest.raises(Qwen35Error, match="fits neither"):
        expand_placeholders([1, IMAGE_PAD, IMAGE_PAD, 2], IMAGE_PAD, [4])
    assert expand_placeholders([1, IMAGE_PAD, 2], IMAGE_PAD, [3]) == [1, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, 2]
    assert expand_placeholders([IMAGE_PAD] * 3, IMAGE_PAD, [3]) == [IMAGE_PAD] * 3


def test_bad_mmproj_metadata_is_a_format_error(fixtures):
    with GGUFModel(fixtures / "tiny" / "dense-mmproj-F32.gguf") as gguf:
        for key, value in [("clip.vision.block_count", "two"), ("clip.vision.embedding_length", None),
                           ("clip.vision.attention.head_count", 3)]:
            with pytest.raises(FormatError):
                weights_mmproj.vision_config_from_gguf({**gguf.metadata, key: value}, gguf.tensors, "test")
