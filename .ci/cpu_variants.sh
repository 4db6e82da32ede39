#!/usr/bin/env bash
# The CPU kernels are compiled once per instruction set (csrc/cpu/kernels_*.cpp) and the
# build torch picks at run time is the one a user's CPU gets: the portable DEFAULT build on
# aarch64 and old x86, AVX2 or AVX-512 elsewhere. `make test` runs only this machine's best;
# this runs the tests that exercise the kernels again under each variant below it that this
# CPU can run (ATEN_CPU_CAPABILITY, which torch honours for every kernel it dispatches).
# PYTHON: the interpreter with torch and fused_lstm built (default .venv/bin/python);
# TESTS: the test files (default: the op, its CPU paths and the module, about three minutes
# a variant on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TESTS=${TESTS:-tests/test_op.py tests/test_cpu_paths.py tests/test_module.py}
capability() {
  "$PYTHON" -c "import torch, fused_lstm
print(torch.backends.cpu.get_cpu_capability(), torch.ops.fused_lstm.cpu_capability())"
}
# Assigned first, so that an interpreter that fails stops the script (set -e) instead of
# leaving every variant "not on this CPU".
caps=$(capability)
read -r best _ <<< "$caps"
failed=()
# Only the variants below the best: torch takes ATEN_CPU_CAPABILITY at its word, so a
# variant above what the CPU has would run instructions it lacks (SIGILL).
below_best=true
for isa in default avx2 avx512; do
  if [ "${isa^^}" = "$best" ]; then below_best=false; fi
  if ! $below_best && [ "${isa^^}" != "$best" ]; then
    echo "== $isa: above this CPU's best ($best), skipped"
    continue
  fi
  caps=$(ATEN_CPU_CAPABILITY=$isa capability)
  read -r torch_isa kernels <<< "$caps"
  if [ "$torch_isa" != "${isa^^}" ]; then
    echo "== $isa: not on this CPU (torch runs $torch_isa), skipped"
  elif [ "$torch_isa" = "$best" ]; then
    echo "== $isa: this CPU's best, which make test runs"
  else
    echo "== ATEN_CPU_CAPABILITY=$isa (fused_lstm's kernels: $kernels)"
    # shellcheck disable=SC2086  (TESTS is a list of files)
    ATEN_CPU_CAPABILITY=$isa "$PYTHON" -m pytest -q -p no:cacheprovider $TESTS || failed+=("$isa")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed under ATEN_CPU_CAPABILITY=${failed[*]}"
  exit 1
fi
