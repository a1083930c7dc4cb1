"""Every fixture GGUF in reference precision vs llama.cpp's F32 run on its exactly dequantized weights."""

import json

import numpy as np
import pytest

import qwen35

GGUF_FIXTURES = [
    ("dense", "Q8_0"), ("dense", "Q4_K_M"), ("dense", "Q3_K_M"), ("dense", "Q2_K"),
    ("dense", "IQ4_XS"), ("dense", "Q4_0"), ("moe", "Q4_K_M"),
]


@pytest.mark.parametrize("name,quant", GGUF_FIXTURES, ids=[f"{n}-{q}" for n, q in GGUF_FIXTURES])
def test_reference_logits_match_llamacpp_exact(fixtures, name, quant):
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-{quant}.gguf", precision="reference")
    sequences = json.loads((fixtures / "ref" / f"{name}.json").read_text())["sequences"]
    for prompt in ("text", "chat_think"):
        expected = np.load(fixtures / "ref" / f"{name}.{prompt}.exact-{quant}.logits.npy").astype(np.float32)
        logits = model.logits(sequences[prompt]["ids"])
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-2, prompt
        # Random tiny networks have near-ties, so allow a rare top-1 flip.
        assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.98, prompt


def test_gguf_config_from_metadata(fixtures):
    dense = qwen35.load_model(fixtures / "tiny" / "dense-Q4_K_M.gguf")
    config = dense.config
    # The fixture README's table: 8 layers (6 linear / 2 full), hidden 256, heads 4/2 of 64,
    # DeltaNet 2/4 heads of 64, MLP 512, untied output, 1 MTP layer, vocab padded to 4160.
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (8, 256, 4160)
    assert config.layer_types.count("full_attention") == 2 and config.layer_types[3] == "full_attention"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 64)
    assert (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_value_head_dim) == (2, 4, 64)
    assert (config.intermediate_size, config.tie_word_embeddings, config.mtp_num_layers) == (512, False, 1)
    assert (config.rotary_dim, config.mrope_section) == (16, (3, 3, 2))
    assert config.value_head_order == "tiled"
    assert dense.network.mtp_weights, "the MTP block is loaded when present"
    moe = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf").config
    assert (moe.num_layers, moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 16, 4, 256)
    assert moe.shared_expert_intermediate_size == 256
