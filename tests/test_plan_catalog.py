"""The catalog and the quant mixes against published numbers and llama.cpp's own files.

References: the parameter counts, KV and DeltaNet state sizes in architecture.md (built from the
released configs); the published GGUF file sizes in memory-and-speed.md; the tensor lists and
types of the fixture GGUFs, written by llama.cpp's converter and llama-quantize.
"""

import pytest

from qwen35.errors import UnknownNameError
from qwen35.formats.gguf import GGUFModel
from qwen35.plan.catalog import CATALOG, ModelSpec, VisionSpec, find_model, mtp_tensors, parameter_counts, text_tensors, vision_tensors
from qwen35.plan.estimator import kv_bytes_per_token, recurrent_state_bytes
from qwen35.plan.mixes import FILE_TYPE_NAMES, MIXES, assign_types, find_mix
from qwen35.plan.weights import predict_weights

SIZES = ["0.8b", "2b", "4b", "9b", "27b", "35b-a3b", "122b-a10b", "397b-a17b"]
MiB = 1024**2


@pytest.mark.parametrize("name, billions", list(zip(SIZES, [0.85, 2.21, 4.54, 9.41, 27.4, 35.1, 122.6, 396.8])))
def test_parameter_counts_match_the_published_totals(name, billions):
    total = parameter_counts(find_model(name))["total"] / 1e9
    assert total == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("name, billions", [("35b-a3b", 3.46), ("122b-a10b", 9.77), ("397b-a17b", 17.35)])
def test_active_parameters_of_the_moe_sizes(name, billions):
    assert parameter_counts(find_model(name))["active"] / 1e9 == pytest.approx(billions, rel=0.01)


def test_mtp_layer_sizes_span_the_published_range():
    # "The MTP layer adds roughly 20M (0.8B) to 6.6B (397B) parameters."
    assert parameter_counts(find_model("0.8b"))["mtp"] / 1e6 == pytest.approx(20, rel=0.05)
    assert parameter_counts(find_model("397b-a17b"))["mtp"] / 1e9 == pytest.approx(6.6, rel=0.02)


@pytest.mark.parametrize("name, kib", list(zip(SIZES, [12, 12, 32, 32, 64, 20, 24, 30])))
def test_kv_bytes_per_token_at_16_bit(name, kib):
    assert kv_bytes_per_token(find_model(name), "f16") == kib * 1024


# architecture.md: "about 18.6 MiB (0.8B, 2B), 49-50 MiB (4B, 9B), 147-150 MiB (27B), 61-63 MiB
# (35B-A3B), 147 MiB (122B), 183-186 MiB (397B)": the low end keeps the conv state in bf16
# (transformers), the high end in F32 (llama.cpp).
STATE_RANGES = {"0.8b": (18.6, 18.6), "2b": (18.6, 18.6), "4b": (49, 50), "9b": (49, 50), "27b": (147, 150),
                "35b-a3b": (61, 63), "122b-a10b": (147, 147), "397b-a17b": (183, 186)}


@pytest.mark.parametrize("name", SIZES)
def test_deltanet_state_per_sequence(name):
    low, high = STATE_RANGES[name]
    spec = find_model(name)
    bf16_conv = recurrent_state_bytes(spec, conv_bytes=2) / MiB
    f32_conv = recurrent_state_bytes(spec) / MiB
    assert low * 0.99 <= bf16_conv <= high * 1.01
    assert bf16_conv < f32_conv <= max(high * 1.01, bf16_conv * 1.04)


def test_quantized_kv_cache_uses_ggml_block_sizes():
    # 27B: 64 KiB/token at 16 bits; q8_0 stores 32 values in 34 bytes, q4_0 in 18.
    spec = find_model("27b")
    assert kv_bytes_per_token(spec, "q8_0") == 64 * 1024 * 34 // 64
    assert kv_bytes_per_token(spec, "q4_0") == 64 * 1024 * 18 // 64


PUBLISHED_Q8_0 = {"27b": 28.6, "35b-a3b": 36.9, "122b-a10b": 129.9, "397b-a17b": 421.5}
PUBLISHED_UD = {"27b": 17.6, "35b-a3b": 22.2, "122b-a10b": 68.4, "397b-a17b": 219.2}


@pytest.mark.parametrize("name", PUBLISHED_Q8_0)
def test_q8_0_text_weights_match_the_published_files(name):
    # The published files were made without the MTP layer and without the vision tower.
    weights = predict_weights(find_model(name), MIXES["Q8_0"], mtp_in_file=False)
    assert weights.bytes("text") / 1e9 == pytest.approx(PUBLISHED_Q8_0[name], rel=0.03)


@pytest.mark.parametrize("name", PUBLISHED_UD)
def test_ud_q4_k_xl_text_weights_match_the_published_files(name):
    weights = predict_weights(find_model(name), MIXES["UD-Q4_K_XL"], mtp_in_file=False)
    assert weights.bytes("text") / 1e9 == pytest.approx(PUBLISHED_UD[name], rel=0.08)


@pytest.mark.parametrize("name, expected", [
    ("27b", "27b"), ("27B", "27b"), ("35b-a3b", "35b-a3b"), ("qwen3.5:35b-a3b", "35b-a3b"),
    ("Qwen3.5-122B-A10B", "122b-a10b"), ("unsloth/Qwen3.5-397B-A17B-GGUF", "397b-a17b"), ("35b", "35b-a3b"),
    ("0.8b", "0.8b"), ("qwen3.5:9b", "9b"),
])
def test_model_names_are_forgiving(name, expected):
    assert find_model(name).name == expected


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError, match="did you mean 35b-a3b"):
        find_model("36b-a3b")


def test_quant_names():
    assert find_mix("q4_k_m").name == "Q4_K_M"
    assert find_mix("ud-q4_k_xl").name == "UD-Q4_K_XL"
    with pytest.raises(UnknownNameError, match="Q4_K_M"):
        find_mix("Q4_K_MM")


# --- against llama.cpp's own files ------------------------------------------------------------

# The fixture models as fixtures/README.md describes them (not read back by our code).
TINY_DENSE = ModelSpec("tiny-dense", hidden=256, n_layers=8, ffn=512, n_head=4, n_head_kv=2, linear_k_heads=2,
                       linear_v_heads=4, tied_embeddings=False, head_dim=64, linear_k_dim=64, linear_v_dim=64,
                       vocab=4160, vision=VisionSpec(depth=2, hidden=64, ffn=128, heads=2, num_position_embeddings=64))
TINY_MOE = ModelSpec("tiny-moe", hidden=256, n_layers=4, ffn=0, n_head=4, n_head_kv=2, linear_k_heads=2,
                     linear_v_heads=4, tied_embeddings=False, head_dim=64, linear_k_dim=64, linear_v_dim=64,
                     vocab=4160, n_experts=16, n_experts_used=4, expert_ffn=256, shared_ffn=256,
                     vision=VisionSpec(depth=2, hidden=64, ffn=128, heads=2, num_position_embeddings=64))


@pytest.mark.parametrize("spec, model_file, mmproj", [
    (TINY_DENSE, "dense-Q4_K_M.gguf", "dense-mmproj-F32.gguf"),
    (TINY_MOE, "moe-Q4_K_M.gguf", "moe-mmproj-F32.gguf"),
])
def test_enumerated_tensors_are_the_converters_tensors(fixtures, spec, model_file, mmproj):
    with GGUFModel(fixtures / "tiny" / model_file) as model:
        real = {name: info.shape for name, info in model.tensors.items()}
    with GGUFModel(fixtures / "tiny" / mmproj) as projector:
        real_vision = {name: info.shape for name, info in projector.tensors.items()}
    ours = {t.name: t.shape for t in text_tensors(spec) + mtp_tensors(spec)}
    assert ours == real
    assert {t.name: t.shape for t in vision_tensors(spec)} == real_vision


@pytest.mark.parametrize("file_name", ["dense-Q8_0.gguf", "dense-Q4_K_M.gguf", "dense-Q3_K_M.gguf", "dense-Q2_K.gguf",
                                       "dense-IQ4_XS.gguf", "dense-Q4_0.gguf", "moe-Q4_K_M.gguf"])
def test_mix_rules_reproduce_llama_quantize(fixtures, file_name):
    with GGUFModel(fixtures / "tiny" / file_name) as model:
        arch = model.architecture
        mix = MIXES[FILE_TYPE_NAMES[model.metadata["general.file_type"]]]
        types = assign_types(
            model.tensors.values(), mix,
            n_layer_all=model.arch_value("block_count"),
            n_gqa=model.arch_value("attention.head_count") // model.arch_value("attention.head_count_kv"),
            n_expert=model.metadata.get(f"{arch}.expert_count", 0),
        )
        wrong = {name: (types[name].name, info.type_name) for name, info in model.tensors.items()
                 if types[name] != info.type_id}
    assert not wrong, f"predicted vs llama-quantize: {wrong}"


def test_row_widths_not_a_multiple_of_256_fall_back_to_32_wide_blocks():
    # llama-quant.cpp's tensor_type_fallback: Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL.
    class T:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape
    tensors = [T("token_embd.weight", (1152, 100)), T("output.weight", (1152, 100)),
               T("blk.0.ffn_up.weight", (1152, 64)), T("blk.0.ffn_down.weight", (4304, 64))]
    expected = {"Q4_K_M": ("Q5_0", "Q8_0"), "Q2_K": ("Q4_0", "Q8_0"), "IQ4_XS": ("IQ4_NL", "Q8_0")}
    for mix, (up, output) in expected.items():
        types = assign_types(tensors, MIXES[mix], n_layer_all=1, n_gqa=4, n_expert=0)
        assert types["blk.0.ffn_up.weight"].name == up
        assert types["output.weight"].name == output
        assert types["blk.0.ffn_down.weight"].name == "F16"  # 4304 is not a multiple of 32 either


def test_catalog_is_the_eight_sizes():
    assert [spec.name for spec in CATALOG] == SIZES
