"""HF checkpoints in reference precision vs transformers (the reference implementation) itself."""

import json

import numpy as np
import pytest
import torch

import qwen35

transformers = pytest.importorskip("transformers")

TOLERANCE = 2e-3
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True}
TEXT = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=24, rope_parameters=ROPE, tie_word_embeddings=False,
)
MOE = dict(moe_intermediate_size=48, shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=3)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
              num_position_embeddings=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)


def randomize(model, seed=0):
    """Every weight random (norms too, so a missing +1 or sign shows), the router sharpened."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 if name.endswith("mlp.gate.weight") else 0.1 if parameter.dim() == 1 else 0.08
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def save_and_compare(model, tmp_path, dtype, token_ids, tied=False):
    model = randomize(model).to(dtype)
    if tied:
        model.tie_weights()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    # transformers on the saved checkpoint in fp32 (a fresh load: `.to(dtype)` also rounds RoPE buffers).
    reference = type(model).from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0].numpy()
    ours = qwen35.load_model(tmp_path, precision="reference")
    logits = ours.logits(token_ids)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() <= TOLERANCE
    return ours


def test_fixture_checkpoint_matches_transformers_logits(fixtures):
    model = qwen35.load_model(fixtures / "tiny" / "dense-hf", precision="reference")
    sequences = json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]
    for prompt in ("text", "chat_think"):
        expected = np.load(fixtures / "ref" / f"dense.{prompt}.transformers.logits.npy")
        logits = model.logits(sequences[prompt]["ids"])
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= TOLERANCE, prompt
    assert model.network.mtp_weights, "the checkpoint's mtp.* weights are loaded"
    assert model.config.eos_token_ids == (4098,)


def test_moe_conditional_generation_layout_bf16(tmp_path):
    config = transformers.Qwen3_5MoeConfig(text_config={**TEXT, **MOE}, vision_config=VISION)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    ours = save_and_compare(model, tmp_path, torch.bfloat16, list(range(3, 140)))
    assert ours.config.is_moe and ours.config.num_experts == 8


def test_moe_causal_lm_layout_f32(tmp_path):
    model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**TEXT, **MOE))
    save_and_compare(model, tmp_path, torch.float32, [5, 9, 300, 2, 77, 1, 64, 65] * 9)


def test_dense_causal_lm_tied_embeddings_f16(tmp_path):
    config = transformers.Qwen3_5TextConfig(**{**TEXT, "tie_word_embeddings": True}, intermediate_size=96)
    model = transformers.Qwen3_5ForCausalLM(config)
    ours = save_and_compare(model, tmp_path, torch.float16, list(range(100, 170)), tied=True)
    assert ours.config.tie_word_embeddings
    assert ours.network.lm_head is ours.network.embed_tokens


def test_moe_fused_expert_tensors(tmp_path):
    """Checkpoints holding transformers' in-memory layout: fused experts.gate_up_proj / down_proj."""
    from safetensors.torch import save_file

    model = randomize(transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**TEXT, **MOE)))
    model.save_pretrained(tmp_path)
    for shard in tmp_path.glob("*.safetensors"):
        shard.unlink()
    (tmp_path / "model.safetensors.index.json").unlink(missing_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    token_ids = list(range(7, 90))
    with torch.no_grad():
        expected = model.eval()(torch.tensor([token_ids])).logits[0].numpy()
    logits = qwen35.load_model(tmp_path, precision="reference").logits(token_ids)
    assert np.abs(logits - expected).max() <= TOLERANCE


def test_mrope_positions_match_transformers(tmp_path):
    """Explicit [3, B, T] positions (as images will give) rotate exactly as transformers' interleaved M-RoPE."""
    rope = {**ROPE, "mrope_section": [1, 2, 1]}  # 4 frequencies from streams T, H, W, T
    config = transformers.Qwen3_5TextConfig(**{**TEXT, "rope_parameters": rope}, intermediate_size=96)
    model = randomize(transformers.Qwen3_5ForCausalLM(config)).eval()
    model.save_pretrained(tmp_path)
    token_ids = list(range(20, 60))
    steps = torch.arange(len(token_ids))
    positions = torch.stack([steps, steps // 5 * 3, steps % 7 * 2])[:, None, :]  # three different streams
    with torch.no_grad():
        expected = model(torch.tensor([token_ids]), position_ids=positions).logits[0].numpy()
        plain = model(torch.tensor([token_ids])).logits[0].numpy()
    ours = qwen35.load_model(tmp_path, precision="reference")
    cache = ours.make_cache(1)
    logits = ours.forward(torch.tensor([token_ids]), cache, positions=positions)[0].numpy()
    assert np.abs(expected - plain).max() > 1e-2, "the streams must matter for this test to mean anything"
    assert np.abs(logits - expected).max() <= TOLERANCE
    assert int(cache.next_positions[0]) == int(positions.max()) + 1


def test_greedy_generation_matches_transformers(fixtures):
    """Model.generate (over the engine's loop and our decode path) vs transformers' greedy continuation."""
    model = qwen35.load_model(fixtures / "tiny" / "dense-hf", precision="reference")
    sequence = json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]["chat_think"]
    expected = sequence["transformers_greedy"]
    assert model.generate(sequence["ids"], len(expected), temperature=0) == expected
    assert list(model.stream_generate(sequence["ids"], 5, temperature=0)) == expected[:5]


def test_fast_precision_keeps_checkpoint_dtype_close_to_transformers(fixtures):
    """Fast precision keeps bf16 weights in memory and multiplies them with fp32 activations
    into fp32 outputs: judged by llama.cpp's own BF16 distance from transformers on the
    same prompt, which it must not exceed."""
    from qwen35.kernels.quant_linear import QuantLinear

    fast = qwen35.load_model(fixtures / "tiny" / "dense-hf")  # precision="fast" is the default
    assert {m.type_name for m in fast.network.modules() if isinstance(m, QuantLinear)} == {"BF16"}
    reference = json.loads((fixtures / "ref" / "dense.json").read_text())
    ids = reference["sequences"]["chat_think"]["ids"]
    expected = np.load(fixtures / "ref" / "dense.chat_think.transformers.logits.npy").astype(np.float64)
    ours = fast.logits(ids).astype(np.float64)
    p_log = expected - np.logaddexp.reduce(expected, axis=-1, keepdims=True)
    q_log = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())
    llama = reference["llama_cpp"]["BF16"]["chat_think"]["vs_transformers"]
    assert kl <= llama["mean_kl"], f"mean KL {kl:.6f}, llama.cpp BF16 {llama['mean_kl']:.6f}"
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= llama["top1"] - 1e-9
