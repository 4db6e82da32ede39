"""The cell benchmark: FusedLSTMCell, nn.LSTMCell and the seed's per-step expression, each
called once per step from a Python loop, as decoders and samplers call them.

    python benchmarks/cell.py                   # B = 1, 32; H = 256, 1024 (I = H); both modes
    python benchmarks/cell.py --quick           # fewer, shorter rounds
    python benchmarks/cell.py --batch 1 --hidden 256 --mode fwd --threads 1 --out cell-out

What is timed is a loop over ``--steps`` steps (100) carrying the state: ``fwd`` under
no_grad (inference); ``fwdbwd`` a training step: the loop, a loss on every step's h and
the last c, and the gradients of the input, the initial state and every parameter. The
three share nn.LSTMCell's weights (the seed's as its twelve per-gate tensors, as d2l's
``lstm`` holds them). Before a case is timed, FusedLSTMCell's final state (and gradients)
are checked against nn.LSTMCell's, both measured against nn.LSTMCell run in float64: the
benchmark stops if FusedLSTMCell is less accurate than twice nn.LSTMCell plus 4 units of
rounding (the test suite's rule).

Implementations are timed in interleaved rounds (the order reversed every other round) with
torch.utils.benchmark; a time is the median over rounds (with its interquartile range), a
ratio the ratio of two medians.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import benchmark

from fused_lstm import FusedLSTMCell, reference

SEED, NN_CELL, FUSED = "seed", "nn_lstm_cell", "fused"
LABELS = {SEED: "seed step", NN_CELL: "nn.LSTMCell", FUSED: "FusedLSTMCell"}
MODE_LABELS = {"fwd": "inference", "fwdbwd": "training step"}
# Issue 17's goals, FusedLSTMCell's time over nn.LSTMCell's, by batch size (at H = 256).
GOALS = {1: 0.6, 32: 0.8}
SLACK, ROUNDING = 2.0, 4


class SeedCell(nn.Module):
    """The seed's step (fused_lstm.reference.step) on its own twelve parameters, copied
    from an nn.LSTMCell: contiguous ``[I, H]``/``[H, H]`` matrices and ``[H]`` biases."""

    def __init__(self, cell: nn.LSTMCell) -> None:
        super().__init__()
        bias = cell.bias_ih + cell.bias_hh
        gates = reference.gate_parameters(cell.weight_ih, cell.weight_hh, bias)
        self.gates = nn.ParameterList(
            nn.Parameter(t.detach().contiguous()) for gate in gates for t in gate)

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        p = list(self.gates)
        return reference.step(x, *hx, (p[0:3], p[3:6], p[6:9], p[9:12]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time FusedLSTMCell, nn.LSTMCell and the seed's step in a Python loop.")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], metavar="B")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024], metavar="H",
                        help="hidden sizes; the input size is the same")
    parser.add_argument("--mode", nargs="+", choices=list(MODE_LABELS),
                        default=list(MODE_LABELS))
    parser.add_argument("--steps", type=int, default=100, help="steps per loop (default 100)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.1 s blocks")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write results.json there")
    args = parser.parse_args(argv)
    for name in ("batch", "hidden"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} must be positive")
    if args.steps < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps and --threads must be at least 1")
    args.rounds, args.block_s = (3, 0.1) if args.quick else (7, 0.3)
    return args


def cpu() -> dict:
    """The CPU as lscpu names it (model name, family, model) and what torch runs on it."""
    info = {"model_name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in info:
                    info[key] = value.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    info["model_name"] = info.pop("model name", info["model_name"])
    info["capability"] = torch.backends.cpu.get_cpu_capability()
    info["threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    return info


def make_cells(batch: int, hidden: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    cell = nn.LSTMCell(hidden, hidden)
    return {SEED: SeedCell(cell), NN_CELL: cell, FUSED: FusedLSTMCell.from_lstm_cell(cell)}


def make_step(cell: nn.Module, mode: str, xs: Tensor, hx: tuple[Tensor, Tensor],
              cotangent: Tensor) -> Callable[[], list[Tensor]]:
    """The timed call: the loop over xs from hx; for a training step, then the gradients.
    Returns the last state (and the gradients), for the check."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                state = hx
                for x in xs:
                    state = cell(x, state)
            return list(state)
        return step
    xs = xs.detach().requires_grad_()
    hx = tuple(h.detach().requires_grad_() for h in hx)
    leaves = [xs, *hx, *cell.parameters()]

    def step():
        state, hs = hx, []
        for x in xs:
            state = cell(x, state)
            hs.append(state[0])
        loss = (torch.stack(hs) * cotangent).sum() + state[1].sum()
        return [*state, *torch.autograd.grad(loss, leaves)]
    return step


def scaled_error(value: Tensor, exact: Tensor) -> float:
    """max |value - exact| in units of exact's largest magnitude (at least 1)."""
    scale = max(1.0, exact.abs().max().item())
    return (value.double() - exact).abs().max().item() / scale


def check(label: str, ours: list[Tensor], theirs: list[Tensor], exact: list[Tensor]) -> float:
    """Stops the benchmark unless FusedLSTMCell is as accurate as nn.LSTMCell; returns
    FusedLSTMCell's largest error. The seed's gradients are of its own twelve tensors, so
    only FusedLSTMCell is checked (it shares nn.LSTMCell's parameters)."""
    eps = torch.finfo(ours[0].dtype).eps
    worst = 0.0
    for k, (o, t, r) in enumerate(zip(ours, theirs, exact, strict=True)):
        ours_error, their_error = scaled_error(o, r), scaled_error(t, r)
        if not ours_error <= SLACK * their_error + ROUNDING * eps:  # `not <=`: a NaN fails
            raise SystemExit(f"benchmark stopped, FusedLSTMCell is wrong: {label}: result {k}: "
                             f"error {ours_error:.3g}, nn.LSTMCell's {their_error:.3g}")
        worst = max(worst, ours_error)
    return worst


def time_interleaved(steps: dict[str, Callable], rounds: int,
                     block_s: float) -> dict[str, list[float]]:
    """Seconds per call of each step, one block of calls per step per round."""
    timers = {key: benchmark.Timer("step()", globals={"step": step},
                                   num_threads=torch.get_num_threads())
              for key, step in steps.items()}
    calls = {}
    for key, timer in timers.items():
        timer.timeit(1)  # warm-up
        calls[key] = max(1, round(block_s / timer.timeit(1).median))
    times: dict[str, list[float]] = {key: [] for key in steps}
    for r in range(rounds):
        for key in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            times[key].append(timers[key].timeit(calls[key]).median)
    return times


def run_case(batch: int, hidden: int, mode: str, args) -> dict:
    cells = make_cells(batch, hidden)
    xs = torch.randn(args.steps, batch, hidden)
    hx = (torch.randn(batch, hidden), torch.randn(batch, hidden))
    cotangent = torch.randn(args.steps, batch, hidden)
    steps = {key: make_step(cell, mode, xs, hx, cotangent) for key, cell in cells.items()}
    exact = make_step(copy.deepcopy(cells[NN_CELL]).double(), mode, xs.double(),
                      tuple(h.double() for h in hx), cotangent.double())()
    label = f"B={batch} H={hidden} {MODE_LABELS[mode]}"
    row = {"B": batch, "H": hidden, "I": hidden, "steps": args.steps, "mode": mode,
           "fused_max_error": check(label, steps[FUSED](), steps[NN_CELL](), exact)}
    times = time_interleaved(steps, args.rounds, args.block_s)
    for key, seconds in times.items():
        quartiles = statistics.quantiles(seconds, n=4)
        row[f"{key}_ms"] = statistics.median(seconds) * 1e3
        row[f"{key}_iqr_ms"] = (quartiles[2] - quartiles[0]) * 1e3
        row[f"{key}_rounds_ms"] = [s * 1e3 for s in seconds]
    row["fused_over_nn_lstm_cell"] = row[f"{FUSED}_ms"] / row[f"{NN_CELL}_ms"]
    row["speedup_vs_seed"] = row[f"{SEED}_ms"] / row[f"{FUSED}_ms"]
    return row


def header(info: dict, args) -> str:
    return "\n".join([
        "## FusedLSTMCell benchmark",
        "",
        (f"- CPU: {info['model_name']} (family {info.get('cpu family', '?')}, model "
         f"{info.get('model', '?')}), torch capability {info['capability']}, "
         f"{info['threads']} threads; torch {info['torch']}"),
        (f"- ms per loop of {args.steps} steps: inference under no_grad; training step = the "
         "loop, a loss on every h, and the gradients of the input, state and parameters"),
        (f"- median over {args.rounds} interleaved rounds (IQR in brackets); ratios of medians; "
         "goal: FusedLSTMCell ÷ nn.LSTMCell time at H = 256"),
    ])


def markdown_table(rows: list[dict]) -> str:
    columns = ["B", "H = I", "mode", *(f"{LABELS[k]} ms" for k in (SEED, NN_CELL, FUSED)),
               "FusedLSTMCell ÷ nn.LSTMCell", "goal", "speed-up vs seed step"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        goal = GOALS.get(row["B"]) if row["H"] == 256 else None
        ratio = row["fused_over_nn_lstm_cell"]
        verdict = "–" if goal is None else f"≤ {goal} {'met' if ratio <= goal else 'not met'}"
        cells = [str(row["B"]), str(row["H"]), MODE_LABELS[row["mode"]],
                 *(f"{row[f'{k}_ms']:.2f} ({row[f'{k}_iqr_ms']:.2f})"
                   for k in (SEED, NN_CELL, FUSED)),
                 f"{ratio:.2f}", verdict, f"{row['speedup_vs_seed']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = cpu()
    rows = []
    for batch in args.batch:
        for hidden in args.hidden:
            for mode in args.mode:
                rows.append(run_case(batch, hidden, mode, args))
                print(f"B={batch} H={hidden} {MODE_LABELS[mode]}: FusedLSTMCell ÷ nn.LSTMCell "
                      f"{rows[-1]['fused_over_nn_lstm_cell']:.2f}", file=sys.stderr)
    print(header(info, args))
    print()
    print(markdown_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        with open(args.out / "results.json", "w") as f:
            json.dump({"machine": info, "options": options, "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
