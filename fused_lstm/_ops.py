"""The Python side of the native ops, torch.ops.fused_lstm.forward and .backward
(csrc/lstm.h has their contract): loading them, their fakes (torch.compile, torch.export,
the meta device), the autograd formula, and :func:`run_forward`. The first derivative is
always the fused backward op's; its own derivatives, forward-mode AD and vmap are in
fused_lstm/_transforms.py.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.fused_lstm.*)
from ._transforms import (_DifferentiableBackward, _jvp, _layer_params, _reference_layer,
                          _zeros_for_none)

forward = torch.ops.fused_lstm.forward.default
backward = torch.ops.fused_lstm.backward.default


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and save gates and cells in."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@torch.library.register_fake("fused_lstm::forward")
def _forward_fake(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse,
                  save_for_backward=True):
    torch._check(input.dim() == 3, lambda: f"fused_lstm: expected a 3-D input, got {input.dim()}-D")
    seq_len, batch, _ = input.shape
    hidden4, out_size = w_hh.shape
    acc = accumulate_dtype(input.dtype)
    saved = (seq_len, batch, hidden4), (seq_len, batch, hidden4 // 4)
    return (
        input.new_empty(seq_len, batch, out_size),
        input.new_empty(batch, out_size),
        input.new_empty(batch, hidden4 // 4),
        *(input.new_empty(shape if save_for_backward else (0,), dtype=acc) for shape in saved),
    )


@torch.library.register_fake("fused_lstm::backward")
def _backward_fake(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                   batch_sizes, reverse, output, gates, cells, input_grad=True):
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
        w_hh.new_empty(w_hr.shape if w_hr is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse = inputs[:9]
    out, _, _, gates, cells = output
    ctx.save_for_backward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, out, gates, cells)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(gates, cells)
    # Unused outputs (gates and cells always, often h_n and c_n) pass None to the
    # backward op, which reads it as zero, rather than tensors of zeros filled each step.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
    # Grad mode is on in a backward only under create_graph=True (and torch.func): then the
    # gradients may be differentiated again.
    if torch.is_grad_enabled():
        grads_out = _zeros_for_none((grad_output, grad_h_n, grad_c_n), (out, h0, c0))
        grads = list(_DifferentiableBackward.apply(
            batch_sizes, ctx.reverse, out, gates, cells, *grads_out,
            *_layer_params(input, h0, c0, w_ih, w_hh, bias, w_hr)))
    else:
        # Without a gradient of the input (a first layer's data), its GEMM is skipped.
        grads = list(backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                              batch_sizes, ctx.reverse, out, gates, cells,
                              ctx.needs_input_grad[0]))
        if not ctx.needs_input_grad[0]:
            grads[0] = None
    if bias is None:
        grads[5] = None
    if w_hr is None:
        grads[6] = None
    return (*grads, None, None)


torch.library.register_autograd("fused_lstm::forward", _backward, setup_context=_setup_context)


class ForwardFunction(torch.autograd.Function):
    """The forward op with the same formula, as the autograd.Function that torch.func
    transforms and forward-mode AD need: register_autograd's generated Function lacks
    setup_context, which functorch requires (pytorch issue 170834, torch <= 2.13), and a
    jvp (the op under forward AD leaves its outputs without tangents). The op keeps
    register_autograd for everything else: direct calls and torch.compile, whose dynamo
    refuses a Function with a custom jvp. Its vmap rule comes from the ops' own."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:8])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, *tangents):
        *params, batch_sizes = ctx.saved_tensors
        primals = _layer_params(*params)
        layer = _reference_layer(batch_sizes, ctx.reverse, accumulate_dtype(params[0].dtype))
        return (*_jvp(layer, primals, _zeros_for_none(tangents[:7], primals)), None, None)


def run_forward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse):
    """The forward op's output, h_n and c_n, run in the form the call needs:
    ForwardFunction under torch.func transforms and forward-mode AD, compiled or not (the
    op fails or drops the tangents there); the op where it may be differentiated and under
    tracing (an exporter records it); else with save_for_backward=False, and outside
    torch.compile below autograd, which would only pass it through (its formula costs
    microseconds of Python per call: a streaming model calls the op once per frame)."""
    args = (input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return ForwardFunction.apply(*args)[:3]
    if torch.jit.is_tracing() or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return forward(*args)[:3]
    if torch.compiler.is_compiling():
        return forward(*args, False)[:3]
    with torch._C._AutoDispatchBelowAutograd():
        return forward(*args, False)[:3]
