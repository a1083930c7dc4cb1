"""`qwen35 plan --gguf / --hf`: exact bytes from real headers, and clear errors for bad files.

References: gguf-py's own GGUFReader (the tensors' byte sizes) and safetensors' safe_open
(shapes and dtypes), never our reader.
"""

import json
import shutil
import struct

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors import safe_open

from qwen35.cli import main

GGUF_MODELS = ["dense-Q8_0.gguf", "dense-Q4_K_M.gguf", "dense-Q3_K_M.gguf", "dense-Q2_K.gguf",
               "dense-IQ4_XS.gguf", "dense-Q4_0.gguf", "moe-Q4_K_M.gguf"]


def plan_json(capsys, *argv) -> dict:
    code = main(["plan", *argv, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def plan_error(capsys, *argv) -> tuple[int, str]:
    code = main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("file_name", GGUF_MODELS)
def test_gguf_weights_plus_mtp_equal_the_files_tensor_bytes(fixtures, capsys, file_name):
    path = fixtures / "tiny" / file_name
    reader = GGUFReader(path)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    by_type = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    result = plan_json(capsys, "--gguf", str(path), "--no-detect")
    assert result["weights_bytes"] + result["mtp_bytes"] == total
    assert result["tensor_types"] == by_type
    assert result["mtp_bytes"] > 0  # the fixtures carry an MTP layer
    assert result["vision_bytes"] == 0
    assert result["decode_tok_s"] is None  # no hardware known


@pytest.mark.parametrize("model, mmproj", [("dense-Q4_K_M.gguf", "dense-mmproj-F32.gguf"),
                                           ("moe-Q4_K_M.gguf", "moe-mmproj-F32.gguf")])
def test_gguf_with_its_mmproj_counts_the_vision_tower(fixtures, capsys, model, mmproj):
    projector = sum(int(t.n_bytes) for t in GGUFReader(fixtures / "tiny" / mmproj).tensors)
    result = plan_json(capsys, "--gguf", str(fixtures / "tiny" / model), str(fixtures / "tiny" / mmproj),
                       "--vision", "--no-detect")
    assert result["vision_bytes"] == projector
    without = plan_json(capsys, "--gguf", str(fixtures / "tiny" / model), "--no-detect")
    assert result["total_bytes"] - without["total_bytes"] >= projector  # loaded: weights plus its buffers


def test_gguf_kv_and_state_follow_the_files_own_shape(fixtures, capsys):
    # dense fixture (fixtures/README.md): 2 full-attention layers of 8, 2 KV heads of 64, DeltaNet 2/4 heads of 64.
    result = plan_json(capsys, "--gguf", str(fixtures / "tiny" / "dense-Q8_0.gguf"), "--ctx", "4096", "--no-detect")
    assert result["kv_bytes_per_token"] == 2 * 2 * 2 * 64 * 2
    assert result["kv_cache_bytes"] == 2 * 2 * 2 * 64 * 2 * 4096
    conv = (2 * 2 * 64 + 4 * 64) * 3 * 4
    ssm = 4 * 64 * 64 * 4
    assert result["recurrent_state_bytes"] == 6 * (conv + ssm)


def test_split_gguf_reads_every_shard(fixtures, capsys, tmp_path):
    # Two shards made by re-writing the dense model's tensors with gguf-py's writer.
    from gguf import GGUFWriter

    reader = GGUFReader(fixtures / "tiny" / "dense-Q4_0.gguf")
    names = [t.name for t in reader.tensors]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for index, half in enumerate(halves):
        writer = GGUFWriter(tmp_path / f"tiny-{index + 1:05d}-of-00002.gguf", "qwen35")
        if index == 0:  # the model's metadata lives in the first shard
            for field in reader.fields.values():
                if field.name.startswith(("GGUF.", "general.architecture")):
                    continue
                sub_type = field.types[-1] if len(field.types) > 1 else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", 2)
        for tensor in reader.tensors:
            if tensor.name in half:
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    total = sum(int(t.n_bytes) for t in reader.tensors)
    result = plan_json(capsys, "--gguf", str(tmp_path / "tiny-00002-of-00002.gguf"), "--no-detect")
    assert result["weights_bytes"] + result["mtp_bytes"] == total
    assert len(result["files"]) == 2


def test_hf_folder_bytes_come_from_the_safetensors_header(fixtures, capsys):
    folder = fixtures / "tiny" / "dense-hf"
    sizes = {"BF16": 2, "F32": 4, "F16": 2}
    parts = {"text": 0, "mtp": 0, "vision": 0}
    with safe_open(folder / "model.safetensors", "np") as f:
        for name in f.keys():
            tensor = f.get_slice(name)
            n = int(np.prod(tensor.get_shape())) * sizes[tensor.get_dtype()]
            part = "mtp" if name.startswith("mtp.") else "vision" if ".visual." in name else "text"
            parts[part] += n
    result = plan_json(capsys, "--hf", str(folder), "--no-detect")
    assert (result["weights_bytes"], result["mtp_bytes"], result["vision_bytes"]) == (
        parts["text"], parts["mtp"], parts["vision"])
    # Same network as the dense GGUFs: same cache sizes.
    gguf = plan_json(capsys, "--gguf", str(fixtures / "tiny" / "dense-Q8_0.gguf"), "--no-detect")
    assert result["kv_bytes_per_token"] == gguf["kv_bytes_per_token"]
    assert result["recurrent_state_bytes"] == gguf["recurrent_state_bytes"]


def test_hf_folder_with_quant_predicts_what_llama_quantize_wrote(fixtures, capsys):
    predicted = plan_json(capsys, "--hf", str(fixtures / "tiny" / "dense-hf"), "--quant", "Q4_K_M", "--no-detect")
    real = plan_json(capsys, "--gguf", str(fixtures / "tiny" / "dense-Q4_K_M.gguf"), "--no-detect")
    assert predicted["tensor_types"] == real["tensor_types"]
    assert predicted["weights_bytes"] == real["weights_bytes"]
    assert predicted["mtp_bytes"] == real["mtp_bytes"]


# --- bad files ------------------------------------------------------------------------------


def _one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err and err.startswith("qwen35 plan: error:")


def test_a_text_file_is_not_a_gguf(capsys, tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, this is not a model\n" * 10)
    code, err = plan_error(capsys, "--gguf", str(path), "--no-detect")
    assert code == 1 and _one_line(err) and "not a GGUF" in err


@pytest.mark.parametrize("target", ["missing.gguf", "."])
def test_missing_or_unreadable_paths(capsys, tmp_path, target):
    code, err = plan_error(capsys, "--gguf", str(tmp_path / target), "--no-detect")
    assert code == 1 and _one_line(err)


def test_an_mmproj_alone_is_refused_with_a_reason(fixtures, capsys):
    code, err = plan_error(capsys, "--gguf", str(fixtures / "tiny" / "dense-mmproj-F32.gguf"), "--no-detect")
    assert code == 1 and _one_line(err) and "vision projector" in err


@pytest.mark.parametrize("field, value", [("tensor_count", 2**62), ("kv_count", 2**40)])
def test_forged_counts_are_refused_without_allocating(fixtures, capsys, tmp_path, field, value):
    path = tmp_path / "forged.gguf"
    shutil.copy(fixtures / "tiny" / "dense-Q4_0.gguf", path)
    data = bytearray(path.read_bytes())
    offset = 8 if field == "tensor_count" else 16
    struct.pack_into("<Q", data, offset, value)
    path.write_bytes(bytes(data))
    code, err = plan_error(capsys, "--gguf", str(path), "--no-detect")
    assert code == 1 and _one_line(err)


def test_forged_metadata_values_are_refused(fixtures, capsys, tmp_path):
    # block_count patched to a billion: it must not drive any loop or allocation.
    source = fixtures / "tiny" / "dense-Q4_0.gguf"
    data = bytearray(source.read_bytes())
    key = b"qwen35.block_count"
    at = data.index(key) + len(key) + 4  # skip the value type
    struct.pack_into("<I", data, at, 10**9)
    path = tmp_path / "forged-meta.gguf"
    path.write_bytes(bytes(data))
    code, err = plan_error(capsys, "--gguf", str(path), "--no-detect")
    assert code == 1 and _one_line(err) and "block_count" in err


def test_a_truncated_safetensors_header_is_refused(fixtures, capsys, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(fixtures / "tiny" / "dense-hf" / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    code, err = plan_error(capsys, "--hf", str(folder), "--no-detect")
    assert code == 1 and _one_line(err) and "safetensors" in err


def test_a_non_qwen_config_is_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    code, err = plan_error(capsys, "--hf", str(tmp_path), "--no-detect")
    assert code == 1 and _one_line(err) and "not Qwen 3.5" in err


def test_hf_moe_checkpoint_made_by_transformers(capsys, tmp_path):
    # The fused-expert MoE layout, written by transformers itself; its own parameter counts are the reference.
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                vocab_size=512)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    state = model.state_dict()
    visual = sum(v.numel() for k, v in state.items() if ".visual." in k)
    language = sum(v.numel() for k, v in state.items() if ".visual." not in k)
    experts = sum(v.numel() for k, v in state.items() if ".experts." in k)
    result = plan_json(capsys, "--hf", str(tmp_path), "--no-detect")
    assert result["weights_bytes"] == 4 * language  # saved in float32
    assert result["vision_bytes"] == 4 * visual
    assert result["params_total"] == language + visual
    assert result["params_active"] == language - experts + experts * 2 // 8
    # The same config through the catalog's tensor enumeration gives transformers' counts too.
    from qwen35.plan.catalog import parameter_counts
    from qwen35.plan.sources import spec_from_hf_config

    counts = parameter_counts(spec_from_hf_config(json.loads((tmp_path / "config.json").read_text())))
    assert (counts["text"], counts["vision"]) == (language, visual)
