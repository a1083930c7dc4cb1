"""`qwen35 show MODEL`, against what gguf-py, safetensors, the fixtures' JSON files, Ollama's own printed
numbers and the server's /api/show say of the same model. Only headers are read: no torch, no weights."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from argparse import Namespace
from datetime import datetime, timezone

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.scripts.gguf_dump import dump_metadata
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from qwen35.cli import main
from qwen35.hub.details import human_number

QUANTS = ["Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "Q4_0"]
GGUF_FILES = [f"dense-{quant}.gguf" for quant in QUANTS] + ["moe-Q4_K_M.gguf"]
# A checkpoint's own sampling settings, as Qwen's generation_config.json files give them.
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
                     "eos_token_id": 4098, "pad_token_id": 4096}


def show(capsys, *args) -> tuple[int, str, str]:
    code = main(["show", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def show_json(capsys, *args) -> dict:
    code, out, err = show(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def reader_values(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def section(text: str, title: str) -> dict[str, str]:
    """The rows of one section of the text output: first column -> the rest of the line."""
    lines = text.splitlines()
    start = lines.index(f"  {title}") + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        key, _, value = line.strip().partition("  ")
        rows[key] = value.strip()
    return rows


def rewritten(source, target, new_metadata=None, remove=()):
    """A copy of a GGUF with metadata changed by gguf-py's own gguf_new_metadata."""
    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(target), arch=reader.fields["general.architecture"].contents())
    copy_with_new_metadata(reader, writer, dict(new_metadata or {}), list(remove))
    return target


@pytest.fixture
def hf_copy(fixtures, tmp_path):
    """The HF fixture with a generation_config.json that sets sampling, as Qwen's checkpoints do."""
    copy = tmp_path / "dense-hf"
    copy.mkdir()
    for item in (fixtures / "tiny" / "dense-hf").iterdir():
        (copy / item.name).symlink_to(item)
    (copy / "generation_config.json").unlink()
    (copy / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return copy


@pytest.mark.parametrize("name", GGUF_FILES)
def test_model_section_is_what_gguf_py_reads(fixtures, capsys, name):
    path = fixtures / "tiny" / name
    reader = GGUFReader(str(path))
    values = reader_values(reader)
    arch = values["general.architecture"]
    file_type = LlamaFileType(values["general.file_type"]).name.removeprefix("MOSTLY_")
    assert file_type == path.stem.split("-", 1)[1]  # the file's own name says its mix too
    count = sum(int(tensor.n_elements) for tensor in reader.tensors)

    shown = show_json(capsys, path)
    assert shown["details"]["quantization_level"] == file_type
    assert shown["details"]["family"] == arch and shown["details"]["format"] == "gguf"
    assert shown["model_info"]["general.parameter_count"] == count
    assert shown["model_info"][f"{arch}.context_length"] == values[f"{arch}.context_length"]

    code, text, _ = show(capsys, path)
    assert code == 0
    assert section(text, "Model") == {
        "architecture": arch, "parameters": human_number(count),
        "context length": str(values[f"{arch}.context_length"]),
        "embedding length": str(values[f"{arch}.embedding_length"]), "quantization": file_type}
    assert list(section(text, "Capabilities")) == ["completion", "tools", "thinking"]  # no mmproj given
    assert not [line for line in text.splitlines() if line != line.rstrip()]  # as `ollama show`: no trailing blanks


@pytest.mark.parametrize("count,printed", [(999_885_952, "999.89M"), (116_829_156_672, "116.8B"),
                                           (8_000_000_000, "8B"), (8_190_256, "8.19M")])
def test_parameter_counts_are_written_as_ollama_writes_them(count, printed):
    # 999.89M (gemma3:1b) and 116.8B (gpt-oss:120b, 116829156672) as `ollama show` prints them.
    assert human_number(count) == printed


def test_verbose_json_holds_every_key_and_tensor_as_gguf_py_reads_them(fixtures, capsys):
    path = fixtures / "tiny" / "moe-Q4_K_M.gguf"
    reader = GGUFReader(str(path))
    values = reader_values(reader)
    verbose = show_json(capsys, path, "-v")
    for key, value in values.items():
        assert verbose["model_info"][key] == value, key
    assert [(t["name"], t["type"], t["shape"]) for t in verbose["tensors"]] == \
           [(t.name, t.tensor_type.name, t.shape.tolist()) for t in reader.tensors]
    brief = show_json(capsys, path)["model_info"]  # Ollama leaves long arrays out unless asked
    assert brief["tokenizer.ggml.tokens"] is None and brief[f"{values['general.architecture']}.rope.dimension_sections"] \
        == values["qwen35moe.rope.dimension_sections"]
    assert "tensors" not in show_json(capsys, path)


def test_verbose_text_cuts_values_as_gguf_dump_does(fixtures, capsys):
    path = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    with contextlib.redirect_stdout(io.StringIO()) as dumped:
        dump_metadata(GGUFReader(str(path)), Namespace(no_tensors=True))
    expected = {}
    for line in dumped.getvalue().splitlines():
        if "|" in line and " = " in line:
            key, _, value = line.split("|", 2)[2].strip().partition(" = ")
            if not key.startswith("GGUF."):
                expected[key] = value
    code, text, _ = show(capsys, path, "-v")
    assert code == 0
    assert section(text, "Metadata") == expected
    tensors = section(text, "Tensors")
    assert len(tensors) == len(GGUFReader(str(path)).tensors)


def test_hf_directory_is_what_its_json_and_safetensors_say(fixtures, capsys, hf_copy):
    from safetensors import safe_open

    config = json.loads((hf_copy / "config.json").read_text())
    text_config = config["text_config"]
    with safe_open(hf_copy / "model.safetensors", "np") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    vision = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("model.visual."))
    text = sum(math.prod(shape) for name, shape in shapes.items() if not name.startswith("model.visual."))

    shown = show_json(capsys, hf_copy)
    assert shown["details"]["format"] == "safetensors" and shown["details"]["quantization_level"] == dtypes.pop()
    assert shown["model_info"]["general.parameter_count"] == text
    assert shown["projector_info"]["general.parameter_count"] == vision
    assert shown["model_info"]["qwen35.context_length"] == text_config["max_position_embeddings"]
    assert shown["model_info"]["qwen35.embedding_length"] == text_config["hidden_size"]
    assert shown["model_info"]["qwen35.block_count"] == \
        text_config["num_hidden_layers"] + text_config["mtp_num_hidden_layers"]
    assert shown["capabilities"] == ["completion", "tools", "thinking", "vision"]
    assert shown["template"] == json.loads((hf_copy / "tokenizer_config.json").read_text())["chat_template"]
    code, out, _ = show(capsys, hf_copy, "--parameters")
    assert code == 0
    assert out.split() == ["repeat_penalty", "1.05", "temperature", "0.7", "top_k", "20", "top_p", "0.8"]
    assert section(show(capsys, hf_copy)[1], "Projector")["embedding length"] == str(config["vision_config"]["hidden_size"])


def test_template_and_modelfile_carry_the_files_chat_template(fixtures, capsys):
    path = fixtures / "tiny" / "dense-Q8_0.gguf"
    template = GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()
    code, out, _ = show(capsys, path, "--template")
    assert code == 0 and out == template + "\n"
    code, out, _ = show(capsys, path, "--modelfile")
    assert f"FROM {path}\n" in out and f'TEMPLATE """{template}"""' in out and "PARAMETER top_k 20" in out
    code, out, _ = show(capsys, path, "--system")
    assert code == 0 and out == ""  # Qwen's files ship no system message


def test_license_and_a_file_without_its_file_type(fixtures, capsys, tmp_path):
    source = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    link = "https://huggingface.co/Qwen/Qwen3.5-35B-A3B/blob/main/LICENSE"
    path = rewritten(source, tmp_path / "licensed.gguf", remove=["general.file_type"], new_metadata={
        "general.license": MetadataDetails(GGUFValueType.STRING, "apache-2.0"),
        "general.license.link": MetadataDetails(GGUFValueType.STRING, link)})
    code, out, _ = show(capsys, path, "--license")
    assert code == 0 and out.split() == ["apache-2.0", link]
    assert section(show(capsys, path)[1], "License") == {"apache-2.0": "", link: ""}
    # No general.file_type: named after the type holding most weights, as llama.cpp guesses.
    by_type = {}
    for tensor in GGUFReader(str(source)).tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    assert show_json(capsys, path)["details"]["quantization_level"] == max(by_type, key=by_type.get)


def test_split_gguf_counts_every_shard(fixtures, capsys, tmp_path):
    from test_loading_gguf import rewrite_gguf

    source = fixtures / "tiny" / "moe-Q4_K_M.gguf"
    rewrite_gguf(source, tmp_path / "moe.gguf", split_max_tensors=40)
    shards = sorted(tmp_path.glob("moe-*-of-*.gguf"))
    assert len(shards) > 1
    count = sum(int(tensor.n_elements) for tensor in GGUFReader(str(source)).tensors)
    for shard in (shards[0], shards[-1]):
        shown = show_json(capsys, shard)
        assert shown["model_info"]["general.parameter_count"] == count
        assert shown["details"]["quantization_level"] == "Q4_K_M"


def test_a_pulled_tag_shows_its_model_and_projector(fixtures, capsys, tmp_path, monkeypatch):
    from qwen35.hub.manifest import Entry, Manifest

    monkeypatch.setenv("QWEN35_HOME", str(tmp_path / "home"))
    model, mmproj = fixtures / "tiny" / "moe-Q4_K_M.gguf", fixtures / "tiny" / "moe-mmproj-F32.gguf"
    entry = Entry(name="qwen3.5:35b-a3b-q4_k_m", repo="unsloth/Qwen3.5-35B-A3B-GGUF", revision="0" * 40,
                  format="gguf", quant="Q4_K_M", files=[str(model)], path=str(model), mmproj=str(mmproj),
                  size=1, pulled_at=datetime.now(timezone.utc).isoformat())
    with Manifest.editing() as manifest:
        manifest.add(entry, ("qwen3.5:35b-a3b",))
    projector = GGUFReader(str(mmproj))
    shown = show_json(capsys, "qwen3.5:35b-a3b")
    assert "vision" in shown["capabilities"]
    assert shown["projector_info"]["general.parameter_count"] == sum(int(t.n_elements) for t in projector.tensors)
    assert shown["projector_info"]["clip.vision.embedding_length"] == \
        projector.fields["clip.vision.embedding_length"].contents()
    assert "# FROM qwen3.5:35b-a3b-q4_k_m\n" in show(capsys, "qwen3.5:35b-a3b", "--modelfile")[1]


@pytest.mark.parametrize("make_model,message", [
    (lambda fixtures, tmp: tmp / "missing.gguf", "no model at"),
    (lambda fixtures, tmp: "qwen3.5:27b-q8_0", "is not pulled"),
    (lambda fixtures, tmp: _write(tmp / "notes.txt", b"just some text, not a model file\n"), "not a GGUF file"),
    (lambda fixtures, tmp: _write(tmp / "short.gguf", b"GGUF"), "not a GGUF file"),
    (lambda fixtures, tmp: fixtures / "tiny" / "dense-mmproj-F32.gguf", "vision projector"),
    (lambda fixtures, tmp: fixtures / "tokenizer" / "ggml-vocab-qwen35.gguf", "holds no tensors"),
    (lambda fixtures, tmp: tmp, "no config.json"),
])
def test_bad_input_is_one_line_and_exit_1(fixtures, capsys, tmp_path, monkeypatch, make_model, message):
    monkeypatch.setenv("QWEN35_HOME", str(tmp_path / "home"))
    code, out, err = show(capsys, make_model(fixtures, tmp_path))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_show_reads_headers_only_without_torch(fixtures):
    # The show command itself (cli.py's parser is left out: it builds every subcommand's flags).
    path = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    script = ("import argparse, sys; from qwen35.hub import show_command; parser = argparse.ArgumentParser(); "
              "show_command.add_arguments(parser); code = show_command.run(parser.parse_args(sys.argv[1:])); "
              "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, str(path), "-v"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Q4_K_M" in result.stdout


@pytest.mark.parametrize("model,mmproj", [("dense-Q4_K_M.gguf", "dense-mmproj-F32.gguf"), ("hf", None)])
def test_api_show_agrees_with_show_json(fixtures, capsys, hf_copy, model, mmproj):
    """The server's /api/show of a loaded model and `qwen35 show --json` of its files: one answer, which
    the official ollama client reads."""
    from fastapi.testclient import TestClient
    from ollama._types import ShowResponse

    from qwen35 import load_model
    from qwen35.server.app import ServerState, create_app

    path = hf_copy if model == "hf" else fixtures / "tiny" / model
    projector = fixtures / "tiny" / mmproj if mmproj else None
    loaded = load_model(path, mmproj=projector, precision="reference")
    state = ServerState(model=loaded, tokenizer=None, service=None, model_name="tiny", model_path=str(path))
    served = TestClient(create_app(state)).post("/api/show", json={"model": "tiny"}).json()
    shown = show_json(capsys, path, *(["--mmproj", projector] if projector else []))
    for key in ("details", "model_info", "capabilities", "parameters", "template", "license", "modified_at"):
        assert served[key] == shown[key], key
    # Qwen's published defaults for a GGUF (it carries none); the checkpoint's own for an HF directory.
    expected = {"temperature": 0.6, "top_k": 20, "top_p": 0.95} if model != "hf" else \
        {key: GENERATION_CONFIG[key] for key in ("temperature", "top_k", "top_p", "repetition_penalty")}
    assert loaded.generation_defaults == expected
    assert "vision" in served["capabilities"]
    parsed = ShowResponse.model_validate(served)
    assert parsed.capabilities == served["capabilities"] and parsed.details.quantization_level
