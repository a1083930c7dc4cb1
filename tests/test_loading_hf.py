"""Loading HF directories: sharded checkpoints, and one clear FormatError for each kind of breakage."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35
from qwen35.errors import FormatError

PREFIX = "model.language_model."


@pytest.fixture
def checkpoint(fixtures, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(fixtures / "tiny" / "dense-hf", target)
    return target


def edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_sharded_with_index_equals_single_file(checkpoint, tmp_path):
    tensors = load_file(str(checkpoint / "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint, sharded)
    (sharded / "model.safetensors").unlink()
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, str(sharded / file))
        weight_map.update({name: file for name in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = [3, 1000, 17, 4098, 250]
    expected = qwen35.load_model(checkpoint).logits(ids)
    assert np.array_equal(qwen35.load_model(sharded).logits(ids), expected)


def test_checkpoint_without_mtp_weights_loads(checkpoint):
    edit_tensors(checkpoint, lambda t: [t.pop(name) for name in [n for n in t if n.startswith("mtp.")]])
    model = qwen35.load_model(checkpoint)
    assert model.network.mtp_weights == {}
    assert model.config.mtp_num_layers == 1


def drop(name):
    return lambda tensors: tensors.pop(name)


def set_tensor(name, value):
    def edit(tensors):
        tensors[name] = value

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (drop(PREFIX + "layers.2.linear_attn.A_log"), "layers.2.linear_attn.A_log is missing"),
        (drop("lm_head.weight"), "lm_head.weight is missing"),
        (set_tensor(PREFIX + "layers.3.self_attn.k_proj.weight", torch.zeros(64, 256, dtype=torch.bfloat16)),
         r"k_proj.weight has shape \[64, 256\], expected \[128, 256\]"),
        (set_tensor(PREFIX + "norm.weight", torch.zeros(256, dtype=torch.int8)), "dtype I8"),
        (set_tensor("mtp.fc.weight", torch.zeros(256, 256, dtype=torch.bfloat16)), "mtp.fc.weight has shape"),
    ],
    ids=["missing-tensor", "missing-lm-head", "wrong-shape", "unsupported-dtype", "broken-mtp"],
)
def test_broken_tensors_give_format_error(checkpoint, edit, message):
    edit_tensors(checkpoint, edit)
    with pytest.raises(FormatError, match=message):
        qwen35.load_model(checkpoint)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "not a Qwen 3.5"),
        (lambda c: c["text_config"].pop("linear_num_key_heads"), "linear_num_key_heads"),
        (lambda c: c["text_config"].update(model_type="llama"), "not a Qwen 3.5"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "multiple of KV heads"),
    ],
    ids=["architecture", "missing-key", "model-type", "inconsistent-heads"],
)
def test_broken_config_gives_format_error(checkpoint, edit, message):
    edit_config(checkpoint, edit)
    with pytest.raises(FormatError, match=message):
        qwen35.load_model(checkpoint)


def test_unreadable_files_give_format_error(fixtures, tmp_path):
    bad_json = tmp_path / "bad-json"
    shutil.copytree(fixtures / "tiny" / "dense-hf", bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        qwen35.load_model(bad_json)

    truncated = tmp_path / "truncated"
    shutil.copytree(fixtures / "tiny" / "dense-hf", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="safetensors"):
        qwen35.load_model(truncated)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="config.json is missing"):
        qwen35.load_model(tmp_path / "empty")
    with pytest.raises(FormatError, match="no such model"):
        qwen35.load_model(tmp_path / "nothing-here")


def test_forged_layer_count_fails_fast(checkpoint):
    edit_config(checkpoint, lambda c: c["text_config"].update(num_hidden_layers=10**9, layer_types=None))
    with pytest.raises(FormatError, match="cannot fit"):
        qwen35.load_model(checkpoint)
