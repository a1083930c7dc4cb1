"""benchmarks/gpu_placements.py's CPU self-check: the whole script end to end on a 2-layer, 16-expert
35B-A3B-shaped file, its JSON report, and the planner's per-token byte split for each forced
placement against the file's own tensor sizes as gguf-py's reader gives them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_placements  # noqa: E402


def _decode_reads_by_layer(path: Path) -> tuple[dict[int, float], dict[int, float], float, float]:
    """Bytes a decoded token reads, from gguf-py: per text layer (routed experts at top-k / E), of
    which the routed experts, the output head (output.weight, output_norm.weight), one embedding row."""
    reader = GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
    n_layers = fields["qwen35moe.block_count"] - fields.get("qwen35moe.nextn_predict_layers", 0)
    share = fields["qwen35moe.expert_used_count"] / fields["qwen35moe.expert_count"]
    layers: dict[int, float] = {i: 0.0 for i in range(n_layers)}
    experts: dict[int, float] = {i: 0.0 for i in range(n_layers)}
    head = embedding_row = 0.0
    for tensor in reader.tensors:
        if tensor.name.startswith("blk."):
            index = int(tensor.name.split(".")[1])
            if index < n_layers:  # (the MTP block is not read when decoding)
                read = int(tensor.n_bytes) * (share if "_exps." in tensor.name else 1.0)
                layers[index] += read
                experts[index] += read if "_exps." in tensor.name else 0.0
        elif tensor.name == "token_embd.weight":
            embedding_row = int(tensor.n_bytes) / int(tensor.shape[1])
        else:
            head += int(tensor.n_bytes)
    return layers, experts, head, embedding_row


def test_cpu_self_check_reports_each_placement_with_the_planners_byte_split(tmp_path, capsys):
    report_path = tmp_path / "placements.json"
    assert gpu_placements.main(["--device", "cpu", "--layers", "2", "--experts", "16", "--vocab", "1024",
                                "--prompt", "16", "--context", "8", "--steps", "2", "--n-cpu-moe", "0", "1", "2",
                                "--ngl", "1", "--dir", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    out = capsys.readouterr().out
    assert "no split is possible" in out and "| -ngl 1 |" in out and "| --n-cpu-moe 2 |" in out

    # On the CPU the unsplit model is measured once; each placement carries the planner's numbers only.
    assert report["device"] == "cpu" and report["ram_read_GB/s"] > 0
    assert report["unsplit_cpu"]["decode_tok/s"] > 0 and report["unsplit_cpu"]["prefill_tok/s"] > 0
    rows = report["placements"]
    assert [row["flag"] for row in rows] == ["--n-cpu-moe 0", "--n-cpu-moe 1", "--n-cpu-moe 2", "-ngl 1"]
    assert [(row["gpu_layers"], row["cpu_moe_layers"]) for row in rows] == [(None, 0), (None, 1), (None, 2), (1, 0)]
    for row in rows:
        assert "measured" not in row
        assert row["planner"]["decode_tok/s"] > 0 and row["planner"]["prefill_tok/s"] > 0
        assert set(row["planner_measured_ram"]) == {"decode_tok/s", "prefill_tok/s"}

    layers, experts, head, embedding_row = _decode_reads_by_layer(tmp_path / report["model"])
    assert all(experts[i] > 0 for i in layers)
    whole = sum(layers.values()) + head + embedding_row
    for row, n_cpu_moe in zip(rows[:3], (0, 1, 2)):
        plan = row["planner"]
        # --n-cpu-moe N moves the first N layers' experts, at top-k / E, to the RAM side; the rest stays.
        in_ram = embedding_row + sum(experts[i] for i in range(n_cpu_moe))
        assert plan["ram_bytes_per_token"] == pytest.approx(in_ram, abs=2)
        assert plan["gpu_bytes_per_token"] + plan["ram_bytes_per_token"] == pytest.approx(whole, abs=2)
    # -ngl 1 of 2 layers: blk.0 and the output head are read from RAM.
    ngl = rows[3]["planner"]
    assert ngl["ram_bytes_per_token"] == pytest.approx(layers[0] + head + embedding_row, abs=2)
    assert ngl["gpu_bytes_per_token"] == pytest.approx(layers[1], abs=2)
