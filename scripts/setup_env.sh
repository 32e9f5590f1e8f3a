#!/usr/bin/env bash
# Creates ./.venv (once) with PyTorch, the package (editable) and its dev, train and pml extras.
# torch/torchvision are pinned to the releases these machines serve from local disk:
# an unpinned torch would download a several-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,train,pml]"
.venv/bin/python -c "import torch, triton, daal_triton; print('torch', torch.__version__, '| triton', triton.__version__, '| daal_triton', daal_triton.__version__)"
