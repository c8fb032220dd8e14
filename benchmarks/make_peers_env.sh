#!/usr/bin/env bash
# Make the separate benchmark environment in which the peers (MONAI ContrastiveLoss, lightly NTXentLoss,
# pytorch-metric-learning NTXentLoss / SupConLoss) and this package are timed side by side.
#
#     bash benchmarks/make_peers_env.sh [ENV_DIR]        # default: benchmarks/.peers-env
#
# Why a separate environment: lightly needs torchvision, and the registry's torchvision fails to import beside
# the CPU torch 2.13.0 of the main environment. `torch==2.14.1 torchvision==0.29.1` is a matching pair that runs
# on the CPU (a large CUDA build, several GB: expected, in this environment only). Never install lightly,
# pytorch-metric-learning or torchvision into the main environment.
# Then run the sweep with this environment's python, e.g.
#     benchmarks/.peers-env/bin/python -m benchmarks.sweep
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV_DIR="${1:-$ROOT/benchmarks/.peers-env}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$ENV_DIR"
PIP=("$ENV_DIR/bin/python" -m pip)
# keep the torch/torchvision pair fixed whatever the peers ask for
CONSTRAINTS="$ENV_DIR/peers-constraints.txt"
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" install -c "$CONSTRAINTS" lightly pytorch-metric-learning scipy monai \
    pytest pytest-benchmark matplotlib
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT"

# check: one torch, the pinned one, and every peer importable
"$ENV_DIR/bin/python" - <<'PY'
import torch, torchvision, lightly, pytorch_metric_learning, monai, scipy, macl_kernels
from lightly.loss import NTXentLoss
from pytorch_metric_learning.losses import NTXentLoss as PmlNTXent, SupConLoss
from monai.losses import ContrastiveLoss
assert torch.__version__.startswith("2.14.1"), torch.__version__
print("peers env ok: torch", torch.__version__, "torchvision", torchvision.__version__, "lightly", lightly.__version__,
      "pytorch-metric-learning", pytorch_metric_learning.__version__, "monai", monai.__version__)
PY
"${PIP[@]}" list 2>/dev/null | grep -i -E '^(torch|torchvision|triton|lightly|pytorch-metric-learning|monai|numpy|scipy) ' || true
