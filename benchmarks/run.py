"""The benchmark: the Python time-step loop, nn.LSTM, onnxruntime and FusedLSTM side by side.

    python benchmarks/run.py                        # default shapes and dtypes of the device
    python benchmarks/run.py --device cpu --quick   # a short CPU run (under 3 minutes on 2 cores)
    python benchmarks/run.py --shapes mid 50,8,64,128 --dtype float32 bfloat16 --out bench-out

In one process, for each shape, dtype and mode, three modules share one state_dict:
fused_lstm.ReferenceLSTM (the seed's time-step loop behind FusedLSTM's interface),
torch.nn.LSTM and FusedLSTM; for CPU inference, when onnxruntime is installed, the ONNX
export of that nn.LSTM runs in onnxruntime as a fourth. Before a case is timed, FusedLSTM's
outputs (and, for a training step, every gradient) are checked against nn.LSTM's, both
measured against a float64 run; the benchmark stops if FusedLSTM is less accurate than
nn.LSTM allows. onnxruntime's outputs are held to the same rule; where they fail it, it is
left out of that case and the table says so.

Times come from torch.utils.benchmark.Timer (it synchronises CUDA). The implementations
are timed in interleaved rounds, alternating their order, so that a machine whose speed
drifts affects them alike. A time is the median over rounds, with the interquartile range
of the rounds beside it; a speed-up is the ratio of two such medians, so that every
speed-up printed is the quotient of the two times printed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import benchmark
from tqdm import tqdm

import fused_lstm
from fused_lstm import FusedLSTM, ReferenceLSTM, testing

PRESETS = {  # name: (T, B, I, H)
    "seed": (35, 32, 28, 256),  # the seed's char-level language model
    "b1": (100, 1, 256, 256),  # streaming inference: pure latency
    "mid": (100, 64, 512, 512),  # a typical training shape
    "large": (100, 256, 1024, 1024),  # matmul-bound
    "long": (1024, 16, 768, 768),  # long sequences
}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
MODES = {"fwd": ["fwd"], "fwdbwd": ["fwdbwd"], "both": ["fwd", "fwdbwd"]}
MODE_LABELS = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}

# The implementations timed side by side, keyed as in results.json.
LOOP, NN_LSTM, ORT, FUSED = "loop", "nn_lstm", "onnxruntime", "fused"
LABELS = {LOOP: "Python loop", NN_LSTM: "nn.LSTM", ORT: "onnxruntime", FUSED: "FusedLSTM"}
# Each speed-up: the fastest of the baselines' median times over the target's.
SPEEDUPS = {  # key in results.json: (baselines, target, column heading)
    "speedup_vs_nn_lstm": ((NN_LSTM,), FUSED, "speed-up vs nn.LSTM"),
    "speedup_vs_onnxruntime": ((ORT,), FUSED, "speed-up vs onnxruntime"),
    "speedup_vs_fastest_library": ((NN_LSTM, ORT), FUSED,
                                   "speed-up vs min(nn.LSTM, onnxruntime)"),
    "speedup_vs_loop": ((LOOP,), FUSED, "speed-up vs loop"),
    "graph_speedup_vs_nn_lstm": ((f"{NN_LSTM}_graph",), f"{FUSED}_graph",
                                 "graph speed-up vs nn.LSTM"),
}
# onnxruntime's CPU LSTM kernel takes float and double only (it refuses a bfloat16 graph
# as INVALID_GRAPH), so other dtypes are not exported.
ORT_DTYPES = ("float32", "float64")
# The loop's cost is estimated from the median of a few calls over its first few steps
# (its time is linear in T): one call on a loaded machine can be many times too slow.
LOOP_PROBE_STEPS = 8
LOOP_PROBE_CALLS = 5
# A case calls each step about rounds + 3 times: warm-up, rounds, peak memory.
LOOP_EXTRA_CALLS = 3

# FusedLSTM passes when every output and gradient is as accurate as nn.LSTM's against the
# float64 run (fused_lstm.testing, the test suite's rule): at most testing.SLACK times
# nn.LSTM's error plus testing.ROUNDING units of rounding.
# A float64 case has no more precise reference: it is compared with nn.LSTM directly, to
# half of float64's digits. Rounding of 1e-16 per operation stays orders of magnitude
# below that over these sums; a wrong kernel is off by far more.
FLOAT64_TOLERANCE = math.sqrt(torch.finfo(torch.float64).eps)


@dataclass(frozen=True)
class Shape:
    name: str
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int

    def dims(self) -> str:
        return f"{self.seq_len}, {self.batch}, {self.input_size}, {self.hidden_size}"


@dataclass(frozen=True)
class Settings:
    """How long to time: rounds per case, seconds per block of calls, and how many
    seconds the Python loop may take over a whole case before it is skipped."""

    rounds: int
    block_s: float
    loop_budget_s: float


def parse_shape(text: str) -> Shape:
    if text in PRESETS:
        return Shape(text, *PRESETS[text])
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if len(dims) != 4 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(
            f"a shape is one of {', '.join(PRESETS)} or T,B,I,H (four positive integers), "
            f"got {text!r}"
        )
    return Shape(text, *dims)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the Python loop, nn.LSTM, onnxruntime (CPU inference, when "
        "installed) and FusedLSTM, sharing one state_dict.",
        epilog="Shape presets (T, B, I, H): "
        + "; ".join(f"{name} {dims}" for name, dims in PRESETS.items())
        + ". --cell runs the cell's benchmark instead (FusedLSTMCell, nn.LSTMCell and the "
        "seed's step in a Python loop; its options: run.py --cell --help).",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), metavar="DTYPE",
                        help=f"one or more of {', '.join(DTYPES)} (default: float32 on the CPU, "
                        "float32 and bfloat16 on CUDA; float32 with --quick)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="SHAPE",
                        help="presets or T,B,I,H (default: seed b1 mid on the CPU, all presets "
                        "on CUDA; fewer with --quick)")
    parser.add_argument("--layers", type=int, default=1, help="num_layers (default 1)")
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--mode", choices=list(MODES), default="both",
                        help="fwd: inference under no_grad; fwdbwd: a training step, forward "
                        "and the gradients of the input and every parameter; both (the "
                        "default): each in turn")
    parser.add_argument("--loop", choices=["auto", "always", "never"], default="auto",
                        help="time the Python loop: auto (the default) where its estimated "
                        "time per call, from the median of a few short calls, keeps the case "
                        "within budget (the table gives the estimate and the limit); always; "
                        "never")
    parser.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                        help="leave onnxruntime out (by default it is timed on CPU inference "
                        "when onnxruntime, onnx and onnxscript are installed)")
    parser.add_argument("--graph", action="store_true",
                        help="CUDA only: also time nn.LSTM and FusedLSTM replayed from a CUDA "
                        "graph")
    parser.add_argument("--quick", action="store_true",
                        help="by default only seed and b1 (CPU) or seed and mid (CUDA), float32; "
                        "3 rounds of 0.05 s blocks; the loop only where a case's calls of it "
                        "take under 10 s")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write results.json, results.csv and speedups.png there")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch "
                     f"({torch.__version__})")
    if args.graph and args.device != "cuda":
        parser.error("--graph needs --device cuda (CUDA graphs replay GPU work only)")
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    on_cuda = args.device == "cuda"
    if args.shapes is None:
        names = {(False, False): ["seed", "b1", "mid"], (False, True): ["seed", "b1"],
                 (True, False): list(PRESETS), (True, True): ["seed", "mid"]}[on_cuda, args.quick]
        args.shapes = [parse_shape(name) for name in names]
    if args.dtype is None:
        args.dtype = ["float32", "bfloat16"] if on_cuda and not args.quick else ["float32"]
    return args


def timing_settings(device: str, quick: bool) -> Settings:
    if quick:
        return Settings(rounds=3, block_s=0.05, loop_budget_s=10.0)
    # The CPU is shared and noisy: more rounds, longer blocks.
    if device == "cpu":
        return Settings(rounds=7, block_s=0.2, loop_budget_s=60.0)
    return Settings(rounds=5, block_s=0.1, loop_budget_s=60.0)


def machine(device: str, onnxruntime) -> dict:
    """What the figures were measured on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # The ISA torch's own kernels dispatch to, and the one our CPU kernels run.
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fused_lstm_cpu_capability": torch.ops.fused_lstm.cpu_capability(),
        "onnxruntime": onnxruntime.__version__ if onnxruntime else None,
        "torch": torch.__version__,
        "fused_lstm": fused_lstm.__version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            # "tf32" (torch's default for cuDNN's RNNs): nn.LSTM's float32 runs in TF32.
            cudnn_rnn_fp32_precision=torch.backends.cudnn.rnn.fp32_precision,
            matmul_fp32_precision=torch.backends.cuda.matmul.fp32_precision,
        )
    return info


def cpu_model() -> str:
    """The CPU's name with its family and model numbers: a virtual machine may name only
    the vendor's line ("AMD EPYC"), and the numbers tell its generation (26, 2: Zen 5)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:  # the end of the first processor's entry
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                                capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# --- one case: modules, inputs and the step that is timed -----------------------------------

def make_modules(shape: Shape, args: argparse.Namespace,
                 dtype: torch.dtype) -> dict[str, nn.Module]:
    """The three implementations, with nn.LSTM's parameters (one state_dict)."""
    lstm = nn.LSTM(shape.input_size, shape.hidden_size, args.layers,
                   bidirectional=args.bidirectional, device=args.device, dtype=dtype)
    return {LOOP: ReferenceLSTM.from_lstm(lstm), NN_LSTM: lstm, FUSED: FusedLSTM.from_lstm(lstm)}


def make_inputs(shape: Shape, args: argparse.Namespace, dtype: torch.dtype,
                seq_len: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """A time-major input and, for the training step, random cotangents of
    ``output, h_n, c_n`` (a loss that depends on all three)."""
    seq_len = seq_len or shape.seq_len
    directions = 2 if args.bidirectional else 1
    options = {"device": args.device, "dtype": dtype}
    x = torch.randn(seq_len, shape.batch, shape.input_size, **options)
    state = (args.layers * directions, shape.batch, shape.hidden_size)
    cotangents = (
        torch.randn(seq_len, shape.batch, directions * shape.hidden_size, **options),
        torch.randn(state, **options),
        torch.randn(state, **options),
    )
    return x, cotangents


def make_step(module: nn.Module, mode: str, x: Tensor,
              cotangents) -> Callable[[], tuple[Tensor, ...]]:
    """What is timed: inference under no_grad (``fwd``), or a training step (``fwdbwd``):
    the forward and the gradients of the input and of every parameter. The step returns
    the outputs, then the gradients, for the correctness check."""
    if mode == "fwd":
        module.eval()
        x = x.detach()

        def step():
            with torch.no_grad():
                output, (h_n, c_n) = module(x)
            return output, h_n, c_n
    else:
        module.train()  # cuDNN's backward needs it; dropout is 0, so nothing else changes
        x = x.detach().requires_grad_()
        leaves = (x, *module.parameters())

        def step():
            output, (h_n, c_n) = module(x)
            return output, h_n, c_n, *torch.autograd.grad((output, h_n, c_n), leaves, cotangents)
    return step


def output_names(module: nn.Module, mode: str) -> list[str]:
    names = ["output", "h_n", "c_n"]
    if mode == "fwdbwd":
        names += ["grad of the input"] + [f"grad of {n}" for n, _ in module.named_parameters()]
    return names


# --- the correctness check --------------------------------------------------------------------

class CheckFailed(SystemExit):
    """FusedLSTM disagrees with nn.LSTM: the benchmark stops (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"benchmark stopped, FusedLSTM is wrong: {message}")


def expected_outputs(modules: dict[str, nn.Module], steps: dict[str, Callable], mode: str,
                     dtype: torch.dtype, x: Tensor, cotangents):
    """nn.LSTM's outputs and gradients, and the float64 run's (nn.LSTM's again in float64,
    on the same values: x and the cotangents are already in `dtype`)."""
    theirs = steps[NN_LSTM]()
    if dtype == torch.float64:
        return theirs, theirs
    reference_module = copy.deepcopy(modules[NN_LSTM]).to(torch.float64)
    cotangents = tuple(c.double() for c in cotangents)
    reference = make_step(reference_module, mode, x.double(), cotangents)()
    return theirs, reference


def check_outputs(label: str, names: list[str], ours, theirs, reference,
                  dtype: torch.dtype) -> dict:
    """Raises CheckFailed unless every tensor passes the rule; returns the errors of the
    tensor closest to its bound (the largest error over allowed)."""
    for name, o, t in zip(names, ours, theirs, strict=True):
        if o.shape != t.shape or o.dtype != t.dtype:
            raise CheckFailed(f"{label}: {name} is {o.dtype} {list(o.shape)}, nn.LSTM's is "
                              f"{t.dtype} {list(t.shape)}")
    if dtype == torch.float64:
        report = [testing.TensorError(name, _max_difference(o, t), 0.0, 0.0)
                  for name, o, t in zip(names, ours, theirs)]
        allowed = [FLOAT64_TOLERANCE * max(1.0, t.abs().max().item() if t.numel() else 0.0)
                   for t in theirs]
        rule = "sqrt(float64 eps) x max(1, max |nn.LSTM's|)"
    else:
        report = testing.errors(ours, theirs, reference, names)
        allowed = [e.allowed for e in report]
        rule = (f"{testing.SLACK:g} x nn.LSTM's error + {testing.ROUNDING:g} x the rounding "
                "of the float64 values")
    for e, bound in zip(report, allowed):
        # `not <=` so that a NaN fails
        if not e.ours <= bound:
            raise CheckFailed(
                f"{label}: {e.name}: FusedLSTM's error is {e.ours:.3g}, nn.LSTM's "
                f"{e.theirs:.3g}, allowed {bound:.3g} ({rule}); an error is the largest "
                "difference from nn.LSTM's float64 run (from nn.LSTM's own, in float64)"
            )
    tightest, bound = max(zip(report, allowed), key=lambda e: e[0].ours / e[1] if e[1] else 0.0)
    return {"fused_max_error": tightest.ours, "nn_lstm_max_error": tightest.theirs,
            "allowed_error": bound}


def _max_difference(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --- timing -----------------------------------------------------------------------------------

def make_timer(step: Callable) -> benchmark.Timer:
    # Timer runs with 1 thread unless told: time with the threads the user runs with.
    return benchmark.Timer(stmt="step()", globals={"step": step},
                           num_threads=torch.get_num_threads())


def estimate_loop_s(module: nn.Module, shape: Shape, args, dtype, mode: str) -> float:
    """The loop's seconds per call: the median of a few calls over its first few time
    steps, after one to warm up, scaled to T."""
    steps = min(shape.seq_len, LOOP_PROBE_STEPS)
    x, cotangents = make_inputs(shape, args, dtype, seq_len=steps)
    step = make_step(module, mode, x, cotangents)
    step()
    seconds = []
    for _ in range(LOOP_PROBE_CALLS):
        # One call each, not Timer.timeit's: that one warms up with two more every time.
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * shape.seq_len / steps


def loop_limit_s(settings: Settings) -> float:
    """The loop's longest estimated time per call that keeps its case within budget."""
    return settings.loop_budget_s / (settings.rounds + LOOP_EXTRA_CALLS)


def time_interleaved(steps: dict[str, Callable], settings: Settings) -> dict[str, list[float]]:
    """Seconds per call of each step, one block of calls per step per round, the order
    reversed every other round. Returns each step's times, one per round."""
    timers = {key: make_timer(step) for key, step in steps.items()}
    # blocked_autorange also warms up; its estimate sets how many calls make a block.
    calls = {}
    for key, timer in timers.items():
        seconds = timer.blocked_autorange(min_run_time=settings.block_s).median
        calls[key] = max(1, round(settings.block_s / seconds))
    times: dict[str, list[float]] = {key: [] for key in steps}
    for round_index in range(settings.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for key in order:
            times[key].append(timers[key].timeit(calls[key]).median)
    return times


def interquartile_range(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return third - first


def summarise(times: dict[str, list[float]]) -> dict:
    """Each implementation's median ms over the rounds, their interquartile range and the
    rounds themselves; each speed-up the ratio of those medians (never a statistic of its
    own, so that it always equals the quotient of the times printed beside it)."""
    row = {}
    for key, seconds in times.items():
        ms = [s * 1e3 for s in seconds]
        row[f"{key}_ms"] = statistics.median(ms)
        row[f"{key}_iqr_ms"] = interquartile_range(ms)
        row[f"{key}_rounds_ms"] = ms
    for name, (baselines, target, _) in SPEEDUPS.items():
        if target in times and all(key in times for key in baselines):
            row[name] = min(row[f"{key}_ms"] for key in baselines) / row[f"{target}_ms"]
    return row


# --- onnxruntime ------------------------------------------------------------------------------

def import_onnxruntime(args: argparse.Namespace):
    """onnxruntime where it has a part in this run (CPU inference) and it is installed
    with what torch.onnx.export needs; else None."""
    if not args.onnxruntime or args.device != "cpu" or "fwd" not in MODES[args.mode]:
        return None
    try:
        import onnx  # noqa: F401  (the exporter's)
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter's)
    except ImportError:
        return None
    return onnxruntime


@contextlib.contextmanager
def quiet_export():
    """torch.onnx.export prints its progress, warns about nn.LSTM's flat weights and logs
    the torchvision operators it cannot register: none of it concerns the benchmark."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnxruntime_step(onnxruntime, lstm: nn.LSTM, x: Tensor) -> Callable[[], list]:
    """nn.LSTM ``lstm`` exported to ONNX (its LSTM operator) and run by onnxruntime on
    ``x``: the step returns its outputs as numpy arrays."""
    with quiet_export():
        program = torch.onnx.export(copy.deepcopy(lstm), (x,), dynamo=True, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Threads that spin between calls would take the cores from whatever is timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def add_onnxruntime(onnxruntime, label: str, dtype_name: str, modules, steps, x: Tensor,
                    names: list[str], theirs, reference, row: dict) -> None:
    """onnxruntime's step into ``steps``, once its outputs pass FusedLSTM's check; where it
    cannot run or fails the check, the row says why and it is left out."""
    if dtype_name not in ORT_DTYPES:
        row[f"{ORT}_skipped"] = f"no {dtype_name} LSTM"
        return
    try:
        step = onnxruntime_step(onnxruntime, modules[NN_LSTM], x)
        outputs = [torch.from_numpy(array) for array in step()]
    except Exception as error:  # noqa: BLE001  (whatever the reason, it is a result)
        row[f"{ORT}_skipped"] = f"failed: {type(error).__name__}"
        row[f"{ORT}_error"] = str(error).splitlines()[0]
        return
    try:
        worst = check_outputs(f"{label}, onnxruntime", names, outputs, theirs, reference,
                              DTYPES[dtype_name])
    except CheckFailed as error:
        row[f"{ORT}_skipped"] = "outputs fail the check"
        row[f"{ORT}_error"] = str(error.code)
        print(f"{label}: onnxruntime left out, its outputs fail FusedLSTM's check: {error.code}",
              file=sys.stderr)
        return
    row[f"{ORT}_max_error"] = worst["fused_max_error"]
    row[f"{ORT}_nn_lstm_error"] = worst["nn_lstm_max_error"]  # of the same tensor
    row[f"{ORT}_allowed_error"] = worst["allowed_error"]
    steps[ORT] = step


def capture_graph(step: Callable):
    """The step captured in a CUDA graph: (graph, its output tensors)."""
    # Warm-up on a side stream, as torch.cuda.graph's documentation asks.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def graph_replays(label: str, steps: dict[str, Callable], names: list[str], theirs, reference,
                  dtype: torch.dtype, row: dict) -> dict[str, Callable]:
    """nn.LSTM's and FusedLSTM's steps replayed from CUDA graphs, FusedLSTM's checked
    again; a capture that fails is recorded in the row and left out."""
    replays = {}
    for key in (NN_LSTM, FUSED):
        try:
            graph, outputs = capture_graph(steps[key])
        except Exception as error:  # noqa: BLE001  (whatever the reason, it is a result)
            row[f"{key}_graph_capture_error"] = str(error).splitlines()[0]
            continue
        if key == FUSED:
            graph.replay()
            check_outputs(f"{label}, replayed from a CUDA graph", names, outputs, theirs,
                          reference, dtype)
        replays[f"{key}_graph"] = graph.replay
    return replays


def training_peak_mib(step: Callable) -> float:
    """Memory a training step allocates at its peak, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outputs = step()
    torch.cuda.synchronize()
    del outputs
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(shape: Shape, dtype_name: str, mode: str, args, settings: Settings,
             onnxruntime=None) -> dict:
    dtype = DTYPES[dtype_name]
    label = f"{shape.name} ({shape.dims()}) {dtype_name} {MODE_LABELS[mode]}"
    torch.manual_seed(0)
    modules = make_modules(shape, args, dtype)
    x, cotangents = make_inputs(shape, args, dtype)
    steps = {key: make_step(module, mode, x, cotangents) for key, module in modules.items()}
    row = {
        "shape": shape.name, "T": shape.seq_len, "B": shape.batch, "I": shape.input_size,
        "H": shape.hidden_size, "layers": args.layers, "bidirectional": args.bidirectional,
        "dtype": dtype_name, "mode": mode,
    }
    theirs, reference = expected_outputs(modules, steps, mode, dtype, x, cotangents)
    names = output_names(modules[NN_LSTM], mode)
    try:
        ours = steps[FUSED]()
    except (RuntimeError, NotImplementedError) as error:
        raise CheckFailed(f"{label}: it raised {type(error).__name__}: "
                          f"{str(error).splitlines()[0]}") from error
    row.update(check_outputs(label, names, ours, theirs, reference, dtype))
    del ours
    if onnxruntime is not None and mode == "fwd":
        add_onnxruntime(onnxruntime, label, dtype_name, modules, steps, x, names, theirs,
                        reference, row)

    if args.loop == "never":
        row[f"{LOOP}_skipped"] = "--loop never"
    else:
        loop_s = estimate_loop_s(modules[LOOP], shape, args, dtype, mode)
        limit_s = loop_limit_s(settings)
        row["loop_estimate_ms"], row["loop_limit_ms"] = loop_s * 1e3, limit_s * 1e3
        if args.loop == "auto" and loop_s > limit_s:
            row[f"{LOOP}_skipped"] = (f"estimated {format_seconds(loop_s)} per call, limit "
                                      f"{format_seconds(limit_s)}")
    if f"{LOOP}_skipped" in row:
        del steps[LOOP]

    if mode == "fwdbwd" and args.device == "cuda":
        for key, step in steps.items():
            row[f"{key}_peak_mib"] = training_peak_mib(step)

    graphs = graph_replays(label, steps, names, theirs, reference, dtype, row) if args.graph else {}
    del theirs, reference

    row.update(summarise(time_interleaved({**steps, **graphs}, settings)))
    return row


# --- reporting --------------------------------------------------------------------------------

def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def header(meta: dict, args: argparse.Namespace, settings: Settings, onnxruntime) -> str:
    cpu = (f"{meta['cpu']}, {meta['logical_cpus']} logical CPUs; ISA: torch "
           f"{meta['torch_cpu_capability']}, fused_lstm's CPU kernels "
           f"{meta['fused_lstm_cpu_capability']}; {plural(meta['threads'], 'CPU thread')}")
    commit = f" (git {meta['git_commit']})" if meta["git_commit"] else ""
    lines = ["## fused_lstm benchmark", ""]
    if meta["device"] == "cuda":
        lines += [
            (f"- GPU: {meta['gpu']} ({meta['multiprocessors']} SMs, {meta['gpu_memory_gib']} "
             f"GiB), CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; float32 precision of cuDNN's "
             f"RNNs {meta['cudnn_rnn_fp32_precision']}, of matmuls "
             f"{meta['matmul_fp32_precision']}"),
            f"- host CPU: {cpu}",
        ]
    else:
        lines.append(f"- CPU: {cpu}")
    lines += [
        (f"- torch {meta['torch']}, fused_lstm {meta['fused_lstm']}{commit}, Python "
         f"{meta['python']}; {meta['date']}"),
        (f"- {args.layers} layer{'s' if args.layers > 1 else ''}, "
         f"{'bidirectional' if args.bidirectional else 'one direction'}, time-major input, "
         "no initial state; fwd: inference under no_grad; fwd+bwd: a training step (forward, "
         "gradients of the input and of every parameter)"),
        (f"- times: median ms per call over {settings.rounds} interleaved rounds "
         "(torch.utils.benchmark), the rounds' interquartile range in brackets; speed-up: "
         "the other's median time divided by FusedLSTM's (above 1: FusedLSTM is faster)"),
    ]
    if args.loop == "never":
        lines.append("- Python loop: not timed (--loop never)")
    else:
        rule = ("timed in every case" if args.loop == "always" else
                f"timed where that estimate is at most {format_seconds(loop_limit_s(settings))} "
                f"(a case calls it about {settings.rounds + LOOP_EXTRA_CALLS} times, within "
                f"{format_seconds(settings.loop_budget_s)}), else skipped")
        lines.append(f"- Python loop (--loop {args.loop}): its time per call is estimated from "
                     f"the median of {LOOP_PROBE_CALLS} calls of its first {LOOP_PROBE_STEPS} "
                     f"steps, scaled to T; {rule}")
    if onnxruntime is not None:
        lines.append(
            f"- onnxruntime {meta['onnxruntime']} (CPU inference, {' and '.join(ORT_DTYPES)}): "
            "the ONNX export of the same nn.LSTM (torch.onnx.export, its LSTM operator), "
            f"{plural(meta['threads'], 'intra-op thread')}, spinning off, outputs held to "
            "FusedLSTM's check; min(nn.LSTM, onnxruntime): the faster of the two")
    elif args.device == "cpu" and "fwd" in MODES[args.mode]:
        lines.append("- onnxruntime: " + ("left out (--no-onnxruntime)" if not args.onnxruntime
                     else "not installed (pip install onnxruntime onnx onnxscript)"))
    if meta["device"] == "cuda":
        lines.append("- train peak MiB: torch.cuda.max_memory_allocated() during one training "
                     "step, less what was allocated before it")
    if args.graph:
        lines.append("- graph: the same step captured once in a CUDA graph and replayed")
    return "\n".join(lines)


def decimals(ms: float) -> int:
    """Decimals that print ``ms`` to four significant digits."""
    return max(0, 3 - math.floor(math.log10(ms))) if ms > 0 else 3


def time_heading(key: str) -> str:
    base, graph, _ = key.partition("_graph")
    return f"{LABELS[base]}{' graph' if graph else ''} ms (IQR)"


def format_ms(row: dict, key: str) -> str:
    if f"{key}_capture_error" in row:
        return "capture failed"
    if f"{key}_skipped" in row:
        return f"skipped ({row[f'{key}_skipped']})"
    value = row.get(f"{key}_ms")
    if value is None:
        return "–"
    places = decimals(value)
    return f"{value:.{places}f} ({row[f'{key}_iqr_ms']:.{places}f})"


def format_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(rows: list[dict], device: str, graph: bool) -> str:
    with_ort = any(f"{ORT}_ms" in row or f"{ORT}_skipped" in row for row in rows)
    timed = [LOOP, NN_LSTM] + ([ORT] if with_ort else []) + [FUSED]
    speedups = ["speedup_vs_nn_lstm"]
    if with_ort:
        speedups += ["speedup_vs_onnxruntime", "speedup_vs_fastest_library"]
    speedups.append("speedup_vs_loop")
    if graph:
        timed += [f"{NN_LSTM}_graph", f"{FUSED}_graph"]
        speedups.append("graph_speedup_vs_nn_lstm")
    columns = (["shape", "T, B, I, H", "dtype", "mode"] + [time_heading(key) for key in timed]
               + [SPEEDUPS[name][2] for name in speedups])
    memory = device == "cuda" and any(row["mode"] == "fwdbwd" for row in rows)
    if memory:
        columns += [f"train peak MiB {LABELS[key]}" for key in (LOOP, NN_LSTM, FUSED)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["shape"], f"{row['T']}, {row['B']}, {row['I']}, {row['H']}", row["dtype"],
                 MODE_LABELS[row["mode"]]]
        cells += [format_ms(row, key) for key in timed]
        cells += [format_ratio(row.get(name)) for name in speedups]
        if memory:
            cells += [f"{row[f'{key}_peak_mib']:.1f}" if f"{key}_peak_mib" in row else "–"
                      for key in (LOOP, NN_LSTM, FUSED)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, meta: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    options = {key: (str(value) if isinstance(value, Path) else value)
               for key, value in vars(args).items() if key != "shapes"}
    options["shapes"] = [shape.name for shape in args.shapes]
    with open(out / "results.json", "w") as f:
        json.dump({"machine": meta, "options": options, "results": rows}, f, indent=2)
    # The CSV holds one value per cell: the per-round times stay in the JSON.
    fields: list[str] = []
    for row in rows:
        fields += [key for key, value in row.items()
                   if not isinstance(value, list) and key not in fields]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(out / "speedups.png", meta, rows)


# The speed-ups plotted, one row of panels each, where any case has them.
PLOTTED = [("speedup_vs_nn_lstm", "nn.LSTM"),
           ("speedup_vs_fastest_library", "min(nn.LSTM, onnxruntime)"),
           ("speedup_vs_loop", "the Python loop")]
FASTER, SLOWER = "#2e7d32", "#c62828"
HATCHES = ["", "//", "..", "xx"]  # one per dtype, in the order of --dtype


def speedup_ticks(bottom: float, top: float) -> list[float]:
    """Ticks of a log axis from bottom to top (at most 1 / 1.5 and at least 1.5): 1, and
    on either side of it up to four that are not crowded against it, at least one."""
    span = math.log(top / bottom)
    candidates = (1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
    ticks = [1.0]
    for power, limit in ((1, top), (-1, 1 / bottom)):
        within = [c for c in candidates if c <= limit * (1 + 1e-9)]
        steps = [c for c in within if math.log(c) >= 0.08 * span] or within[-1:]
        ticks += [c**power for c in steps[::math.ceil(len(steps) / 4)]]
    return sorted(ticks)


def plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """FusedLSTM's speed-ups as bars from 1x on a log axis (up and green: faster; down and
    red: slower): one row of panels per baseline, one panel per mode, the shapes along x,
    one bar per dtype in each shape's group."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed (pip install matplotlib): no {path.name}; "
              "results.json and results.csv are written", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.patches import Patch

    modes = list(dict.fromkeys(row["mode"] for row in rows))
    shapes = {row["shape"]: f"{row['T']}, {row['B']}, {row['I']}, {row['H']}" for row in rows}
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    baselines = [(key, text) for key, text in PLOTTED if any(key in row for row in rows)]
    by_case = {(row["shape"], row["dtype"], row["mode"]): row for row in rows}
    width = 0.8 / len(dtypes)
    figure, axes = plt.subplots(
        len(baselines), len(modes), squeeze=False,
        figsize=(max(4.5, 0.7 * len(shapes) * len(dtypes) + 1.5) * len(modes),
                 3.2 * len(baselines) + 1.0))
    for (key, baseline), axes_row in zip(baselines, axes):
        for mode, ax in zip(modes, axes_row):
            bars, missing = [], []  # (x, dtype's index, speed-up); x of cases without one
            for i, shape in enumerate(shapes):
                for k, dtype in enumerate(dtypes):
                    x = i + (k - (len(dtypes) - 1) / 2) * width
                    value = by_case.get((shape, dtype, mode), {}).get(key)
                    if value is not None:
                        bars.append((x, k, value))
                    elif (shape, dtype, mode) in by_case:
                        missing.append(x)
            title = f"{MODE_LABELS[mode]}: speed-up over {baseline}"
            if not bars:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{title}:\nnot measured", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="grey")
                continue
            # Room on both sides of 1 whatever the bars, and above and below them for labels.
            values = [value for _, _, value in bars]
            bottom, top = min(1 / 1.5, min(values) / 1.6), max(1.5, max(values) * 1.6)
            ax.set_yscale("log")
            ax.set_ylim(bottom, top)
            for x, k, value in bars:
                faster = value >= 1
                ax.bar(x, value - 1, width * 0.9, bottom=1, color=FASTER if faster else SLOWER,
                       hatch=HATCHES[k % len(HATCHES)], edgecolor="white", linewidth=0)
                ax.annotate(f"{value:.2f}×", (x, value), xytext=(0, 2 if faster else -2),
                            textcoords="offset points", ha="center",
                            va="bottom" if faster else "top", fontsize=7)
            for x in missing:
                ax.annotate("not timed", (x, 1.0), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6, color="grey")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.yaxis.set_major_locator(ticker.FixedLocator(speedup_ticks(bottom, top)))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(
                lambda v, _: f"{v:g}×" if v >= 1 else f"{v:.2g}×"))
            ax.tick_params(axis="y", labelsize=7)
            ax.set_xticks(range(len(shapes)), [f"{name}\n({dims})" for name, dims in
                                               shapes.items()], fontsize=7)
            ax.set_xlim(-0.6, len(shapes) - 0.4)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("FusedLSTM's speed-up (log scale)", fontsize=8)
    if meta["device"] == "cuda":
        device = f"{meta['gpu']}, CUDA {meta['cuda']}"
    else:
        device = (f"{meta['cpu']}, {meta['torch_cpu_capability']} "
                  f"(fused_lstm {meta['fused_lstm_cpu_capability']}), "
                  f"{plural(meta['threads'], 'thread')}")
    figure.suptitle(f"FusedLSTM's speed-ups, {meta['date']}\n{device}; torch {meta['torch']}",
                    fontsize=9)
    handles = [Patch(color=FASTER, label="FusedLSTM faster"),
               Patch(color=SLOWER, label="FusedLSTM slower")]
    if len(dtypes) > 1:
        handles += [Patch(facecolor="white", edgecolor="black",
                          hatch=HATCHES[k % len(HATCHES)], label=dtype)
                    for k, dtype in enumerate(dtypes)]
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8,
                  bbox_to_anchor=(0.5, 1 - 0.42 / figure.get_figheight()), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.62 / figure.get_figheight()))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cell" in argv:  # the cell's benchmark, with its own options (benchmarks/cell.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import cell

        return cell.main([a for a in argv if a != "--cell"])
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = timing_settings(args.device, args.quick)
    onnxruntime = import_onnxruntime(args)
    meta = machine(args.device, onnxruntime)
    print(header(meta, args, settings, onnxruntime), flush=True)
    cases = [(shape, dtype, mode) for shape in args.shapes for dtype in args.dtype
             for mode in MODES[args.mode]]
    rows = []
    with tqdm(cases, file=sys.stderr, unit="case", dynamic_ncols=True) as progress:
        for shape, dtype, mode in progress:
            progress.set_description(f"{shape.name} {dtype} {MODE_LABELS[mode]}")
            rows.append(run_case(shape, dtype, mode, args, settings, onnxruntime))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print()
    print(markdown_table(rows, args.device, args.graph))
    if args.out is not None:
        write_results(args.out, meta, args, rows)
        print(f"\nresults written to {args.out}/", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
