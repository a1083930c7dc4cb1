"""`qwen35 pull / list / rm` against a fake hub driven by the real huggingface_hub client.

References: the fixture files' own bytes (what the fake hub served is what must land on disk),
the naming conventions of Ollama tags, llama.cpp's `-hf` and the GGUF publishers (unsloth,
bartowski, gguf-split) written out by hand below, and huggingface_hub's own behaviour (its
cache layout, its resume of a dropped transfer with a Range request).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from fake_hub import FakeHub
from qwen35.errors import Qwen35Error, UnknownNameError
from qwen35.hub import pull as pull_module
from qwen35.hub.files import SelectionError, choose_mmproj, gguf_quant, select_gguf, select_snapshot
from qwen35.hub.manifest import Manifest, manifest_path
from qwen35.hub.pull import DiskSpaceError, HubError, pull, resolve_model
from qwen35.hub.tags import ModelRefError, parse_model_ref
from qwen35.plan.hardware import build_hardware

MOE_REPO = "unsloth/Qwen3.5-35B-A3B-GGUF"
SPLIT_REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


@pytest.fixture(scope="module")
def tiny(fixtures) -> Path:
    return fixtures / "tiny"


@pytest.fixture(scope="module")
def hub(tiny):
    dense_q4 = (tiny / "dense-Q4_K_M.gguf").read_bytes()
    third = len(dense_q4) // 3
    with FakeHub() as hub:
        hub.add_repo(MOE_REPO, {
            "README.md": b"# Qwen3.5-35B-A3B GGUF\n", ".gitattributes": b"*.gguf filter=lfs\n",
            "Qwen3.5-35B-A3B-Q4_K_M.gguf": tiny / "moe-Q4_K_M.gguf",
            "Qwen3.5-35B-A3B-Q8_0.gguf": tiny / "dense-Q8_0.gguf",
            "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf": tiny / "dense-Q4_0.gguf",
            "mmproj-F32.gguf": tiny / "moe-mmproj-F32.gguf",
        })
        hub.add_repo(SPLIT_REPO, {  # one complete split set, one with a shard missing
            **{f"Q4_K_M/Qwen3.5-122B-A10B-Q4_K_M-{i + 1:05d}-of-00003.gguf": dense_q4[i * third:(i + 1) * third
                                                                                 if i < 2 else None]
               for i in range(3)},
            "Q8_0/Qwen3.5-122B-A10B-Q8_0-00001-of-00002.gguf": b"GGUF shard one of two",
        })
        hub.add_repo("bartowski/Qwen_Qwen3.5-27B-GGUF", {
            "Qwen_Qwen3.5-27B-IQ4_XS.gguf": tiny / "dense-IQ4_XS.gguf",
            "Qwen_Qwen3.5-27B-Q4_K_M.gguf": tiny / "dense-Q4_K_M.gguf",
            "Qwen_Qwen3.5-27B-Q2_K.gguf": tiny / "dense-Q2_K.gguf",
        })
        hub.add_repo("someone/only-q8-GGUF", {"tiny-dense-Q8_0.gguf": tiny / "dense-Q8_0.gguf"})
        hub.add_repo("unsloth/Qwen3.5-27B-GGUF", {"Qwen3.5-27B-Q8_0.gguf": tiny / "dense-Q8_0.gguf",
                                                  "Qwen3.5-27B-Q3_K_M.gguf": tiny / "dense-Q3_K_M.gguf"})
        checkpoint = {p.name: p for p in (tiny / "dense-hf").iterdir()}
        hub.add_repo("someone/tiny-dense", {**checkpoint, "README.md": b"a tiny checkpoint\n"})
        hub.add_repo("Qwen/Qwen3.5-9B", checkpoint)
        hub.add_repo("someone/gated-GGUF", {"m-Q4_K_M.gguf": tiny / "dense-Q4_K_M.gguf"}, gated=True)
        yield hub


NO_GPU_1GB = dict(ram_gb=1)  # nothing in the family runs here: the planner has no quant to suggest


@pytest.fixture(autouse=True)
def hub_env(request, tmp_path, monkeypatch):
    """Each test: its own HF cache and manifest, the fake hub as HF_ENDPOINT, a known machine."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("QWEN35_HOME", str(tmp_path / "qwen35-home"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    if "hub" in request.fixturenames:
        hub = request.getfixturevalue("hub")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.requests.clear()
    monkeypatch.setattr(pull_module, "machine_hardware", lambda: build_hardware(detect=False, **NO_GPU_1GB))
    return tmp_path


# --- names ---------------------------------------------------------------------------------------

Parsed = namedtuple("Parsed", "size quant repo name")

# Ollama's tag grammar (model:size-quant, lower case, fp16 for F16) and unsloth's repo names.
FAMILY_TAGS = {
    "qwen3.5:35b-a3b": Parsed("35b-a3b", None, "unsloth/Qwen3.5-35B-A3B-GGUF", "qwen3.5:35b-a3b"),
    "Qwen3.5:35B-A3B-Q4_K_M": Parsed("35b-a3b", "Q4_K_M", "unsloth/Qwen3.5-35B-A3B-GGUF", "qwen3.5:35b-a3b-q4_k_m"),
    "qwen3.5:27b": Parsed("27b", None, "unsloth/Qwen3.5-27B-GGUF", "qwen3.5:27b"),
    "qwen3.5:27b-q8_0": Parsed("27b", "Q8_0", "unsloth/Qwen3.5-27B-GGUF", "qwen3.5:27b-q8_0"),
    "qwen3.5:27b-ud-q4_k_xl": Parsed("27b", "UD-Q4_K_XL", "unsloth/Qwen3.5-27B-GGUF", "qwen3.5:27b-ud-q4_k_xl"),
    "qwen3.5:9b-bf16": Parsed("9b", "BF16", "unsloth/Qwen3.5-9B-GGUF", "qwen3.5:9b-bf16"),
    "qwen3.5:9b-fp16": Parsed("9b", "F16", "unsloth/Qwen3.5-9B-GGUF", "qwen3.5:9b-f16"),
    "qwen3.5:0.8b-q8_0": Parsed("0.8b", "Q8_0", "unsloth/Qwen3.5-0.8B-GGUF", "qwen3.5:0.8b-q8_0"),
    "qwen3.5:122b-a10b-iq4_xs": Parsed("122b-a10b", "IQ4_XS", "unsloth/Qwen3.5-122B-A10B-GGUF",
                                       "qwen3.5:122b-a10b-iq4_xs"),
    " qwen3.5:397b-a17b-q2_k ": Parsed("397b-a17b", "Q2_K", "unsloth/Qwen3.5-397B-A17B-GGUF",
                                       "qwen3.5:397b-a17b-q2_k"),
}


@pytest.mark.parametrize("text", sorted(FAMILY_TAGS))
def test_family_tags_name_a_size_quant_and_unsloth_repo(text):
    expected = FAMILY_TAGS[text]
    ref = parse_model_ref(text)
    assert (ref.size, ref.quant, ref.hub_repo, ref.name) == expected
    assert ref.repo is None and not ref.pick


@pytest.mark.parametrize("text", ["qwen3.5", "QWEN3.5:latest"])
def test_bare_family_name_is_the_planners_pick(text):
    ref = parse_model_ref(text)
    assert ref.pick and ref.size is None and ref.quant is None
    assert ref.name == "qwen3.5:latest"


def test_safetensors_format_names_qwens_own_repo():
    ref = parse_model_ref("qwen3.5:9b").with_options(format="safetensors")
    assert (ref.hub_repo, ref.name) == ("Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-9B")
    assert parse_model_ref("qwen3.5:35b-a3b").with_options(format="safetensors").hub_repo == "Qwen/Qwen3.5-35B-A3B"


# llama.cpp -hf (owner/name[:quant], quant case-insensitive) and Ollama's hf.co/ form.
REPO_REFS = {
    "unsloth/Qwen3.5-35B-A3B-GGUF": ("unsloth/Qwen3.5-35B-A3B-GGUF", None, "unsloth/Qwen3.5-35B-A3B-GGUF"),
    "unsloth/Qwen3.5-35B-A3B-GGUF:Q4_K_M": ("unsloth/Qwen3.5-35B-A3B-GGUF", "Q4_K_M",
                                            "unsloth/Qwen3.5-35B-A3B-GGUF:Q4_K_M"),
    "unsloth/Qwen3.5-35B-A3B-GGUF:q4_k_m": ("unsloth/Qwen3.5-35B-A3B-GGUF", "Q4_K_M",
                                            "unsloth/Qwen3.5-35B-A3B-GGUF:Q4_K_M"),
    "unsloth/Qwen3.5-35B-A3B-GGUF:UD-Q4_K_XL": ("unsloth/Qwen3.5-35B-A3B-GGUF", "UD-Q4_K_XL",
                                                "unsloth/Qwen3.5-35B-A3B-GGUF:UD-Q4_K_XL"),
    "hf.co/bartowski/Qwen_Qwen3.5-27B-GGUF:IQ4_XS": ("bartowski/Qwen_Qwen3.5-27B-GGUF", "IQ4_XS",
                                                     "bartowski/Qwen_Qwen3.5-27B-GGUF:IQ4_XS"),
    "hf.co/bartowski/Qwen_Qwen3.5-27B-GGUF:latest": ("bartowski/Qwen_Qwen3.5-27B-GGUF", None,
                                                     "bartowski/Qwen_Qwen3.5-27B-GGUF"),
    "https://huggingface.co/Qwen/Qwen3.5-9B": ("Qwen/Qwen3.5-9B", None, "Qwen/Qwen3.5-9B"),
    "huggingface.co/Qwen/Qwen3.5-9B/": ("Qwen/Qwen3.5-9B", None, "Qwen/Qwen3.5-9B"),
    "https://huggingface.co/unsloth/Qwen3.5-9B-GGUF/tree/main": ("unsloth/Qwen3.5-9B-GGUF", None,
                                                                 "unsloth/Qwen3.5-9B-GGUF"),
    "a_b.c/x-1.2_y": ("a_b.c/x-1.2_y", None, "a_b.c/x-1.2_y"),
}


@pytest.mark.parametrize("text", sorted(REPO_REFS))
def test_hub_repo_references(text):
    ref = parse_model_ref(text)
    assert (ref.repo, ref.quant, ref.name) == REPO_REFS[text]
    assert ref.size is None and not ref.pick


# text -> (error class, words the one-line message must hold)
BAD_REFS = {
    "": (ModelRefError, "qwen3.5:SIZE"),
    "llama3": (ModelRefError, "owner/name"),
    "qwen3.5:30b": (UnknownNameError, "35b-a3b"),  # names the sizes there are
    "qwen3.5:large": (UnknownNameError, "27b"),
    "qwen3.5:27b-q4_k_q": (UnknownNameError, "Q4_K_M"),  # lists the quants there are
    "qwen3.5:27b-": (ModelRefError, "qwen3.5:SIZE"),
    "owner/na me": (ModelRefError, "owner/name"),
    "a/b/c": (ModelRefError, "owner/name"),
    "owner/-bad": (ModelRefError, "not a hub repo id"),
    "own--er/x": (ModelRefError, "'--'"),
    "owner/x..y": (ModelRefError, "'..'"),
    "/name": (ModelRefError, "not a hub repo id"),
    "owner/" + "x" * 97: (ModelRefError, "96"),
    "unsloth/X-GGUF:Q4 K": (ModelRefError, "not a quant name"),
    "https://example.com/owner/name": (ModelRefError, "not a Hugging Face address"),
}


@pytest.mark.parametrize("text", sorted(BAD_REFS))
def test_bad_references_say_what_is_accepted(text):
    kind, words = BAD_REFS[text]
    with pytest.raises(kind) as caught:
        parse_model_ref(text)
    assert words in one_line(caught.value)


def test_quant_options_must_agree_with_the_tag():
    assert parse_model_ref("qwen3.5:27b").with_options(quant="q8_0").name == "qwen3.5:27b-q8_0"
    assert parse_model_ref("qwen3.5:27b-q8_0").with_options(quant="Q8_0").quant == "Q8_0"
    with pytest.raises(ModelRefError, match="--quant says Q4_K_M"):
        parse_model_ref("qwen3.5:27b-q8_0").with_options(quant="q4_k_m")
    with pytest.raises(ModelRefError, match="not quantized"):
        parse_model_ref("qwen3.5:27b-q8_0").with_options(format="safetensors")
    with pytest.raises(UnknownNameError, match="known: "):
        parse_model_ref("qwen3.5:27b").with_options(quant="q9_9")


# --- file choice ---------------------------------------------------------------------------------

# GGUF file names as published: unsloth, bartowski, Qwen (lower case), TheBloke (dot), gguf-split
# shards in a quant folder, Unsloth Dynamic quants, projectors.
FILE_QUANTS = {
    "Qwen3.5-35B-A3B-Q4_K_M.gguf": "Q4_K_M",
    "Q4_K_M/Qwen3.5-122B-A10B-Q4_K_M-00001-of-00003.gguf": "Q4_K_M",
    "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf": "UD-Q4_K_XL",
    "UD-Q2_K_XL/Qwen3.5-397B-A17B-UD-Q2_K_XL-00002-of-00005.gguf": "UD-Q2_K_XL",
    "Qwen_Qwen3.5-27B-Q4_K_M.gguf": "Q4_K_M",
    "Qwen_Qwen3.5-27B-IQ4_XS.gguf": "IQ4_XS",
    "qwen3.5-9b-instruct-q8_0.gguf": "Q8_0",
    "Qwen3.5-27B-BF16-00001-of-00002.gguf": "BF16",
    "llama-2-7b.Q4_K_M.gguf": "Q4_K_M",
    "gpt-oss-20b-MXFP4_MOE.gguf": "MXFP4_MOE",
    "mmproj-F16.gguf": "F16",
    "mmproj-model-f16.gguf": "F16",
}


@pytest.mark.parametrize("path", sorted(FILE_QUANTS))
def test_quant_from_published_file_names(path):
    assert gguf_quant(path) == FILE_QUANTS[path]


UNSLOTH_LISTING = ["Qwen3.5-35B-A3B-Q4_K_M.gguf", "Qwen3.5-35B-A3B-UD-Q4_K_M.gguf", "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf",
                   "Qwen3.5-35B-A3B-Q4_K_S.gguf", "mmproj-F16.gguf", "mmproj-F32.gguf", "README.md"]


@pytest.mark.parametrize("quant, expected", [
    ("Q4_K_M", "Qwen3.5-35B-A3B-Q4_K_M.gguf"),  # not the UD-Q4_K_M file
    ("q4_k_m", "Qwen3.5-35B-A3B-Q4_K_M.gguf"),
    ("UD-Q4_K_M", "Qwen3.5-35B-A3B-UD-Q4_K_M.gguf"),
    ("UD-Q4_K_XL", "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf"),
    ("Q4_K_S", "Qwen3.5-35B-A3B-Q4_K_S.gguf"),
])
def test_a_quant_picks_exactly_its_file(quant, expected):
    selection = select_gguf(UNSLOTH_LISTING, quant)
    assert selection.files == (expected,)
    assert selection.mmproj == "mmproj-F16.gguf"


def test_a_missing_quant_lists_what_the_repo_has():
    with pytest.raises(SelectionError) as caught:
        select_gguf(UNSLOTH_LISTING, "Q8_0")
    assert "Q4_K_M, Q4_K_S, UD-Q4_K_M, UD-Q4_K_XL" in one_line(caught.value)
    with pytest.raises(SelectionError):
        select_gguf(UNSLOTH_LISTING, "XL")  # a suffix of a quant is not a quant
    with pytest.raises(SelectionError, match="several Q4_K_M models"):
        select_gguf(["Qwen3.5-27B-Q4_K_M.gguf", "Q4_K_M/Qwen3.5-27B-Q4_K_M-00001-of-00001.gguf"], "Q4_K_M")


@pytest.mark.parametrize("projectors, expected", [
    (["mmproj-F32.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf"], "mmproj-F16.gguf"),
    (["mmproj-F32.gguf", "mmproj-BF16.gguf"], "mmproj-BF16.gguf"),
    (["mmproj-F32.gguf"], "mmproj-F32.gguf"),
    (["mmproj-Qwen3.5-27B-Q8_0.gguf"], "mmproj-Qwen3.5-27B-Q8_0.gguf"),
    ([], None),
])
def test_mmproj_preference_follows_llama_cpp(projectors, expected):
    assert choose_mmproj(["Qwen3.5-27B-Q4_K_M.gguf", *projectors]) == expected
    assert select_gguf(["Qwen3.5-27B-Q4_K_M.gguf", *projectors], "Q4_K_M", mmproj=False).mmproj is None


def test_split_sets_are_whole_and_in_order():
    listing = [f"Q4_K_M/M-Q4_K_M-0000{i}-of-00003.gguf" for i in (3, 1, 2)]
    assert select_gguf(listing, "Q4_K_M").files == tuple(sorted(listing))
    with pytest.raises(SelectionError) as caught:
        select_gguf(listing[:2], "Q4_K_M")  # shard 2 missing
    assert "2 of 3 shards" in one_line(caught.value) and "00002" in str(caught.value)
    with pytest.raises(SelectionError, match="disagree"):
        select_gguf(["M-Q8_0-00001-of-00002.gguf", "M-Q8_0-00002-of-00003.gguf"], "Q8_0")


def test_snapshot_takes_weights_config_and_tokenizer_only():
    listing = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "generation_config.json", "preprocessor_config.json", "README.md", "original/consolidated.pth",
               "onnx/model.onnx", ".gitattributes"]
    assert set(select_snapshot(listing).files) == set(listing[:9])
    with pytest.raises(SelectionError, match="neither GGUF files nor a safetensors checkpoint"):
        select_snapshot(["README.md", "pytorch_model.bin", "config.json"])


# --- pulling from the fake hub -------------------------------------------------------------------


def test_pull_family_tag_with_quant_downloads_that_file_and_its_mmproj(hub, tiny):
    entry = pull("qwen3.5:35b-a3b-q8_0")
    assert entry.name == "qwen3.5:35b-a3b-q8_0" and entry.quant == "Q8_0" and entry.repo == MOE_REPO
    assert entry.revision == hub.repos[MOE_REPO].sha and entry.format == "gguf"
    assert sha256(entry.files[0]) == sha256(tiny / "dense-Q8_0.gguf")
    assert sha256(entry.mmproj) == sha256(tiny / "moe-mmproj-F32.gguf")
    assert entry.size == (tiny / "dense-Q8_0.gguf").stat().st_size + (tiny / "moe-mmproj-F32.gguf").stat().st_size
    # huggingface_hub's cache layout, so huggingface-cli and friends see the same files
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert Path(entry.path) == cache / "models--unsloth--Qwen3.5-35B-A3B-GGUF" / "snapshots" / entry.revision / \
        "Qwen3.5-35B-A3B-Q8_0.gguf"
    # ... and huggingface_hub's own offline lookup of the branch finds them (refs/main written)
    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache(MOE_REPO, "Qwen3.5-35B-A3B-Q8_0.gguf", cache_dir=cache) == entry.path
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.downloads()}
    assert fetched == {"Qwen3.5-35B-A3B-Q8_0.gguf", "mmproj-F32.gguf"}  # not the other quants, not README
    assert all(f"/resolve/{entry.revision}/" in r.path for r in hub.downloads())  # one commit for all files
    saved = json.loads(manifest_path().read_text())
    assert saved["models"]["qwen3.5:35b-a3b-q8_0"]["files"] == entry.files and saved["aliases"] == {}


def test_pull_without_quant_takes_q4_k_m_when_the_planner_has_nothing_here(hub, tiny):
    said = []
    entry = pull("qwen3.5:35b-a3b", mmproj=False, announce=said.append)
    assert entry.name == "qwen3.5:35b-a3b-q4_k_m" and entry.mmproj is None
    assert sha256(entry.path) == sha256(tiny / "moe-Q4_K_M.gguf")
    assert "Q4_K_M" in said[0]
    manifest = Manifest.load()
    assert manifest.aliases == {"qwen3.5:35b-a3b": "qwen3.5:35b-a3b-q4_k_m"}  # the short tag, as Ollama keeps it
    assert manifest.get("qwen3.5:35b-a3b").files == entry.files


def expected_planner_quant(hardware, size):
    """What `qwen35 plan --model SIZE` picks on `hardware`: computed by the planner, not by pull."""
    from qwen35.plan import advisor
    from qwen35.plan.catalog import find_model
    from qwen35.plan.estimator import Request

    return advisor.best_for_model(find_model(size), Request(), hardware, advisor.DEFAULT_MIN_SPEED).mix


def test_pull_without_quant_takes_the_planners_best_for_this_machine(tiny, monkeypatch):
    hardware = build_hardware(gpu="h100", detect=False)
    monkeypatch.setattr(pull_module, "machine_hardware", lambda: hardware)
    best = expected_planner_quant(hardware, "9b")
    assert best != "Q4_K_M"  # else this test could not tell the planner from the default
    with FakeHub() as hub:
        hub.add_repo("unsloth/Qwen3.5-9B-GGUF", {f"Qwen3.5-9B-{best}.gguf": tiny / "dense-Q8_0.gguf",
                                                 "Qwen3.5-9B-Q4_K_M.gguf": tiny / "dense-Q4_K_M.gguf"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        entry = pull("qwen3.5:9b")
        assert entry.quant == best and sha256(entry.path) == sha256(tiny / "dense-Q8_0.gguf")
        assert Manifest.load().aliases == {"qwen3.5:9b": f"qwen3.5:9b-{best.lower()}"}
        # The planner's quant missing from the repo: the usual default instead.
        hub.add_repo("unsloth/Qwen3.5-9B-GGUF", {"Qwen3.5-9B-Q4_K_M.gguf": tiny / "dense-Q4_K_M.gguf"})
        assert pull("qwen3.5:9b").quant == "Q4_K_M"


def test_bare_family_name_pulls_the_planners_pick(tiny, monkeypatch):
    from qwen35.plan import advisor
    from qwen35.plan.estimator import Request

    hardware = build_hardware(gpu="3090", ram_gb=64, detect=False)
    monkeypatch.setattr(pull_module, "machine_hardware", lambda: hardware)
    pick = advisor.recommend(hardware, Request()).pick
    size, quant = pick.spec.name.upper(), pick.mix
    with FakeHub() as hub:
        hub.add_repo(f"unsloth/Qwen3.5-{size}-GGUF", {f"Qwen3.5-{size}-{quant}.gguf": tiny / "moe-Q4_K_M.gguf",
                                                      f"Qwen3.5-{size}-Q2_K.gguf": tiny / "dense-Q2_K.gguf"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        said = []
        entry = pull("qwen3.5", announce=said.append)
    assert entry.name == f"qwen3.5:{size.lower()}-{quant.lower()}"
    assert f"qwen3.5:{size.lower()} at {quant}" in said[0]  # says what it chose
    assert Manifest.load().get("qwen3.5:latest").name == entry.name
    monkeypatch.setattr(pull_module, "machine_hardware", lambda: build_hardware(detect=False, **NO_GPU_1GB))
    with pytest.raises(Qwen35Error, match="no Qwen 3.5 model fits this machine"):
        pull("qwen3.5")


def test_pull_by_repo_and_quant_and_the_repo_defaults(hub, tiny):
    entry = pull("hf.co/bartowski/Qwen_Qwen3.5-27B-GGUF:iq4_xs")
    assert entry.name == "bartowski/Qwen_Qwen3.5-27B-GGUF:IQ4_XS" and entry.mmproj is None
    assert sha256(entry.path) == sha256(tiny / "dense-IQ4_XS.gguf")
    plain = pull("bartowski/Qwen_Qwen3.5-27B-GGUF")  # no quant: Q4_K_M, as llama.cpp -hf takes
    assert plain.quant == "Q4_K_M" and sha256(plain.path) == sha256(tiny / "dense-Q4_K_M.gguf")
    assert Manifest.load().aliases["bartowski/Qwen_Qwen3.5-27B-GGUF"] == "bartowski/Qwen_Qwen3.5-27B-GGUF:Q4_K_M"
    only = pull("someone/only-q8-GGUF")  # no Q4_K_M, a single quant: that one
    assert only.quant == "Q8_0" and sha256(only.path) == sha256(tiny / "dense-Q8_0.gguf")


def test_split_set_downloads_whole_and_an_incomplete_one_is_refused(hub, tiny):
    entry = pull(f"{SPLIT_REPO}:Q4_K_M")
    assert [Path(f).name for f in entry.files] == [f"Qwen3.5-122B-A10B-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert entry.path == entry.files[0]
    joined = b"".join(Path(f).read_bytes() for f in entry.files)
    assert hashlib.sha256(joined).hexdigest() == sha256(tiny / "dense-Q4_K_M.gguf")
    hub.requests.clear()
    with pytest.raises(SelectionError) as caught:
        pull("qwen3.5:122b-a10b-q8_0")
    assert "incomplete split set" in one_line(caught.value) and "1 of 2" in str(caught.value)
    assert hub.downloads() == []


def test_safetensors_snapshot_from_a_repo_without_gguf_loads(hub, tiny):
    import qwen35

    entry = pull("someone/tiny-dense")
    assert entry.format == "safetensors" and entry.quant is None and entry.name == "someone/tiny-dense"
    snapshot = Path(entry.path)
    assert snapshot.is_dir() and snapshot.name == entry.revision
    for source in (tiny / "dense-hf").iterdir():
        assert sha256(snapshot / source.name) == sha256(source)
    assert not (snapshot / "README.md").exists()
    # The pulled checkpoint is the fixture's network: transformers' logits on it (fixtures/ref).
    import numpy as np

    model = qwen35.load_model(snapshot, precision="reference")
    ids = json.loads((tiny.parent / "ref" / "dense.json").read_text())["sequences"]["chat_think"]["ids"]
    expected = np.load(tiny.parent / "ref" / "dense.chat_think.transformers.logits.npy")
    assert np.abs(model.logits(ids) - expected).max() <= 2e-3
    family = pull("qwen3.5:9b", format="safetensors")  # Qwen's own bf16 repo
    assert (family.name, family.repo, family.format) == ("Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-9B", "safetensors")
    with pytest.raises(SelectionError, match="no GGUF files"):
        pull("someone/tiny-dense:Q4_K_M")


def test_a_second_pull_downloads_nothing(hub):
    first = pull(f"{MOE_REPO}:Q4_K_M")
    assert len(hub.downloads(MOE_REPO)) == 2  # the model and its mmproj
    hub.requests.clear()
    second = pull(f"{MOE_REPO}:Q4_K_M")
    assert second.files == first.files and second.mmproj == first.mmproj
    assert [r.method for r in hub.requests] == ["GET"] and "/api/models/" in hub.requests[0].path  # the listing only


def test_an_interrupted_download_resumes_and_ends_byte_identical(hub, tiny):
    # huggingface_hub writes 10 MiB chunks: drop past the first one so it has something to resume from.
    hub.drops[(MOE_REPO, "Qwen3.5-35B-A3B-Q4_K_M.gguf")] = 11_000_000
    entry = pull("qwen3.5:35b-a3b-q4_k_m", mmproj=False)
    assert sha256(entry.path) == sha256(tiny / "moe-Q4_K_M.gguf")
    gets = hub.downloads(MOE_REPO)
    assert len(gets) == 2 and gets[0].range is None
    assert gets[1].range == f"bytes={10 * 1024 * 1024}-"  # resumed where the kept bytes ended, not from 0


def test_hub_errors_are_one_line(hub, monkeypatch):
    with pytest.raises(HubError) as caught:
        pull("nobody/no-such-repo")
    assert "repository nobody/no-such-repo not found" in one_line(caught.value)
    with pytest.raises(SelectionError) as caught:
        pull(f"{MOE_REPO}:Q6_K")
    assert f"no Q6_K GGUF in {MOE_REPO}; it has Q4_K_M, Q8_0, UD-Q4_K_XL" in one_line(caught.value)
    with pytest.raises(SelectionError) as caught:
        pull("qwen3.5:27b")  # no Q4_K_M there and the planner has nothing for this machine
    assert "Q3_K_M, Q8_0" in one_line(caught.value) and "qwen3.5:27b-q3_k_m" in str(caught.value)
    with pytest.raises(HubError) as caught:
        pull("someone/gated-GGUF")
    assert "gated" in one_line(caught.value) and "HF_TOKEN" in str(caught.value)
    monkeypatch.setenv("HF_TOKEN", hub.token)  # huggingface_hub sends it: the gate opens
    assert pull("someone/gated-GGUF").quant == "Q4_K_M"
    assert hub.downloads("someone/gated-GGUF")[-1].authorization == f"Bearer {hub.token}"


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_an_unreachable_hub_is_one_line(monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(HubError) as caught:
        pull("qwen3.5:35b-a3b-q4_k_m")
    assert one_line(caught.value).startswith(f"cannot reach {url}: ") and "HF_ENDPOINT" in str(caught.value)


def test_not_enough_disk_space_stops_before_downloading(hub, monkeypatch):
    import shutil

    pull("qwen3.5:35b-a3b-q8_0", mmproj=False)
    hub.requests.clear()
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(pull_module.shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    with pytest.raises(DiskSpaceError) as caught:
        pull("qwen3.5:35b-a3b-q4_k_m")
    assert "not enough disk space" in one_line(caught.value) and os.environ["HF_HUB_CACHE"] in str(caught.value)
    assert hub.downloads() == []
    assert pull("qwen3.5:35b-a3b-q8_0", mmproj=False).quant == "Q8_0"  # counts only what is missing: nothing


def test_explicit_endpoint_and_cache_dir(hub, tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    entry = pull(f"{MOE_REPO}:Q8_0", endpoint=hub.url, cache_dir=tmp_path / "elsewhere", mmproj=False)
    assert Path(entry.path).is_relative_to(tmp_path / "elsewhere")
    assert sha256(entry.path) == sha256(tiny / "dense-Q8_0.gguf")


# --- resolve_model -------------------------------------------------------------------------------


def test_resolve_a_path_a_pulled_name_and_an_unpulled_one(hub, tiny, monkeypatch):
    path = tiny / "dense-Q8_0.gguf"
    assert resolve_model(str(path)) == pull_module.ResolvedModel(path, None, "dense-Q8_0")
    assert hub.requests == []

    resolved = resolve_model("qwen3.5:35b-a3b-q4_k_m")  # not pulled yet: pulled now, like `ollama run`
    assert sha256(resolved.path) == sha256(tiny / "moe-Q4_K_M.gguf")
    assert sha256(resolved.mmproj) == sha256(tiny / "moe-mmproj-F32.gguf")
    assert resolved.name == "qwen3.5:35b-a3b-q4_k_m" and hub.downloads()

    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("Qwen3.5:35B-A3B-Q4_K_M") == resolved  # from the manifest: no request
    assert hub.requests == []
    with pytest.raises(HubError) as caught:
        resolve_model("qwen3.5:35b-a3b-q8_0")
    assert "HF_HUB_OFFLINE" in one_line(caught.value) and "qwen35 pull qwen3.5:35b-a3b-q8_0" in str(caught.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(Qwen35Error, match="is not pulled"):
        resolve_model("qwen3.5:35b-a3b-q8_0", pull_if_missing=False)
    for mistyped in ("no-such-file.gguf", "models/no-such-file.gguf", "./qwen3.5:27b", "~/Qwen3.5-27B"):
        with pytest.raises(Qwen35Error, match="no model at .*: no such file or directory"):
            resolve_model(mistyped)  # a path, never a download
    with pytest.raises(ModelRefError, match="neither a file nor a model name"):
        resolve_model("no-such-thing")
    assert hub.requests == []

    blob = Path(resolved.path).resolve()
    blob.unlink()  # the model's bytes gone from the cache (a dangling link left): pulled again
    assert resolve_model("qwen3.5:35b-a3b-q4_k_m") == resolved and len(hub.downloads()) == 1


# --- the command line ----------------------------------------------------------------------------


def qwen35(*args, env):
    return subprocess.run([sys.executable, "-m", "qwen35.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_pull_list_rm(hub, tmp_path, tiny):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE")
    pulled = qwen35("pull", f"hf.co/{MOE_REPO}:Q4_K_M", env=env)
    assert pulled.returncode == 0, pulled.stderr
    summary, planned = pulled.stdout.strip().splitlines()[-2:]
    assert f"{MOE_REPO}:Q4_K_M" in summary and "qwen35 run unsloth/Qwen3.5-35B-A3B-GGUF:Q4_K_M" in summary
    assert "13.8 MB" in summary  # 12,570,880 + 1,207,296 bytes, in Ollama's decimal units
    # What `qwen35 plan` says of it here, and plan takes the pulled name as it takes the file (headers only).
    assert planned.startswith("on this machine (") and "tok/s decode" in planned
    by_name = qwen35("plan", "--gguf", f"{MOE_REPO}:Q4_K_M", "--json", "--no-detect", env=env)
    by_file = qwen35("plan", "--gguf", str(tiny / "moe-Q4_K_M.gguf"), "--json", "--no-detect", env=env)
    assert by_name.returncode == 0 == by_file.returncode, by_name.stderr
    keys = ("weights_bytes", "mtp_bytes", "kv_cache_bytes", "total_bytes", "params_total")
    assert {k: json.loads(by_name.stdout)[k] for k in keys} == {k: json.loads(by_file.stdout)[k] for k in keys}
    unpulled = qwen35("plan", "--gguf", "qwen3.5:9b-q8_0", env=env)
    assert unpulled.returncode == 1 and "is not pulled" in unpulled.stderr
    assert len(unpulled.stderr.strip().splitlines()) == 1
    blob_dir = tmp_path / "hf-home" / "hub" / "models--unsloth--Qwen3.5-35B-A3B-GGUF" / "blobs"
    assert {sha256(b) for b in blob_dir.iterdir()} == {sha256(tiny / "moe-Q4_K_M.gguf"),
                                                       sha256(tiny / "moe-mmproj-F32.gguf")}

    assert qwen35("pull", "qwen3.5:35b-a3b-q4_k_m", env=env).returncode == 0  # same files, second name
    listed = qwen35("list", env=env)
    assert listed.returncode == 0 and "NAME" in listed.stdout and "MODIFIED" in listed.stdout
    assert "qwen3.5:35b-a3b-q4_k_m" in listed.stdout and "Q4_K_M" in listed.stdout
    rows = json.loads(qwen35("list", "--json", env=env).stdout)
    assert sorted(r["name"] for r in rows) == ["qwen3.5:35b-a3b-q4_k_m", f"{MOE_REPO}:Q4_K_M"]

    removed = qwen35("rm", "qwen3.5:35b-a3b-q4_k_m", env=env)
    assert removed.returncode == 0 and "kept" in removed.stdout  # the other name still uses the files
    assert len(list(blob_dir.iterdir())) == 2
    removed = qwen35("rm", f"{MOE_REPO}:Q4_K_M", env=env)
    assert removed.returncode == 0 and "13.8 MB freed" in removed.stdout
    assert list(blob_dir.iterdir()) == []
    assert json.loads(qwen35("list", "--json", env=env).stdout) == []

    for args, words in ((("rm", "qwen3.5:9b"), "no model named"),
                        (("pull", "nobody/missing"), "not found"),
                        (("pull", "qwen3.5:30b"), "known sizes")):
        failed = qwen35(*args, env=env)
        assert failed.returncode == 1 and words in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr


def test_rm_of_an_alias_removes_the_model_and_all_its_names(hub, monkeypatch):
    from qwen35.cli import main

    entry = pull("qwen3.5:35b-a3b", mmproj=False)  # recorded as q4_k_m plus the short alias
    assert main(["rm", "qwen3.5:35B-A3B"]) == 0
    manifest = Manifest.load()
    assert manifest.models == {} and manifest.aliases == {}
    assert not Path(entry.path).exists() and not Path(entry.path).is_symlink()
    assert main(["rm", "qwen3.5:35b-a3b"]) == 1


def test_rm_of_a_checkpoint_removes_its_snapshot_and_a_broken_list_is_one_line(hub, capsys):
    from qwen35.cli import main

    entry = pull("someone/tiny-dense")
    blobs = Path(entry.path).parent.parent / "blobs"
    assert len(list(blobs.iterdir())) == 6
    assert main(["rm", "someone/tiny-dense"]) == 0
    assert not Path(entry.path).exists() and list(blobs.iterdir()) == []
    manifest_path().write_text("{not json")
    capsys.readouterr()
    assert main(["list"]) == 1
    error = capsys.readouterr().err
    assert "cannot read the model list" in error and len(error.strip().splitlines()) == 1


def test_concurrent_manifest_edits_keep_every_entry(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from qwen35.hub.manifest import Entry

    def add(i):
        with Manifest.editing() as manifest:
            manifest.add(Entry(f"owner/m{i}:Q4_K_M", f"owner/m{i}", "0" * 40, "gguf", "Q4_K_M", [f"/x/{i}.gguf"],
                               f"/x/{i}.gguf", None, i, "2026-01-01T00:00:00+00:00"), (f"owner/m{i}",))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(16)))
    manifest = Manifest.load()
    assert sorted(manifest.models) == sorted(f"owner/m{i}:Q4_K_M" for i in range(16))
    assert manifest.get("owner/m7").size == 7
    assert [p.name for p in manifest_path().parent.iterdir() if p.suffix == ".tmp"] == []


def test_run_serve_and_bench_take_a_tag_pull_it_once_and_bring_its_mmproj(hub, tmp_path, tiny, fixtures):
    """`qwen35 run qwen3.5:35b-a3b-q4_k_m` pulls first, as `ollama run` does, and then answers exactly as
    the same file given by path; the pulled mmproj comes along (an image needs no --mmproj), serve
    names the model by its tag, and bench reuses the pull."""
    import re

    import httpx

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE")
    tag, question = "qwen3.5:35b-a3b-q4_k_m", ["--no-think", "--temp", "0", "-n", "6", "Hello there"]
    by_tag = qwen35("run", tag, *question, env=env)
    assert by_tag.returncode == 0, by_tag.stderr
    assert f"{tag} is not pulled: pulling it" in by_tag.stderr and len(hub.downloads()) == 2  # model + mmproj
    by_path = qwen35("run", str(tiny / "moe-Q4_K_M.gguf"), *question, env=env)
    assert by_path.returncode == 0 and by_tag.stdout == by_path.stdout and by_tag.stdout.strip()

    image = fixtures / "ref" / "moe.vision.image.png"
    ids = json.loads((fixtures / "ref" / "moe.vision.json").read_text())["ids"]
    seen = qwen35("run", tag, "--image", str(image), "--verbose", "-p", "What is in this picture?", "-n", "2",
                  "--no-think", env=env)
    assert seen.returncode == 0, seen.stderr
    assert re.search(rf"prompt {len(ids)} tok", seen.stderr), seen.stderr  # the image's tokens, by transformers
    blind = qwen35("run", tag, "--no-mmproj", "--image", str(image), "-p", "What is in this picture?", env=env)
    assert blind.returncode == 1 and "no vision tower" in blind.stderr

    benched = qwen35("bench", tag, "-p", "8", "-n", "2", "-r", "1", "--no-bandwidth", "--json", env=env)
    assert benched.returncode == 0, benched.stderr
    benched_file = Path(json.loads(benched.stdout)["model"])
    assert benched_file.name == "Qwen3.5-35B-A3B-Q4_K_M.gguf" and sha256(benched_file) == sha256(tiny / "moe-Q4_K_M.gguf")
    assert len(hub.downloads()) == 2  # every command after the first found the pull

    server = subprocess.Popen([sys.executable, "-m", "qwen35.cli", "serve", tag, "--port", "0", "-c", "256",
                               "-np", "1", "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        line = server.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        assert url, (line, server.stderr.read() if server.poll() is not None else "")
        assert [m["id"] for m in httpx.get(url[1] + "/v1/models").json()["data"]] == [tag]
        shown = httpx.post(url[1] + "/api/show", json={"model": tag}).json()
        assert "vision" in shown["capabilities"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("machine", [dict(gpu="4090"), dict(gpu="3090", ram_gb=64), dict(ram_gb=16),
                                     dict(gpu="h100")])
def test_plans_command_names_a_tag_that_pulls_the_planned_size_and_quant(machine):
    """What `qwen35 plan` tells a person to run must be something pull (and serve) understands, naming
    the planner's own size, quant and the repo the comment points at."""
    from qwen35.plan.advisor import recommend
    from qwen35.plan.estimator import Request

    recommendation = recommend(build_hardware(detect=False, **machine), Request(ctx=32768))
    candidates = [recommendation.pick, *recommendation.alternatives]
    assert candidates[0] is not None
    for candidate in candidates:
        command, _, comment = candidate.command().partition("  # from hf.co/")
        words = command.split()
        assert words[:2] == ["qwen35", "serve"]
        ref = parse_model_ref(words[2])
        assert (ref.size, ref.quant, ref.hub_repo) == (candidate.spec.name, candidate.mix, comment)


@pytest.mark.parametrize("name", ["../../evil-Q4_K_M.gguf", "/abs/evil-Q4_K_M.gguf", "sub/../../evil-Q4_K_M.gguf"])
def test_a_hub_listing_a_file_outside_the_repo_is_a_one_line_error(name, tmp_path):
    """A hub (HF_ENDPOINT may be anyone's mirror) that lists a file name escaping the cache: refused in one
    line, as huggingface_hub refuses it, and nothing is written outside the cache."""
    with FakeHub() as evil:
        evil.add_repo("someone/evil-GGUF", {name: b"GGUF" + bytes(64)})
        with pytest.raises(HubError) as caught:
            pull("someone/evil-GGUF:Q4_K_M", cache_dir=tmp_path / "cache", endpoint=evil.url)
    assert "'..'" in one_line(caught.value) or "absolute" in str(caught.value)
    assert not any(path.name == "evil-Q4_K_M.gguf" for path in tmp_path.parent.rglob("evil-Q4_K_M.gguf"))


@pytest.mark.parametrize("request_options", [dict(load_mtp=True), dict(cache_type="q8_0", parallel=2),
                                             dict(load_mtp=True, cache_type="q4_0")])
def test_plans_command_with_the_mtp_layer_or_a_cache_type_is_a_valid_serve_command_line(request_options):
    """`plan --mtp` prices the MTP layer because it will guess tokens: its command turns speculation on; a
    cache type becomes -ctk/-ctv. Every word parses as serve's own flags and passes serve's checks."""
    from qwen35.cli import build_parser
    from qwen35.plan.advisor import recommend
    from qwen35.plan.estimator import Request
    from qwen35.server.command import _check

    recommendation = recommend(build_hardware(detect=False, ram_gb=64), Request(ctx=8192, **request_options))
    command = recommendation.pick.command().partition("  #")[0]
    args = build_parser().parse_args(command.split()[1:])
    _check(args)
    assert (args.spec_type == "draft-mtp") == request_options.get("load_mtp", False)
    assert args.cache_type_k == args.cache_type_v == request_options.get("cache_type", "f16")
