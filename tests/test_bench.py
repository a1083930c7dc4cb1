"""`qwen35 bench`: the JSON it promises, the token counts it was asked for, its errors.

Timing values are not checked (they depend on the machine); what is checked is the
shape of the report, and the decode byte count against gguf-py's own reader of the file.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
from gguf import GGUFReader

from qwen35.cli import main

REQUIRED = {"pp_tok_s": float, "tg_tok_s": float, "n_prompt": int, "n_gen": int, "threads": int,
            "peak_rss_bytes": int}


def _bench_json(capsys, *args) -> dict:
    assert main(["bench", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_has_the_asked_counts(fixtures, capsys):
    model = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    report = _bench_json(capsys, model, "-p", 7, "-n", 3, "-r", 2, "-t", 1, "--no-bandwidth")
    for key, kind in REQUIRED.items():
        assert isinstance(report[key], kind), key
    assert (report["n_prompt"], report["n_gen"], report["threads"], report["repetitions"]) == (7, 3, 1, 2)
    assert len(report["pp_samples"]) == len(report["tg_samples"]) == 2
    assert report["pp_tok_s"] > 0 and report["tg_tok_s"] > 0
    assert report["pp_tok_s"] == statistics.median(report["pp_samples"])
    assert report["tg_tok_s"] == statistics.median(report["tg_samples"])
    assert report["peak_rss_bytes"] > model.stat().st_size
    assert report["model_bytes"] == model.stat().st_size
    assert report["bandwidth_bytes_s"] is None and report["tg_roofline_fraction"] is None


def test_skipping_a_test_and_the_warm_up(fixtures, capsys):
    report = _bench_json(capsys, fixtures / "tiny" / "moe-Q4_K_M.gguf", "-p", 0, "-n", 2, "-r", 1, "-t", 1,
                         "--no-warmup", "--no-bandwidth")
    assert report["pp_tok_s"] is None and report["pp_samples"] == []
    assert report["n_gen"] == 2 and len(report["tg_samples"]) == 1
    assert report["architecture"] == "qwen35moe"


def test_table_with_bandwidth_and_roofline(fixtures, capsys):
    assert main(["bench", str(fixtures / "tiny" / "dense-Q4_K_M.gguf"), "-p", "5", "-n", "2", "-r", "1", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "| pp5 " in out and "| tg2 " in out
    assert "measured read bandwidth" in out and "decode roofline" in out


def _reference_decode_bytes(path) -> float:
    """Weights a decoded token reads, counted with gguf-py's reader: every main-model tensor,
    routed experts at top-k of E, one row of an untied embedding, no MTP block."""
    reader = GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
    arch = fields["general.architecture"]
    n_layers = fields[f"{arch}.block_count"] - fields.get(f"{arch}.nextn_predict_layers", 0)
    share = fields.get(f"{arch}.expert_used_count", 1) / fields.get(f"{arch}.expert_count", 1)
    names = {t.name for t in reader.tensors}
    total = 0.0
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= n_layers:
            continue
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            total += tensor.n_bytes / int(tensor.shape[1])
        elif "_exps." in tensor.name:
            total += tensor.n_bytes * share
        else:
            total += tensor.n_bytes
    return total


@pytest.mark.parametrize("name", ["dense-Q4_K_M.gguf", "moe-Q4_K_M.gguf"])
def test_decode_bytes_per_token_counts_what_a_token_reads(fixtures, name):
    from qwen35.bench import decode_bytes_per_token

    path = fixtures / "tiny" / name
    assert math.isclose(decode_bytes_per_token(path), _reference_decode_bytes(path), abs_tol=1)


@pytest.mark.parametrize("args,message", [
    (["-r", "0"], "-r must be at least 1"),
    (["-t", "0"], "-t must be at least 1"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
])
def test_bad_arguments_are_one_line_errors(fixtures, capsys, args, message):
    assert main(["bench", str(fixtures / "tiny" / "dense-Q4_K_M.gguf"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_is_an_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "absent.gguf")]) == 1
    assert "no model at" in capsys.readouterr().err
