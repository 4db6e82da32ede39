"""The native ops, torch.ops.fused_lstm.forward and .backward (csrc/lstm.h has their
contract): loading them, their fake implementations (torch.compile, torch.export, the
meta device) and the forward's autograd formula.

The backward op is not itself differentiable. When a backward runs under
``create_graph=True`` and something in it needs a gradient (double backward, gradient
penalties), the gradient is computed instead through the reference loop, which autograd
differentiates to any order: slower, never wrong.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.fused_lstm.*)
from . import reference

forward = torch.ops.fused_lstm.forward.default
backward = torch.ops.fused_lstm.backward.default


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and save gates and cells in."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@torch.library.register_fake("fused_lstm::forward")
def _forward_fake(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse):
    torch._check(input.dim() == 3, lambda: f"fused_lstm: expected a 3-D input, got {input.dim()}-D")
    seq_len, batch, _ = input.shape
    hidden4, out_size = w_hh.shape
    hidden = hidden4 // 4
    acc = accumulate_dtype(input.dtype)
    return (
        input.new_empty(seq_len, batch, out_size),
        input.new_empty(batch, out_size),
        input.new_empty(batch, hidden),
        input.new_empty(seq_len, batch, hidden4, dtype=acc),
        input.new_empty(seq_len, batch, hidden, dtype=acc),
    )


@torch.library.register_fake("fused_lstm::backward")
def _backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                   batch_sizes, reverse, output, gates, cells):
    return (
        input.new_empty(input.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
        w_hh.new_empty(w_hr.shape if w_hr is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, out, gates, cells)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(gates, cells)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
    differentiable = (input, h0, c0, w_ih, w_hh, bias, w_hr)
    grads_out = (grad_output, grad_h_n, grad_c_n)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in differentiable + grads_out
    ):
        return _backward_through_reference(
            differentiable, grads_out, batch_sizes, ctx.reverse, ctx.needs_input_grad
        )
    grads = backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                     batch_sizes, ctx.reverse, out, gates, cells)
    grads = list(grads)
    if bias is None:
        grads[5] = None
    if w_hr is None:
        grads[6] = None
    return (*grads, None, None)


def _backward_through_reference(differentiable, grads_out, batch_sizes, reverse, needs_grad):
    """The first derivative as a differentiable graph, for create_graph=True."""
    dtype = differentiable[0].dtype
    acc = accumulate_dtype(dtype)
    with torch.enable_grad():
        # Leaves that need no gradient of their own stand in for inputs that need none.
        args = [
            None if t is None else (t if t.requires_grad else t.detach().requires_grad_())
            for t in differentiable
        ]
        outputs = reference.lstm_layer(
            *(None if t is None else t.to(acc) for t in args),
            batch_sizes=batch_sizes, reverse=reverse,
        )
        pairs = [(o, g) for o, g in zip(outputs, grads_out) if g is not None]
        wanted = [i for i, t in enumerate(args) if t is not None and needs_grad[i]]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [args[i] for i in wanted], [g.to(acc) for _, g in pairs],
            create_graph=True, allow_unused=True,
        ) if pairs and wanted else ()
    result = [None] * (len(differentiable) + 2)
    for i, g in zip(wanted, grads):
        result[i] = None if g is None else g.to(dtype)
    return tuple(result)


torch.library.register_autograd("fused_lstm::forward", _backward, setup_context=_setup_context)
