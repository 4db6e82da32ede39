#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one command:
# 1. build the extension with its CUDA kernels;
# 2. the CUDA tests (each on both kernels of the recurrence: the persistent kernel and the
#    step kernels; test_cuda_launch.py: refused cooperative launches, graph capture, the
#    low-precision accuracy at large H) and the host-emulation tests;
# 3. compute-sanitizer (memcheck, racecheck, synccheck, initcheck) on a small case of the
#    forward and backward ops, once per kernel;
# 4. the benchmark, python benchmarks/run.py --device cuda --graph, with the default rule
#    and then forced onto the step kernels (FUSED_LSTM_CUDA_PATH=stepwise), into
#    $OUT/bench/default/ and $OUT/bench/stepwise/.
#
#   bash benchmarks/gpu_check.sh   # PYTHON (default python) must have torch, pytest, tqdm;
#                                  # OUT (default gpu-check-out); BENCH_ARGS: more run.py options
#   STAGES="tests sanitizer" bash benchmarks/gpu_check.sh   # some stages only (default: all
#                                  # of build tests sanitizer bench), e.g. one device call each
#
# Prints the GPU, the versions, pytest's summary, each sanitizer's summary, the benchmark
# tables and the seconds each stage took; exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu-check-out}
STAGES=" ${STAGES:-build tests sanitizer bench} "
stage() { [[ "$STAGES" == *" $1 "* ]]; }
start=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'devices', torch.cuda.device_count(), torch.cuda.get_device_name())"

# The toolkit's root: CUDA_HOME, else where nvcc says it lives (nvcc may be a wrapper).
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  CUDA_HOME=$(cd "$CUDA_HOME" && pwd)
fi
export CUDA_HOME
# Headers that the pip CUDA packages carry and a bare toolkit may lack (cuBLAS, cuSPARSE).
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -d "$site/nvidia/cu13/include" ]; then
  export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
fi
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")

if stage build; then
  SECONDS=0
  FUSED_LSTM_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-8} \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  echo "build: ${SECONDS}s (arch $arch)"
fi

if stage tests; then
  SECONDS=0
  "$PY" -m pytest -q -rs tests/test_cuda.py tests/test_cuda_launch.py tests/test_cuda_emulated.py \
    tests/test_cuda_persistent_emulated.py tests/test_cuda_precision_emulated.py tests/test_op.py
  echo "tests: ${SECONDS}s"
fi

# Both tiles of the step kernels (batch <= 64 and above), partial tiles, packed, reverse,
# projection (always on the step kernels), tensor cores (float16) and FMAs (float32,
# float64) in the persistent kernel; forward and backward.
case_py='
import torch, fused_lstm
from test_op import make_args
for dtype in (torch.float32, torch.float16, torch.float64):
    for T, B, I, H, P in ((4, 5, 3, 40, None), (3, 70, 2, 33, None), (3, 6, 2, 9, 4)):
        args = make_args(T, B, I, H, P, dtype=dtype, device="cuda")
        batch_sizes = torch.tensor([B] + [max(1, B - 2 * t) for t in range(1, T)])
        for reverse in (False, True):
            out, h_n, c_n, gates, cells = torch.ops.fused_lstm.forward(*args, batch_sizes, reverse)
            torch.ops.fused_lstm.backward(out, h_n, c_n, *args[:5], args[6], batch_sizes, reverse,
                                          out, gates, cells)
torch.cuda.synchronize()
print("case done")
'
if stage sanitizer; then
  sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  "$sanitizer" --version | tail -1
  for path in persistent stepwise; do
    kernel=step_kernel
    [ "$path" = persistent ] && kernel=persistent_kernel
    for tool in memcheck racecheck synccheck initcheck; do
      SECONDS=0
      # memcheck sees every kernel (ours and the ATen ops around them), the others ours only;
      # no caching allocator, so that an access past a tensor's end is past its allocation.
      filter=()
      [ "$tool" = memcheck ] || filter=(--kernel-name "kns=$kernel")
      log=$(mktemp)
      if ! FUSED_LSTM_CUDA_PATH=$path PYTHONPATH=tests PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
          "$sanitizer" --tool "$tool" --error-exitcode 1 "${filter[@]}" "$PY" -c "$case_py" >"$log" 2>&1; then
        head -100 "$log"
        echo "$path $tool: FAILED"
        exit 1
      fi
      tail -2 "$log"
      echo "$path $tool: ${SECONDS}s"
      rm -f "$log"
    done
  done
fi

# The benchmark with the default rule (what users get: the persistent kernel wherever it
# fits), then forced onto the step kernels, for the comparison.
if stage bench; then
  for path in default stepwise; do
    SECONDS=0
    forced=()
    [ "$path" = stepwise ] && forced=(FUSED_LSTM_CUDA_PATH=stepwise)
    # shellcheck disable=SC2086  # BENCH_ARGS holds several options
    env "${forced[@]}" "$PY" benchmarks/run.py --device cuda --graph --out "$OUT/bench/$path" \
      ${BENCH_ARGS:-}
    echo "benchmark, $path: ${SECONDS}s"
  done
fi
echo "gpu_check: $(( $(date +%s) - start ))s in all"
