"""benchmarks/gpu_check.sh, the one script a GPU session runs, end to end on the CPU: its own test step
(one test file in place of the CUDA ones) and gpu_bench.py's whole sequence on a one-layer model shaped
like the 35B-A3B with 16 experts (gpu_bench's --device cpu self-check). A broken script would cost a GPU
session; here it costs a red test."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_script_runs_its_steps_and_writes_its_results(fixtures, tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"  # `python3` as the script calls it: this interpreter, with its packages
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "QWEN35_FIXTURES": str(fixtures), "SWEEP_GEMV": "1",
                   "KV_TYPES": "f16 q8_0", "KV_DEPTH": "40", "SPECULATIVE": "1",
                   "GPU_CHECK_TESTS": "tests/test_triton_arrivals.py", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--layers", "1", "--experts", "16", "--vocab", "1024",
         "--batch", "1", "2", "--steps", "2", "--prompt", "16", "--context", "8", "--dir", str(tmp_path / "models")],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "tests exit 0, benchmark exit 0" in done.stdout
    assert " passed" in (out / "tests.log").read_text()
    results = json.loads((out / "bench.json").read_text())
    assert results["model"] == "35b-a3b-L1-E16-V1024-Q4_K_M-sparse.gguf"
    for key in ("prefill_tok/s", "decode_eager_b1_tok/s", "decode_b1_tok/s", "decode_b2_tok/s"):
        assert results[key] > 0, key
    assert results["profile"][-1]["kernel"] == "total"  # the per-kernel profile ran (CPU time here)
    assert results["decode_b1_d40_f16_tok/s"] > 0 and results["decode_b1_d40_q8_0_tok/s"] > 0
    for key in ("decode_b1_plain_tok/s", "decode_b1_mtp3_tok/s", "decode_b1_all_right3_tok/s"):
        assert results[key] > 0, key
