"""benchmarks/make_model.py: random-weight GGUFs that llama.cpp's own tools would have laid out the same way.

References: the fixture GGUFs made by llama.cpp's converter and llama-quantize (metadata
keys and types, tensor names, shapes and per-tensor block types), gguf-py's reference
dequantizers (the random blocks decode to finite, small weights), Qwen's published
special-token ids, and llama.cpp itself when a Python with llama_cpp is named in
QWEN35_LLAMA_PYTHON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize as reference_dequantize

from qwen35.formats.gguf import GGUFModel
from qwen35.plan.catalog import ModelSpec, text_tensors

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_make_model():
    spec = importlib.util.spec_from_file_location("make_model", REPO_ROOT / "benchmarks" / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_model = _load_make_model()

# The shapes of the fixtures' tiny models (fixtures/README.md), as catalog specs.
FIXTURE_SHAPES = {
    "dense": ModelSpec("dense", hidden=256, n_layers=8, ffn=512, n_head=4, n_head_kv=2, linear_k_heads=2,
                       linear_v_heads=4, tied_embeddings=False, head_dim=64, linear_k_dim=64, linear_v_dim=64,
                       vocab=4160, vision=None),
    "moe": ModelSpec("moe", hidden=256, n_layers=4, ffn=0, n_head=4, n_head_kv=2, linear_k_heads=2,
                     linear_v_heads=4, tied_embeddings=False, head_dim=64, linear_k_dim=64, linear_v_dim=64,
                     vocab=4160, n_experts=16, n_experts_used=4, expert_ffn=256, shared_ffn=256, vision=None),
}
FIXTURE_FILES = [("dense", q) for q in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "Q4_0")] + [("moe", "Q4_K_M")]
# Names the file's own label or vocabulary cut decides, not the layout.
FREE_KEYS = {"general.name", "general.size_label", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"}


def _fields(reader: GGUFReader) -> dict:
    return {f.name: f for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.parametrize("shape,quant", FIXTURE_FILES)
def test_layout_matches_llama_quantize(fixtures, tmp_path, shape, quant):
    out = tmp_path / f"{shape}-{quant}.gguf"
    make_model.write_model(out, FIXTURE_SHAPES[shape], quant, vocab_file=fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf")
    ours, theirs = GGUFReader(out), GGUFReader(fixtures / "tiny" / f"{shape}-{quant}.gguf")

    ours_fields, their_fields = _fields(ours), _fields(theirs)
    assert set(ours_fields) == set(their_fields)
    for name, field in their_fields.items():
        assert ours_fields[name].types == field.types, name
        if name not in FREE_KEYS:
            assert str(ours_fields[name].contents()) == str(field.contents()), name

    def layout(reader):
        return {t.name: (t.tensor_type, [int(d) for d in t.shape]) for t in reader.tensors}

    assert layout(ours) == layout(theirs)


@pytest.mark.parametrize("shape,quant", [("dense", "Q4_K_M"), ("dense", "Q2_K"), ("dense", "IQ4_XS"), ("moe", "Q4_K_M")])
def test_random_weights_decode_to_small_finite_values(fixtures, tmp_path, shape, quant):
    out = tmp_path / "model.gguf"
    make_model.write_model(out, FIXTURE_SHAPES[shape], quant, vocab_file=fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf")
    for tensor in GGUFReader(out).tensors:
        values = reference_dequantize(tensor.data, tensor.tensor_type)
        assert np.isfinite(values).all(), tensor.name
        if tensor.tensor_type != T.F32:
            assert 0.01 < values.std() < 0.04, (tensor.name, values.std())
            assert abs(values.mean()) < 0.005, (tensor.name, values.mean())


@pytest.mark.parametrize("block_type", sorted(make_model.SCALE_FIELDS, key=int))
def test_every_supported_block_type_is_calibrated(block_type):
    blocks = make_model.random_blocks(block_type, 256 * 512, np.random.default_rng(0))
    values = reference_dequantize(blocks, block_type)
    assert values.size == 256 * 512
    assert np.isfinite(values).all()
    assert 0.01 < values.std() < 0.04
    assert abs(values.mean()) < 0.005


def test_full_vocabulary_keeps_the_real_tokens_and_qwen_ids(fixtures):
    vocab_file = fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf"
    tokens, types, merges = make_model.vocabulary(vocab_file, 248320)
    source = GGUFModel(vocab_file).metadata
    assert len(tokens) == len(types) == 248320
    assert tokens[:151643] == list(source["tokenizer.ggml.tokens"][:151643])
    assert merges == list(source["tokenizer.ggml.merges"])
    # Qwen's published ids of its special tokens.
    assert tokens.index("<|endoftext|>") == 151643
    assert tokens.index("<|im_end|>") == 151645
    assert tokens.index("<think>") == 151667
    assert tokens.index("</think>") == 151668
    assert len(set(tokens)) == len(tokens)


def test_family_shapes_load_and_run(fixtures, tmp_path):
    import qwen35

    spec = make_model.benchmark_spec("0.8b", layers=4, vocab=4160)
    out = tmp_path / "small.gguf"
    make_model.write_model(out, spec, "Q4_K_M", vocab_file=fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf")
    reader = GGUFReader(out)
    # The released 0.8B's layer shapes (catalog) with a cut vocabulary and depth, plus the MTP block.
    written = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    for tensor in text_tensors(spec):
        assert written[tensor.name] == tensor.shape
    assert written["blk.3.attn_q.weight"] == (1024, 4096)
    assert written["blk.0.attn_qkv.weight"] == (1024, 6144)
    assert "blk.4.nextn.eh_proj.weight" in written

    model = qwen35.load_model(out)
    assert model.config.num_layers == 4
    assert model.config.layer_types[3] == "full_attention"
    logits = model.logits([1, 2, 3])
    assert logits.shape == (3, 4160)
    assert np.isfinite(logits).all()


def test_bad_arguments_are_clear_errors():
    from qwen35.errors import Qwen35Error

    with pytest.raises(Qwen35Error, match="dense"):
        make_model.benchmark_spec("4b", experts=8)
    with pytest.raises(Qwen35Error, match="layers"):
        make_model.benchmark_spec("0.8b", layers=0)
    with pytest.raises(Qwen35Error, match="unknown model"):
        make_model.benchmark_spec("5b")
    assert make_model.main(["--size", "0.8b", "--type", "Q9_X", "-o", "/nonexistent/x.gguf"]) == 1


# llama.cpp through llama-cpp-python (the `bench` extra): here, or in the Python QWEN35_LLAMA_PYTHON names.
LLAMA_PYTHON = os.environ.get("QWEN35_LLAMA_PYTHON") or (
    sys.executable if importlib.util.find_spec("llama_cpp") is not None else None)
LLAMA_CHECK = """
import json, sys, llama_cpp
model = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=2, verbose=False, logits_all=True)
ids = model.tokenize(b"Hello world", add_bos=False)
model.eval(ids)
scores = model.scores[len(ids) - 1]
print(json.dumps({"n_vocab": model.n_vocab(), "ids": ids, "finite": bool(__import__("numpy").isfinite(scores).all())}))
"""


@pytest.mark.skipif(not LLAMA_PYTHON, reason="llama_cpp is not installed here and QWEN35_LLAMA_PYTHON names no Python that has it")
def test_llama_cpp_loads_and_runs_the_file(fixtures, tmp_path):
    spec = make_model.benchmark_spec("0.8b", layers=4)
    out = tmp_path / "full-vocab.gguf"
    make_model.write_model(out, spec, "Q4_K_M", vocab_file=fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf")
    done = subprocess.run([LLAMA_PYTHON, "-c", LLAMA_CHECK, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["n_vocab"] == 248320
    assert report["finite"]
    # llama.cpp's own tokenizer test vectors for this vocabulary say what "Hello world" must give.
    vocab = fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf"
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = vocab.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert report["ids"] == [int(i) for i in expected[texts.index("Hello world")].split()]
