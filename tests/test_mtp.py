"""The MTP (multi-token prediction) layer, model/mtp.py, vs a reference built from transformers' own modules.

transformers 5.23 drops the `mtp.*` weights when it loads Qwen3_5ForConditionalGeneration, so the reference
here assembles the layer from transformers' classes for the text model (its zero-centred RMSNorm, its
decoder layer for full-attention layers, its text rotary embedding):

    x = fc(cat[RMSNorm_e(embed(token[i+1])), RMSNorm_h(h[i])]);  x = decoder layer(x) at positions i;
    logits = lm_head(RMSNorm_mtp(x))

The weights come from the checkpoint's safetensors (HF) or from gguf-py's own reader and reference
dequantizer (GGUF), never through our loaders.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import qwen35
from qwen35.errors import Qwen35Error
from qwen35.model.mtp import MultiTokenPredictor

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers.models.qwen3_5 import modeling_qwen3_5 as dense_modeling  # noqa: E402
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as moe_modeling  # noqa: E402

CLASS_PREFIX = {dense_modeling: "Qwen3_5", moe_modeling: "Qwen3_5Moe"}
# The limit the repo holds reference precision to against transformers' logits (tests/test_model_hf.py).
TOLERANCE = 2e-3
# Feeding the same pairs in other pieces only regroups fp32 sums.
PIECEWISE_TOLERANCE = 1e-4


class TransformersMTP(nn.Module):
    """The MTP layer made of transformers' modules for the Qwen 3.5 text model (dense or MoE form)."""

    def __init__(self, modeling, text_config, tensors: dict, embedding: torch.Tensor, output: torch.Tensor):
        """`modeling`: transformers' module for the model (qwen3_5 or qwen3_5_moe); `tensors`: the mtp.* weights
        under the checkpoint's names; `embedding`, `output`: the main model's token embedding and output head."""
        super().__init__()
        text_config._attn_implementation = "eager"  # a plain softmax(QK^T + mask) V; the mask is ours
        text_config._experts_implementation = "eager"  # MoE: the plain loop over the chosen experts
        hidden, eps = text_config.hidden_size, text_config.rms_norm_eps
        classes = {name: getattr(modeling, CLASS_PREFIX[modeling] + name)
                   for name in ("RMSNorm", "DecoderLayer", "TextRotaryEmbedding")}
        self.pre_fc_norm_embedding = classes["RMSNorm"](hidden, eps=eps)
        self.pre_fc_norm_hidden = classes["RMSNorm"](hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        # The decoder layer class takes its kind from layer_types[layer_idx]: any full-attention index will do.
        self.layer = classes["DecoderLayer"](text_config, text_config.layer_types.index("full_attention"))
        self.norm = classes["RMSNorm"](hidden, eps=eps)
        self.rotary = classes["TextRotaryEmbedding"](text_config)
        self.embed_tokens = nn.Embedding.from_pretrained(embedding.float())
        self.lm_head = nn.Linear(hidden, output.shape[0], bias=False)
        state = {name.removeprefix("mtp.").replace("layers.0.", "layer."): t.float() for name, t in tensors.items()}
        state["lm_head.weight"] = output.float()
        state["embed_tokens.weight"] = embedding.float()
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or [name for name in missing if not name.startswith("rotary.")]:
            raise AssertionError(f"reference weights do not fit: missing {missing}, unexpected {unexpected}")
        self.eval()

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, first_position: int = 0):
        """hidden [1, T, H] at positions first_position.., next_ids [1, T]: (logits, normed output, the
        layer's keys after k_norm and RoPE [1, T, n_kv, head_dim], as transformers' attention caches them)."""
        length = next_ids.shape[1]
        embedded = self.embed_tokens(next_ids)
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden.float())], dim=-1))
        positions = torch.arange(first_position, first_position + length)[None, None, :].expand(3, 1, length)
        position_embeddings = self.rotary(x, positions)
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        cache = transformers.DynamicCache()
        out = self.norm(self.layer(x, position_embeddings=position_embeddings, attention_mask=causal,
                                   past_key_values=cache))
        keys = cache.layers[self.layer.self_attn.layer_idx].keys.transpose(1, 2)
        return self.lm_head(out), out, keys


def ours(predictor: MultiTokenPredictor, hidden, next_ids, pieces=None, start_position: int = 0):
    """Our MTP layer's (logits, normed output, cache) for the pairs, fed to one new cache in `pieces` (sizes)."""
    cache = predictor.make_cache(start_position)
    pieces = pieces or [next_ids.shape[1]]
    logits, outs, start = [], [], 0
    with torch.inference_mode():
        for size in pieces:
            stop = start + size
            piece_logits, piece_out = predictor(hidden[:, start:stop], next_ids[:, start:stop], cache)
            logits.append(piece_logits)
            outs.append(piece_out)
            start = stop
    assert start == next_ids.shape[1], "the pieces must cover every pair"
    return torch.cat(logits, dim=1), torch.cat(outs, dim=1), cache


def our_hidden_states(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.network.hidden_states(torch.tensor([ids]), model.make_cache(1)).float()


def max_abs(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def top1_agreement(a, b) -> float:
    return float((torch.as_tensor(a).argmax(-1) == torch.as_tensor(b).argmax(-1)).float().mean())


# ---- the HF checkpoint -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_ids(dense_sequences) -> list[int]:
    return dense_sequences["text"]["ids"]


@pytest.fixture(scope="module")
def hf_model(dense_hf):
    return qwen35.load_model(dense_hf, precision="reference")


@pytest.fixture(scope="module")
def hf_reference(dense_hf, text_ids):
    """(transformers' MTP layer from the checkpoint's mtp.* tensors, transformers' final-normed hidden states
    of ids[:-1])."""
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(dense_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=torch.tensor([text_ids[:-1]])).last_hidden_state
    tensors = {name: t for name, t in safetensors_torch.load_file(dense_hf / "model.safetensors").items()
               if name.startswith("mtp.")}
    reference = TransformersMTP(dense_modeling, model.config.text_config, tensors,
                                model.model.language_model.embed_tokens.weight.detach(), model.lm_head.weight.detach())
    return reference, hidden


@pytest.fixture(scope="module")
def hf_pairs(hf_model, text_ids):
    """Our main model's hidden states of ids[:-1] and the next tokens ids[1:]."""
    return our_hidden_states(hf_model, text_ids[:-1]), torch.tensor([text_ids[1:]])


def test_hf_checkpoint_matches_transformers_modules(hf_model, hf_reference, hf_pairs):
    reference, reference_hidden = hf_reference
    hidden, next_ids = hf_pairs
    assert max_abs(hidden, reference_hidden) <= TOLERANCE, "the main model's hidden states (the MTP's input)"
    expected_logits, expected_out, _ = reference(reference_hidden, next_ids)
    logits, out, _ = ours(MultiTokenPredictor(hf_model.network), hidden, next_ids)
    assert logits.shape == expected_logits.shape == (1, next_ids.shape[1], hf_model.config.vocab_size)
    assert max_abs(logits, expected_logits) <= TOLERANCE
    assert max_abs(out, expected_out) <= TOLERANCE
    # The MTP layer guesses the token after next: it must not just echo the main model's next-token choice.
    main_logits = reference.lm_head(reference_hidden)
    assert top1_agreement(expected_logits, main_logits) < 0.9


def test_pairs_fed_in_pieces_equal_one_call(hf_model, hf_pairs):
    hidden, next_ids = hf_pairs
    predictor = MultiTokenPredictor(hf_model.network)
    whole_logits, whole_out, _ = ours(predictor, hidden, next_ids)
    pieces = [1, 7, next_ids.shape[1] - 13, 1, 1, 1, 1, 1]
    logits, out, _ = ours(predictor, hidden, next_ids, pieces)
    assert max_abs(logits, whole_logits) <= PIECEWISE_TOLERANCE
    assert max_abs(out, whole_out) <= PIECEWISE_TOLERANCE
    # A one-token step that forgot the cache (or its position) would be far off: the check can fail.
    cold_logits, *_ = ours(predictor, hidden[:, -1:], next_ids[:, -1:])
    assert max_abs(cold_logits, whole_logits[:, -1:]) > 100 * PIECEWISE_TOLERANCE


def test_start_position_offsets_the_positions(hf_model, hf_reference, hf_pairs):
    """A cache made to start at p puts its first pair at position p (the keys show it: RoPE is relative, so
    the logits of pairs attending only to each other cannot), and its logits are transformers' at p.."""
    reference, _ = hf_reference
    hidden, next_ids = hf_pairs
    predictor = MultiTokenPredictor(hf_model.network)
    first, length = 100, 40
    hidden, next_ids = hidden[:, first : first + length], next_ids[:, first : first + length]
    expected_logits, expected_out, expected_keys = reference(hidden, next_ids, first_position=first)
    logits, out, cache = ours(predictor, hidden, next_ids, pieces=[30, 1, 9], start_position=first)
    assert max_abs(logits, expected_logits) <= TOLERANCE
    assert max_abs(out, expected_out) <= TOLERANCE
    keys = cache.layers[0].keys[:, :length]
    assert max_abs(keys, expected_keys) <= TOLERANCE
    assert int(cache.next_positions[0]) == first + length
    # Keys at positions 0.. differ from these, so the comparison above pins the offset.
    *_, keys_at_zero = reference(hidden, next_ids, first_position=0)
    assert max_abs(keys_at_zero, expected_keys) > 100 * TOLERANCE


@pytest.mark.parametrize("missing", ["weights", "layers"])
def test_model_without_mtp_layer_is_a_clear_error(hf_model, missing):
    network = copy.copy(hf_model.network)  # the shared model stays whole
    if missing == "weights":  # as a file converted without the MTP block loads
        network.mtp_weights = {}
    else:  # a config that says there is none (nextn_predict_layers 0)
        network.config = dataclasses.replace(network.config, mtp_num_layers=0)
    with pytest.raises(Qwen35Error, match="no MTP layer"):
        MultiTokenPredictor(network)
    assert MultiTokenPredictor(hf_model.network).final_norm is not None, "the original still has its MTP layer"


# ---- GGUF files: the reference from gguf-py's reader and reference dequantizer -------------------

def dequantized_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF as fp32 in torch's layout (row width last), by gguf-py alone."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
            .float().reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def mtp_tensors_from_gguf(tensors: dict, block: int, moe: bool) -> dict[str, torch.Tensor]:
    """The MTP block under the checkpoint's names, with llama.cpp's converter undone: its norms hold 1 + w
    (transformers' RMSNorm keeps w); experts come stacked, gate and up apart. Full-attention Q/K rows are
    not permuted for this architecture (rotate-half RoPE), so they are taken as they are."""
    b = f"blk.{block}"
    layer = "mtp.layers.0"
    out = {
        "mtp.fc.weight": tensors[f"{b}.nextn.eh_proj.weight"],
        "mtp.pre_fc_norm_embedding.weight": tensors[f"{b}.nextn.enorm.weight"] - 1,
        "mtp.pre_fc_norm_hidden.weight": tensors[f"{b}.nextn.hnorm.weight"] - 1,
        "mtp.norm.weight": tensors[f"{b}.nextn.shared_head_norm.weight"] - 1,
        f"{layer}.input_layernorm.weight": tensors[f"{b}.attn_norm.weight"] - 1,
        f"{layer}.post_attention_layernorm.weight": tensors[f"{b}.post_attention_norm.weight"] - 1,
        f"{layer}.self_attn.q_proj.weight": tensors[f"{b}.attn_q.weight"],
        f"{layer}.self_attn.k_proj.weight": tensors[f"{b}.attn_k.weight"],
        f"{layer}.self_attn.v_proj.weight": tensors[f"{b}.attn_v.weight"],
        f"{layer}.self_attn.o_proj.weight": tensors[f"{b}.attn_output.weight"],
        f"{layer}.self_attn.q_norm.weight": tensors[f"{b}.attn_q_norm.weight"] - 1,
        f"{layer}.self_attn.k_norm.weight": tensors[f"{b}.attn_k_norm.weight"] - 1,
    }
    mlp = f"{layer}.mlp"
    if not moe:
        for ours_name, gguf_name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            out[f"{mlp}.{ours_name}.weight"] = tensors[f"{b}.{gguf_name}.weight"]
        return out
    out[f"{mlp}.gate.weight"] = tensors[f"{b}.ffn_gate_inp.weight"]
    out[f"{mlp}.experts.gate_up_proj"] = torch.cat([tensors[f"{b}.ffn_gate_exps.weight"],
                                                    tensors[f"{b}.ffn_up_exps.weight"]], dim=1)
    out[f"{mlp}.experts.down_proj"] = tensors[f"{b}.ffn_down_exps.weight"]
    for ours_name, gguf_name in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"),
                                 ("down_proj", "ffn_down_shexp")):
        out[f"{mlp}.shared_expert.{ours_name}.weight"] = tensors[f"{b}.{gguf_name}.weight"]
    out[f"{mlp}.shared_expert_gate.weight"] = tensors[f"{b}.ffn_gate_inp_shexp.weight"][None]
    return out


def gguf_text_config(path, moe: bool):
    """transformers' text config from the GGUF's metadata, read by gguf-py."""
    reader = gguf.GGUFReader(str(path))
    arch = "qwen35moe" if moe else "qwen35"

    def value(key):
        return reader.fields[f"{arch}.{key}"].contents()

    blocks, mtp_layers = value("block_count"), value("nextn_predict_layers")
    head_dim = value("attention.key_length")
    interval = value("full_attention_interval")
    layers = blocks - mtp_layers
    sections = value("rope.dimension_sections")[:3]
    common = dict(
        hidden_size=value("embedding_length"), num_hidden_layers=layers,
        num_attention_heads=value("attention.head_count"), num_key_value_heads=value("attention.head_count_kv"),
        head_dim=head_dim, rms_norm_eps=value("attention.layer_norm_rms_epsilon"),
        layer_types=["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)],
        rope_parameters={"rope_type": "default", "rope_theta": value("rope.freq_base"),
                         "partial_rotary_factor": value("rope.dimension_count") / head_dim,
                         "mrope_section": sections, "mrope_interleaved": True},
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), tie_word_embeddings=False,
    )
    if not moe:
        return transformers.Qwen3_5TextConfig(**common, intermediate_size=value("feed_forward_length"))
    return transformers.Qwen3_5MoeTextConfig(
        **common, num_experts=value("expert_count"), num_experts_per_tok=value("expert_used_count"),
        moe_intermediate_size=value("expert_feed_forward_length"),
        shared_expert_intermediate_size=value("expert_shared_feed_forward_length"))


def gguf_reference(path, moe: bool) -> TransformersMTP:
    tensors = dequantized_tensors(path)
    config = gguf_text_config(path, moe)
    mtp = mtp_tensors_from_gguf(tensors, config.num_hidden_layers, moe)
    modeling = moe_modeling if moe else dense_modeling
    return TransformersMTP(modeling, config, mtp, tensors["token_embd.weight"], tensors["output.weight"])


@pytest.fixture(scope="module")
def dense_q8_model(fixtures):
    return qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf", precision="reference")


def test_dense_q8_0_gguf_matches_its_dequantized_reference_and_the_checkpoint(
        fixtures, dense_q8_model, hf_model, hf_pairs, text_ids):
    reference = gguf_reference(fixtures / "tiny" / "dense-Q8_0.gguf", moe=False)
    hidden = our_hidden_states(dense_q8_model, text_ids[:-1])
    next_ids = torch.tensor([text_ids[1:]])
    logits, out, _ = ours(MultiTokenPredictor(dense_q8_model.network), hidden, next_ids)
    # The same quantized weights, dequantized by gguf-py, in transformers' modules: fp32 rounding apart.
    expected_logits, expected_out, _ = reference(hidden, next_ids)
    assert max_abs(logits, expected_logits) <= TOLERANCE
    assert max_abs(out, expected_out) <= TOLERANCE

    # Against the bf16 checkpoint the gap is Q8_0's. The fixtures say how large that is for the main model
    # (llama.cpp's exact Q8_0 arithmetic vs transformers): max |diff| about 0.52, top-1 agreement 0.94.
    exact_q8 = np.load(fixtures / "ref" / "dense.text.exact-Q8_0.logits.npy").astype(np.float32)
    truth = np.load(fixtures / "ref" / "dense.text.transformers.logits.npy")
    main_gap, main_agreement = max_abs(exact_q8, truth), top1_agreement(exact_q8, truth)
    checkpoint_predictor = MultiTokenPredictor(hf_model.network)
    checkpoint_logits, *_ = ours(checkpoint_predictor, *hf_pairs)
    # The whole chain (8 quantized layers, then the MTP layer and head): about the main model's gap.
    assert max_abs(logits, checkpoint_logits) <= 2 * main_gap
    assert top1_agreement(logits, checkpoint_logits) >= main_agreement - 0.05
    # The MTP layer and head alone, on the same (checkpoint) inputs: a few quantized products, not the whole
    # model's chain of them, so well under its gap (observed 0.08 vs 0.52).
    alone, *_ = ours(MultiTokenPredictor(dense_q8_model.network), *hf_pairs)
    assert max_abs(alone, checkpoint_logits) <= main_gap / 2


def test_moe_gguf_matches_transformers_moe_modules(fixtures):
    path = fixtures / "tiny" / "moe-Q4_K_M.gguf"
    model = qwen35.load_model(path, precision="reference")
    reference = gguf_reference(path, moe=True)
    # 64 pairs, few calls: reference precision dequantizes each expert it uses on every call, slow on a CPU.
    ids = json.loads((fixtures / "ref" / "moe.json").read_text())["sequences"]["text"]["ids"][:65]
    # The main model's part is tests/test_model_gguf.py's (vs llama.cpp); both MTP layers get the same input.
    hidden = our_hidden_states(model, ids[:-1])
    next_ids = torch.tensor([ids[1:]])
    logits, out, _ = ours(MultiTokenPredictor(model.network), hidden, next_ids, pieces=[60, 1, 1, 1, 1])
    expected_logits, expected_out, _ = reference(hidden, next_ids)
    assert max_abs(logits, expected_logits) <= TOLERANCE
    assert max_abs(out, expected_out) <= TOLERANCE
