"""The benchmark: the Python time-step loop, nn.LSTM and FusedLSTM side by side.

    python benchmarks/run.py                        # default shapes and dtypes of the device
    python benchmarks/run.py --device cpu --quick   # a short CPU run (under 3 minutes on 2 cores)
    python benchmarks/run.py --shapes mid 50,8,64,128 --dtype float32 bfloat16 --out bench-out

In one process, for each shape, dtype and mode, three modules share one state_dict:
fused_lstm.ReferenceLSTM (the seed's time-step loop behind FusedLSTM's interface),
torch.nn.LSTM and FusedLSTM. Before a case is timed, FusedLSTM's outputs (and, for a
training step, every gradient) are checked against nn.LSTM's, both measured against a
float64 run; the benchmark stops if FusedLSTM is less accurate than nn.LSTM allows.

Times come from torch.utils.benchmark.Timer (it synchronises CUDA). The implementations
are timed in interleaved rounds, alternating their order, so that a machine whose speed
drifts affects them alike; a time is the median over rounds, and a speed-up the median
over rounds of the ratio of two times taken side by side.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
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
LOOP, NN_LSTM, FUSED = "loop", "nn_lstm", "fused"
LABELS = {LOOP: "Python loop", NN_LSTM: "nn.LSTM", FUSED: "FusedLSTM"}

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
        description="Time the Python loop, nn.LSTM and FusedLSTM, sharing one state_dict.",
        epilog="Shape presets (T, B, I, H): "
        + "; ".join(f"{name} {dims}" for name, dims in PRESETS.items()),
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
                        "and the gradients of the input and every parameter")
    parser.add_argument("--graph", action="store_true",
                        help="CUDA only: also time nn.LSTM and FusedLSTM replayed from a CUDA "
                        "graph")
    parser.add_argument("--quick", action="store_true",
                        help="by default only seed and b1 (CPU) or seed and mid (CUDA), float32; "
                        "3 rounds of 0.05 s blocks; the loop only where it takes under 10 s")
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


def machine(device: str) -> dict:
    """What the figures were measured on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
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
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def estimate_loop_s(module: nn.Module, shape: Shape, args, dtype, mode: str,
                    settings: Settings) -> float:
    """The loop's seconds per call, from a few of its steps: its cost is linear in T."""
    steps = min(shape.seq_len, 8)
    x, cotangents = make_inputs(shape, args, dtype, seq_len=steps)
    timer = make_timer(make_step(module, mode, x, cotangents))
    return timer.blocked_autorange(min_run_time=settings.block_s).median * shape.seq_len / steps


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


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


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


def run_case(shape: Shape, dtype_name: str, mode: str, args, settings: Settings) -> dict:
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

    loop_s = estimate_loop_s(modules[LOOP], shape, args, dtype, mode, settings)
    row["loop_estimate_ms"] = loop_s * 1e3
    # A case calls each step about rounds + 3 times: warm-up, rounds, peak memory.
    if loop_s * (settings.rounds + 3) > settings.loop_budget_s:
        row["loop_skipped"] = f"~{loop_s:.1f} s per call"
        del steps[LOOP]

    if mode == "fwdbwd" and args.device == "cuda":
        for key, step in steps.items():
            row[f"{key}_peak_mib"] = training_peak_mib(step)

    graphs = graph_replays(label, steps, names, theirs, reference, dtype, row) if args.graph else {}
    del theirs, reference

    times = time_interleaved({**steps, **graphs}, settings)
    for key, seconds in times.items():
        row[f"{key}_ms"] = statistics.median(seconds) * 1e3
        row[f"{key}_rounds_ms"] = [s * 1e3 for s in seconds]
    row["speedup_vs_nn_lstm"] = median_ratio(times[NN_LSTM], times[FUSED])
    if LOOP in times:
        row["speedup_vs_loop"] = median_ratio(times[LOOP], times[FUSED])
    if f"{NN_LSTM}_graph" in times and f"{FUSED}_graph" in times:
        row["graph_speedup_vs_nn_lstm"] = median_ratio(times[f"{NN_LSTM}_graph"],
                                                       times[f"{FUSED}_graph"])
    return row


# --- reporting --------------------------------------------------------------------------------

def header(meta: dict, args: argparse.Namespace, settings: Settings) -> str:
    if meta["device"] == "cuda":
        device = (f"{meta['gpu']} ({meta['multiprocessors']} SMs, {meta['gpu_memory_gib']} GiB), "
                  f"CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; float32 precision of cuDNN's "
                  f"RNNs {meta['cudnn_rnn_fp32_precision']}, of matmuls "
                  f"{meta['matmul_fp32_precision']}; host {meta['cpu']}")
    else:
        device = f"CPU: {meta['cpu']} ({meta['logical_cpus']} logical CPUs)"
    commit = f" (git {meta['git_commit']})" if meta["git_commit"] else ""
    lines = [
        "## fused_lstm benchmark",
        "",
        f"- {device}",
        (f"- torch {meta['torch']}, {meta['threads']} CPU threads, fused_lstm "
         f"{meta['fused_lstm']}{commit}, Python {meta['python']}; {meta['date']}"),
        (f"- {args.layers} layer{'s' if args.layers > 1 else ''}, "
         f"{'bidirectional' if args.bidirectional else 'one direction'}, time-major input, "
         "no initial state; fwd: inference under no_grad; fwd+bwd: a training step (forward, "
         "gradients of the input and of every parameter)"),
        (f"- times: median ms per call over {settings.rounds} interleaved rounds "
         "(torch.utils.benchmark); speed-up: median over rounds of the other's time divided "
         "by FusedLSTM's (above 1: FusedLSTM is faster)"),
    ]
    if meta["device"] == "cuda":
        lines.append("- train peak MiB: torch.cuda.max_memory_allocated() during one training "
                     "step, less what was allocated before it")
    if args.graph:
        lines.append("- graph: the same step captured once in a CUDA graph and replayed")
    return "\n".join(lines)


def format_ms(row: dict, key: str) -> str:
    if f"{key}_capture_error" in row:
        return "capture failed"
    if key == LOOP and "loop_skipped" in row:
        return f"skipped ({row['loop_skipped']})"
    value = row.get(f"{key}_ms")
    return "–" if value is None else f"{value:.3f}"


def format_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(rows: list[dict], device: str, graph: bool) -> str:
    columns = ["shape", "T, B, I, H", "dtype", "mode", "Python loop ms", "nn.LSTM ms",
               "FusedLSTM ms", "speed-up vs nn.LSTM", "speed-up vs loop"]
    if graph:
        columns += ["nn.LSTM graph ms", "FusedLSTM graph ms", "graph speed-up vs nn.LSTM"]
    memory = device == "cuda" and any(row["mode"] == "fwdbwd" for row in rows)
    if memory:
        columns += [f"train peak MiB {LABELS[key]}" for key in (LOOP, NN_LSTM, FUSED)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["shape"], f"{row['T']}, {row['B']}, {row['I']}, {row['H']}", row["dtype"],
                 MODE_LABELS[row["mode"]], format_ms(row, LOOP), format_ms(row, NN_LSTM),
                 format_ms(row, FUSED), format_ratio(row.get("speedup_vs_nn_lstm")),
                 format_ratio(row.get("speedup_vs_loop"))]
        if graph:
            cells += [format_ms(row, f"{NN_LSTM}_graph"), format_ms(row, f"{FUSED}_graph"),
                      format_ratio(row.get("graph_speedup_vs_nn_lstm"))]
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


def plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """FusedLSTM's speed-ups by shape: over nn.LSTM (top) and over the loop (bottom), one
    column per mode, one bar per dtype."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed (pip install matplotlib): no {path.name}; "
              "results.json and results.csv are written", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = list(dict.fromkeys(row["mode"] for row in rows))
    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    baselines = [("speedup_vs_nn_lstm", "over nn.LSTM"),
                 ("speedup_vs_loop", "over the Python loop")]
    by_case = {(row["shape"], row["dtype"], row["mode"]): row for row in rows}
    figure, axes = plt.subplots(len(baselines), len(modes), squeeze=False,
                                figsize=(max(7.0, 1.5 * len(shapes) * len(modes) + 2), 8))
    width = 0.8 / len(dtypes)
    times = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}×")
    for (key, baseline), axes_row in zip(baselines, axes):
        for mode, ax in zip(modes, axes_row):
            for k, dtype in enumerate(dtypes):
                values = [by_case.get((shape, dtype, mode), {}).get(key, math.nan)
                          for shape in shapes]
                bars = ax.bar([i + (k - (len(dtypes) - 1) / 2) * width for i in range(len(shapes))],
                              values, width, label=dtype)
                ax.bar_label(bars, [f"{v:.2f}" if math.isfinite(v) else "" for v in values],
                             fontsize=7)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(times)
            ax.yaxis.set_minor_formatter(times)
            ax.tick_params(axis="y", which="both", labelsize=7)
            ax.set_xticks(range(len(shapes)), shapes)
            ax.set_title(MODE_LABELS[mode], fontsize=10)
            ax.set_ylabel(f"FusedLSTM's speed-up {baseline}", fontsize=9)
            ax.margins(y=0.1)
    device = meta.get("gpu") if meta["device"] == "cuda" else meta["cpu"]
    figure.suptitle(f"{device}, torch {meta['torch']}, {meta['threads']} CPU threads, "
                    f"{meta['date']}", fontsize=10)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(dtypes),
                  bbox_to_anchor=(0.5, 0.96), fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = timing_settings(args.device, args.quick)
    meta = machine(args.device)
    cases = [(shape, dtype, mode) for shape in args.shapes for dtype in args.dtype
             for mode in MODES[args.mode]]
    rows = []
    with tqdm(cases, file=sys.stderr, unit="case", dynamic_ncols=True) as progress:
        for shape, dtype, mode in progress:
            progress.set_description(f"{shape.name} {dtype} {MODE_LABELS[mode]}")
            rows.append(run_case(shape, dtype, mode, args, settings))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(header(meta, args, settings))
    print()
    print(markdown_table(rows, args.device, args.graph))
    if args.out is not None:
        write_results(args.out, meta, args, rows)
        print(f"\nresults written to {args.out}/", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
