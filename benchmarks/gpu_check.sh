#!/usr/bin/env bash
# The GPU check, in under 8 minutes on one H100/H200: the CUDA parity tests against the
# fixtures, then a 35B-A3B-shaped random Q4_K_M model (all 40 layers, ~20 GB) at batch 1
# and 8 concurrent sequences (benchmarks/gpu_bench.py). Runs with the machine's own torch
# and triton; packages it lacks travel as wheels in .gpu/whl, the fixtures it needs in
# .gpu/fixtures (or QWEN35_FIXTURES): benchmarks/gpu_prepare.sh gathers both here, and the
# device tool carries them (carry: [".gpu"]). Logs and the benchmark's JSON go to $OUT (or /tmp).
# Extra arguments go to gpu_bench.py. The benchmark profiles an eager decode step (GPU time per
# kernel) and first times the GEMV launch shapes of gpu_bench.GEMV_SWEEP over the whole batch-1
# step, keeping the fastest (SWEEP_GEMV=0 skips that); WITH_KERNELS=1 adds gpu_kernels.py --quick,
# WITH_PLACEMENTS=1 the split placements (gpu_placements.py); KV_TYPES="f16 q8_0 q4_0" times batch-1 decode
# after KV_DEPTH (32768) tokens with K/V kept as each type; SPECULATIVE=1 times batch-1 speculative decoding.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/qwen35-gpu-check}"
mkdir -p "$out"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .gpu/fixtures ] && export QWEN35_FIXTURES="${QWEN35_FIXTURES:-$PWD/.gpu/fixtures}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Compiling the kernels for each test's shapes is most of the tests' time: spread over processes (the
# machine's image has pytest-xdist; each process has its own arrival counters and CUDA context).
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_PROCESSES:-6}")
cuda_tests="tests/test_cuda.py tests/test_triton_gguf.py tests/test_triton_gguf_dot.py tests/test_triton_deltanet.py
    tests/test_triton_moe.py tests/test_triton_chunked.py tests/test_triton_attention.py tests/test_triton_decode.py
    tests/test_fast_cuda.py tests/test_paged_kv.py tests/test_paged_kv_blocks.py tests/test_triton_arrivals.py"
# GPU_CHECK_TESTS: other test files (tests/test_gpu_check.py runs this script on a CPU with one).
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts="" -rfEs $parallel \
    ${GPU_CHECK_TESTS:-$cuda_tests} 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_bench.py --size 35b-a3b --type Q4_K_M --batch 1 8 \
    --profile $([ "${SWEEP_GEMV:-1}" = 1 ] && echo --sweep-gemv) \
    $([ -n "${KV_TYPES:-}" ] && echo --kv-types ${KV_TYPES} --kv-depth "${KV_DEPTH:-32768}") \
    $([ -n "${SPECULATIVE:-}" ] && echo --speculative) \
    --json "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
if [ -n "${WITH_KERNELS:-}" ]; then  # each kernel's own timings, for tuning launch shapes (about a minute)
    timeout "${KERNELS_TIMEOUT:-120}" python3 benchmarks/gpu_kernels.py --quick --json "$out/kernels.json" 2>&1 \
        | tee "$out/kernels.log"
fi
if [ -n "${WITH_PLACEMENTS:-}" ]; then  # -ngl / --n-cpu-moe splits, measured beside the planner's numbers (~2 min)
    timeout "${PLACEMENTS_TIMEOUT:-300}" python3 benchmarks/gpu_placements.py --size 35b-a3b --type Q4_K_M \
        --n-cpu-moe 0 20 40 --ngl 20 --steps 16 --prompt 512 --context 64 \
        --json "$out/placements.json" 2>&1 | tee "$out/placements.log"
fi
echo "tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
