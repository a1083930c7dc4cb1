#!/usr/bin/env bash
# On this machine, before a GPU check: gather into .gpu/ what benchmarks/gpu_check.sh needs on the
# lent GPU machine, which has torch and triton but no network and no fixtures folder: the gguf
# wheel, and the fixture files the CUDA tests read (about 55 MB; the device tool carries at most
# 64 MiB with the repo). .gpu/ stays out of git (.git/info/exclude); the device tool carries it
# with `carry: [".gpu"]`, and gpu_check.sh finds it there.
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures="${QWEN35_FIXTURES:-$(cd .. && pwd)/shared/fixtures}"
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/fixtures/tiny .gpu/fixtures/ref .gpu/fixtures/tokenizer
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl gguf==0.19.0
cp "$fixtures/README.md" .gpu/fixtures/
for f in dense-Q8_0 dense-Q4_K_M dense-Q3_K_M dense-Q4_0 moe-Q4_K_M; do cp "$fixtures/tiny/$f.gguf" .gpu/fixtures/tiny/; done
cp "$fixtures"/ref/{dense,moe}.json .gpu/fixtures/ref/
for f in dense.text.exact-Q8_0 dense.text.exact-Q4_K_M dense.text.llamacpp-Q8_0 dense.text.llamacpp-Q4_K_M \
         moe.text.exact-Q4_K_M moe.text.llamacpp-Q4_K_M; do
    cp "$fixtures/ref/$f.logits.npy" .gpu/fixtures/ref/
done
cp "$fixtures"/tokenizer/{ggml-vocab-qwen35.gguf,Qwen3.5-4B.jinja} .gpu/fixtures/tokenizer/
du -sh .gpu
