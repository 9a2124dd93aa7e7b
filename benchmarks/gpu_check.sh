#!/usr/bin/env bash
# On a machine with a CUDA GPU (the lent device machine): the CUDA tests, then a short greedy
# and sampled generate on random weights of the built-ins' shapes. Needs the venv (make install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.cuda.get_device_name(0))"
$PY -m pytest -q -m cuda tests
$PY -m benchmarks.gpu_check --device cuda
