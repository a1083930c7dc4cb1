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


# -- llama-bench's lists, ranges, -pg, -d and output formats -------------------------------------

# Written from llama-bench's README: "512,1024", ranges first-last (+1), first-last+step, first-last*mult.
@pytest.mark.parametrize("text,values", [
    ("512", [512]), ("128,512", [128, 512]), ("128-1024*2", [128, 256, 512, 1024]),
    ("0-8192+4096", [0, 4096, 8192]), ("1-3", [1, 2, 3]), ("0", [0]), ("16, 32", [16, 32]),
])
def test_counts_are_llama_bench_lists_and_ranges(text, values):
    from qwen35.bench import parse_counts

    assert parse_counts(text, "-p") == values


@pytest.mark.parametrize("text", ["abc", "10-1", "0-8*2", "1-5*1", "0-100000+1", "-5", "1,,2"])
def test_bad_counts_are_one_line_errors(text):
    from qwen35.bench import parse_counts
    from qwen35.errors import Qwen35Error

    with pytest.raises(Qwen35Error) as caught:
        parse_counts(text, "-d")
    assert str(caught.value).startswith("-d ") and "\n" not in str(caught.value)


def test_tests_run_in_llama_bench_order_and_names():
    from qwen35.bench import plan_tests

    tests = plan_tests([16, 0, 32], [4], [(16, 4)], [0, 64])
    assert [t.name for t in tests] == ["pp16", "pp32", "tg4", "pp16+tg4",
                                       "pp16 @ d64", "pp32 @ d64", "tg4 @ d64", "pp16+tg4 @ d64"]


def test_depth_fills_the_cache_first_and_every_test_is_reported(fixtures, capsys, monkeypatch):
    """-d 24: each repetition's cache first takes 24 tokens (untimed), then the test's own; -pg times both."""
    from qwen35.model.api import Model

    seen = []
    forward = Model.forward

    def spy(self, input_ids, cache, *args, **kwargs):
        seen.append((int(cache.lengths.max()), input_ids.shape[1]))
        return forward(self, input_ids, cache, *args, **kwargs)

    monkeypatch.setattr(Model, "forward", spy)
    report = _bench_json(capsys, fixtures / "tiny" / "dense-Q4_K_M.gguf", "-p", 8, "-n", 2, "-pg", "8,2",
                         "-d", "0,24", "-r", 2, "-t", 1, "--no-warmup", "--no-bandwidth")
    tests = report["tests"]
    assert [t["test"] for t in tests] == ["pp8", "tg2", "pp8+tg2", "pp8 @ d24", "tg2 @ d24", "pp8+tg2 @ d24"]
    assert [(t["n_prompt"], t["n_gen"], t["n_depth"]) for t in tests] == [
        (8, 0, 0), (0, 2, 0), (8, 2, 0), (8, 0, 24), (0, 2, 24), (8, 2, 24)]
    for test in tests:
        assert len(test["samples"]) == 2 and test["tok_s"] == statistics.median(test["samples"])
    one_rep = {  # (cache length before, tokens) of each forward call, per repetition
        "pp8": [(0, 8)], "tg2": [(0, 1), (1, 1)], "pp8+tg2": [(0, 8), (8, 1), (9, 1)],
        "pp8 @ d24": [(0, 24), (24, 8)], "tg2 @ d24": [(0, 24), (24, 1), (25, 1)],
        "pp8+tg2 @ d24": [(0, 24), (24, 8), (32, 1), (33, 1)],
    }
    assert seen == [call for t in tests for call in one_rep[t["test"]] * 2]
    # The first version's keys stay for scripts: the first pp and tg tests.
    assert (report["n_prompt"], report["n_gen"]) == (8, 2)
    assert report["pp_samples"] == tests[0]["samples"] and report["tg_samples"] == tests[1]["samples"]


def test_jsonl_and_csv_give_a_record_per_test(fixtures, capsys):
    import csv
    import io

    model = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    common = [str(model), "-p", "4,8", "-n", "0", "-r", "1", "-t", "1", "--no-bandwidth"]
    assert main(["bench", *common, "-o", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["test"], r["n_prompt"], r["threads"], r["model"]) for r in lines] == [
        ("pp4", 4, 1, str(model)), ("pp8", 8, 1, str(model))]
    assert all(r["tok_s"] > 0 for r in lines)
    assert main(["bench", *common, "-o", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["test"], r["n_prompt"], r["n_depth"]) for r in rows] == [("pp4", "4", "0"), ("pp8", "8", "0")]
    assert all(float(r["tok_s"]) > 0 for r in rows)


@pytest.mark.parametrize("args,message", [
    (["-pg", "512"], "-pg 512: give PP,TG"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-d", "100000000"], "a test needs"),
])
def test_bad_test_lists_are_one_line_errors(fixtures, capsys, args, message):
    assert main(["bench", str(fixtures / "tiny" / "dense-Q4_K_M.gguf"), "-r", "1", "--no-bandwidth", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("drafter", ["mtp", "draft model"])
def test_speculative_decoding_is_timed_on_the_models_own_answer(fixtures, capsys, hf_tokenizer, drafter):
    """--spec-type draft-mtp / -md: the model answers a chat prompt (rendered as transformers renders it),
    plainly and with speculation; the tokens are the same, the guesses counted (the model drafting for itself
    keeps every one)."""
    from qwen35.bench_speculative import DEFAULT_PROMPT

    model = fixtures / "tiny" / "dense-Q4_K_M.gguf"
    flags = ["--spec-type", "draft-mtp"] if drafter == "mtp" else ["-md", model]
    report = _bench_json(capsys, model, "-p", 0, "-n", 6, "-r", 1, "-t", 1, "--no-bandwidth", "--draft-p-min", 0,
                         "--draft-max", 2, *flags)
    (test,) = report["speculative"]
    rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    expected_prompt = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert test["prompt_tokens"] == len(expected_prompt)
    assert test["same_tokens"] is True and test["n_gen"] == 6 and test["draft_max"] == 2
    assert test["tok_s"] > 0 and test["plain_tok_s"] > 0 and test["draft_tokens"] > 0
    if drafter == "draft model":
        assert test["accepted_tokens"] == test["draft_tokens"]
    assert main(["bench", str(model), "-p", "0", "-n", "3", "-r", "1", "-t", "1", "--no-bandwidth", *map(str, flags),
                 "--no-warmup"]) == 0
    assert "tg3 draft" in capsys.readouterr().out
    assert main(["bench", str(model), "-n", "3", "--spec-type", "draft-mtp", "--spec-prompt", "/no/such.txt"]) == 1
    assert "--spec-prompt /no/such.txt" in capsys.readouterr().err
