#!/usr/bin/env bash
# CI, no GPU: compile and link the CUDA kernels on every run. In a second virtual
# environment with the CUDA build of torch (torch==2.14.1, from the local wheels), build
# the extension from a copy of this tree with FUSED_LSTM_CUDA=1 (so that a missing
# toolkit is an error, never a silent CPU-only build), check that importing fused_lstm._C
# registers the CUDA kernels, and run the CPU test suite against that build (the tests
# marked cuda skip themselves).
#
#   bash .ci/cuda_build_check.sh     # CUDA_VENV (default .venv-cuda) is reused if present
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
TORCH=${CUDA_TORCH:-torch==2.14.1}
start=$(date +%s)

SECONDS=0
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
PY=$VENV/bin/python
"$PY" -m pip install -q "$TORCH" ninja pybind11 numpy pytest hypothesis tqdm "setuptools>=64" wheel
"$PY" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
echo "venv: ${SECONDS}s"

# The toolkit: /usr/local/cuda, else the root nvcc reports (nvcc may be a wrapper script).
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  else
    CUDA_HOME=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    CUDA_HOME=$(cd "$CUDA_HOME" && pwd)
  fi
fi
export CUDA_HOME
"$CUDA_HOME/bin/nvcc" --version | tail -1
# cuBLAS/cuSPARSE headers come with torch's pip CUDA packages, not with a bare toolkit.
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"

# A copy of the tree, so that this build's fused_lstm/_C*.so never replaces the one that
# `make test` built in place against the CPU torch.
SECONDS=0
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
cd "$SRC"
FUSED_LSTM_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
echo "build: ${SECONDS}s"

"$PY" - <<'PY'
import os

import torch
import fused_lstm._C  # noqa: F401  (runs the registrations)
import fused_lstm

assert fused_lstm.__file__.startswith(os.getcwd()), f"imported {fused_lstm.__file__}"
for op in ("forward", "backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", key), (op, key)
print("fused_lstm._C: CPU and CUDA kernels registered; GPU present:", torch.cuda.is_available())
PY

SECONDS=0
"$PY" -m pytest -q -p no:cacheprovider tests
echo "tests: ${SECONDS}s"
echo "cuda_build_check: $(( $(date +%s) - start ))s in all"
