#!/usr/bin/env bash
# Sets up .venv (once) with the package, then runs the main job on a bundled default.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/qwen35 plan "$@"
