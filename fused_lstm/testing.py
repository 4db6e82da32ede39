"""Checking FusedLSTM's accuracy against the nn.LSTM it replaces (as torch.testing does for
torch), on any shapes, dtype and device.

The rule, for every output and every gradient, at the dtype both implementations run in::

    max |ours - exact|  <=  SLACK * max |theirs - exact|  +  ROUNDING * rounding

- ``exact`` is a float64 run on the same inputs and weights (already rounded to the dtype,
  so that both implementations and the float64 run see identical values);
- ``theirs`` is nn.LSTM at that dtype on the same device and inputs: FusedLSTM may lose at
  most twice what nn.LSTM itself loses;
- ``rounding`` is what rounding the float64 values to the dtype costs (half a unit in the
  last place of its largest values: measured on the tensor, and at least half the spacing
  of the dtype in the binade of its largest value, which a small tensor may miss), plus half a
  unit of float32 at size ``max(1, max |exact|)``: both implementations compute in float32
  and round the gates, values of size 1, at every step. It keeps a test from demanding the
  impossible where nn.LSTM happens to be almost exact; in bfloat16 and float16 its float32
  part is negligible.

SLACK = 2 and ROUNDING = 2 (fused_lstm.testing.SLACK, .ROUNDING), with no fixed floor: in
bfloat16 the rounding term is about 4e-3 on values of size 1, 2 x nn.LSTM's error on the CPU
about 1e-2, so an output 2% off fails (a floor of 4 x eps, 0.031, let it through). The rule
is for float32, bfloat16 and float16: float64 has no more precise run to compare with (the
tests compare float64 runs with nn.LSTM's directly, to 1e-10).

    from fused_lstm.testing import compare_with_nn_lstm
    report = compare_with_nn_lstm(FusedLSTM(64, 128).bfloat16(), torch.randn(50, 8, 64).bfloat16())
    assert all(e.ok for e in report), report
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .modules import convert

SLACK = 2.0
ROUNDING = 2.0
FLOAT32_UNIT = torch.finfo(torch.float32).eps / 2


@dataclass(frozen=True)
class TensorError:
    """The errors against the float64 run of one output or gradient."""

    name: str
    ours: float  # max |ours - exact|
    theirs: float  # max |theirs - exact|
    rounding: float  # max |exact - exact.to(dtype)|

    @property
    def allowed(self) -> float:
        return SLACK * self.theirs + ROUNDING * self.rounding

    @property
    def ok(self) -> bool:
        return self.ours <= self.allowed  # False for a NaN

    def __str__(self) -> str:
        return (f"{self.name}: error {self.ours:.3g}, nn.LSTM's {self.theirs:.3g}, rounding "
                f"{self.rounding:.3g}, allowed {self.allowed:.3g} ({SLACK:g} x nn.LSTM's + "
                f"{ROUNDING:g} x rounding)")


def _max_difference(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _rounding(exact: Tensor, dtype: torch.dtype) -> float:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the rule is for float32, bfloat16 and float16, got {dtype}")
    largest = exact.abs().max().item() if exact.numel() else 0.0
    # Half the spacing of the dtype's values in the binade of the largest value: what
    # rounding a value of that size can cost. Measured on a tensor of a few elements, the
    # rounding may be far less by chance, and would then demand of ours what rounding
    # itself does not give (a 3-element bfloat16 state, say); on larger tensors the two agree.
    binade = 2.0 ** math.floor(math.log2(largest)) if 0 < largest < math.inf else 0.0
    rounded = max(_max_difference(exact, exact.to(dtype)), torch.finfo(dtype).eps / 2 * binade)
    return rounded + FLOAT32_UNIT * max(1.0, largest)


def errors(ours: Sequence[Tensor], theirs: Sequence[Tensor], exact: Sequence[Tensor],
           names: Sequence[str] | None = None) -> list[TensorError]:
    """The rule's terms for each tensor of ``ours`` (at its own dtype), ``theirs`` (the
    same tensors from nn.LSTM) and ``exact`` (from the float64 run)."""
    ours, theirs, exact = list(ours), list(theirs), list(exact)
    if not len(ours) == len(theirs) == len(exact):
        raise ValueError(f"got {len(ours)}, {len(theirs)} and {len(exact)} tensors")
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(ours))]
    result = []
    for name, o, t, e in zip(names, ours, theirs, exact):
        if o.shape != t.shape or o.shape != e.shape or o.dtype != t.dtype:
            raise ValueError(f"{name}: ours is {o.dtype} {list(o.shape)}, nn.LSTM's "
                             f"{t.dtype} {list(t.shape)}, the float64 run's {list(e.shape)}")
        result.append(TensorError(name, _max_difference(o, e), _max_difference(t, e),
                                  _rounding(e, o.dtype)))
    return result


def assert_as_accurate_as(ours: Sequence[Tensor], theirs: Sequence[Tensor],
                          exact: Sequence[Tensor], names: Sequence[str] | None = None
                          ) -> list[TensorError]:
    """Raises AssertionError, naming each tensor that breaks the rule, unless every tensor
    of ``ours`` is as accurate as ``theirs`` (see the module's docstring)."""
    report = errors(ours, theirs, exact, names)
    failed = [str(e) for e in report if not e.ok]
    if failed:
        raise AssertionError("less accurate than nn.LSTM: " + "; ".join(failed))
    return report


def compare_with_nn_lstm(module: nn.Module, input: Tensor | PackedSequence,
                         hx: tuple[Tensor, Tensor] | None = None) -> list[TensorError]:
    """Runs ``module`` (a FusedLSTM), an nn.LSTM with its configuration, dtype, device and
    weights, and a float64 copy, on ``input`` and ``hx``; returns the rule's terms for the
    output, h_n, c_n and the gradients of the input, hx and every parameter under one
    random weighting of the outputs. Dropout must be off (eval mode, or dropout=0): it
    would compare different random draws."""
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ValueError("dropout draws random numbers: compare in eval mode or with dropout=0")
    weight = module.weight_ih_l0
    lstm = convert(nn.LSTM, module)
    exact = copy.deepcopy(lstm).double()
    data = input.data if isinstance(input, PackedSequence) else input
    # rounded to the dtype first, so that the float64 run sees the same values
    leaves = [t.detach().to(weight.dtype) for t in (data, *(hx or ()))]
    generator = torch.Generator(device=weight.device).manual_seed(0)
    names = ["output", "h_n", "c_n", "grad of input"]
    names += [f"grad of {n}" for n in ("h_0", "c_0")[:len(hx or ())]]
    names += [f"grad of {n}" for n, _ in module.named_parameters()]
    runs = []
    for m in (module, lstm, exact):
        dtype = m.weight_ih_l0.dtype
        run_leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
        run_input = run_leaves[0]
        if isinstance(input, PackedSequence):
            run_input = PackedSequence(run_input, *input[1:])
        state = tuple(run_leaves[1:]) or None
        out, (h_n, c_n) = m(run_input, state)
        outputs = [out.data if isinstance(out, PackedSequence) else out, h_n, c_n]
        if not runs:  # one weighting for all three, drawn at the dtype of ours
            cotangents = [torch.randn(t.shape, device=t.device, dtype=t.dtype,
                                      generator=generator) for t in outputs]
        grads = torch.autograd.grad(outputs, run_leaves + list(m.parameters()),
                                    [c.to(dtype) for c in cotangents])
        runs.append([t.detach() for t in outputs] + list(grads))
    return errors(*runs, names)
