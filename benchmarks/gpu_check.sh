#!/usr/bin/env bash
# One-shot GPU check (docs/gpu_check.md): CUDA tests under sync-debug mode, speed vs naive PyTorch and
# torch.compile, the MACL step. Run from anywhere; extra arguments go to benchmarks/gpu_check.py
# (--dry-run lists the cases on any machine, --budget SECONDS, --only test,speed,macl-step).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
