"""The native ops, torch.ops.fused_lstm.forward and .backward (csrc/lstm.h has their
contract): loading them, their fake implementations (torch.compile, torch.export, the
meta device) and the forward's autograd formula.

The backward op is wrapped to be differentiable: the first derivative is always the
fused kernel's, and when something differentiates it again (double backward, gradient
penalties, nested torch.func transforms) that second derivative is computed through the
reference loop, which autograd differentiates to any order: slower, never wrong.
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
    # Unused outputs (gates and cells always, often h_n and c_n) pass None to the
    # backward op, which reads it as zero, rather than tensors of zeros filled each step.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, out, gates, cells = ctx.saved_tensors
    args = (grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
            ctx.reverse, out, gates, cells)
    # Grad mode is on in a backward only under create_graph=True (and torch.func): then the
    # gradients may be differentiated again.
    if torch.is_grad_enabled():
        grads = list(BackwardFunction.apply(*args[:8], bias, *args[8:]))
    else:
        grads = list(backward(*args))
    if bias is None:
        grads[5] = None
    if w_hr is None:
        grads[6] = None
    return (*grads, None, None)


class BackwardFunction(torch.autograd.Function):
    """The backward op, made differentiable: the first derivative is always the fused
    kernel's; its own derivative (double backward, gradient penalties, nested torch.func
    transforms) is computed through the reference loop, and only when asked for.

    ``bias`` is not read by the op (the saved gates hold its effect) but is an input here,
    so that second derivatives reach it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, bias, w_hr,
                batch_sizes, reverse, output, gates, cells):
        return backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr,
                        batch_sizes, reverse, output, gates, cells)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:11])
        ctx.reverse = inputs[11]

    @staticmethod
    def backward(ctx, *grad_grads):
        *saved, batch_sizes = ctx.saved_tensors
        grads_out, params = saved[:3], saved[3:]
        grads = _reference_double_backward(grads_out, params, grad_grads, batch_sizes,
                                           ctx.reverse)
        return (*grads, None, None, None, None, None)


def _present(tensors):
    return [i for i, t in enumerate(tensors) if t is not None]


def _fill(template, indices, values):
    filled = list(template)
    for i, v in zip(indices, values):
        filled[i] = v
    return filled


def _reference_vjp(params, grads_out, batch_sizes, reverse):
    """The first derivative through the reference loop: the gradients of the layer's
    params (input, h0, c0, w_ih, w_hh, bias, w_hr; None where absent) given those of its
    outputs (None for zero). Built with torch.func, so it is differentiable again both
    under autograd and inside torch.func transforms."""
    present = _present(params)

    def layer(*tensors):
        return reference.lstm_layer(*_fill(params, present, tensors), batch_sizes=batch_sizes,
                                    reverse=reverse)

    outputs, vjp = torch.func.vjp(layer, *(params[i] for i in present))
    cotangents = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads_out))
    return _fill([None] * len(params), present, vjp(cotangents))


def _reference_double_backward(grads_out, params, grad_grads, batch_sizes, reverse):
    """The gradients of (grads_out, params) given those of the first derivative's results
    (grad_grads, one per param), through :func:`_reference_vjp`, computed in the
    accumulate dtype."""
    acc = accumulate_dtype(params[0].dtype)
    present_out, present_params = _present(grads_out), _present(params)

    def first_derivative(*tensors):
        tensors = [t.to(acc) for t in tensors]
        g = _fill(grads_out, present_out, tensors[:len(present_out)])
        p = _fill(params, present_params, tensors[len(present_out):])
        grads = _reference_vjp(p, g, batch_sizes, reverse)
        return tuple(grads[i] for i in present_params)

    primals = [grads_out[i] for i in present_out] + [params[i] for i in present_params]
    results, vjp = torch.func.vjp(first_derivative, *primals)
    cotangents = tuple(torch.zeros_like(r) if grad_grads[i] is None else grad_grads[i].to(acc)
                       for i, r in zip(present_params, results))
    grads = vjp(cotangents)
    return (*_fill([None] * 3, present_out, grads[:len(present_out)]),
            *_fill([None] * len(params), present_params, grads[len(present_out):]))


torch.library.register_autograd("fused_lstm::forward", _backward, setup_context=_setup_context)


class ForwardFunction(torch.autograd.Function):
    """The forward op with the same autograd formula, as an autograd.Function that
    torch.func transforms accept (grad, vjp, vmap of either): the Function that
    register_autograd generates lacks setup_context, which functorch requires (pytorch
    issue 170834, torch <= 2.13). Its vmap rule comes from the ops' own."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return forward(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _member(arg, in_dim, n):
    return arg if in_dim is None else arg.select(in_dim, n)


def _per_member(op, info, in_dims, args):
    """Runs ``op`` once per vmapped member and stacks the results: right for any
    batching, and the rule that keeps weight gradients per member (the kernels sum
    them over the batch)."""
    results = [op(*(_member(a, d, n) for a, d in zip(args, in_dims)))
               for n in range(info.batch_size)]
    return tuple(torch.stack(outputs) for outputs in zip(*results)), (0,) * len(results[0])


def _fold(t, in_dim, batch_dim, size):
    """``t`` with the vmapped members folded into its batch dimension, member-minor:
    row ``b * size + n`` is row b of member n."""
    if in_dim is None:
        t = t.unsqueeze(batch_dim + 1).expand(*t.shape[:batch_dim + 1], size,
                                              *t.shape[batch_dim + 1:])
    else:
        t = t.movedim(in_dim, batch_dim + 1)
    return t.flatten(batch_dim, batch_dim + 1)


@torch.library.register_vmap("fused_lstm::forward")
def _forward_vmap(info, in_dims, input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse):
    args = (input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)
    if any(d is not None for d in in_dims[3:]):
        return _per_member(forward, info, in_dims, args)
    # Shared weights (per-sample gradients, a batch of independent inputs): one call over
    # the members' rows side by side. Member-minor order keeps the rows of a packed
    # batch sorted by length, each step's live rows scaled by the number of members.
    size = info.batch_size
    input = _fold(input, in_dims[0], 1, size)
    h0 = _fold(h0, in_dims[1], 0, size)
    c0 = _fold(c0, in_dims[2], 0, size)
    if batch_sizes is not None:
        batch_sizes = batch_sizes * size
    output, h_n, c_n, gates, cells = forward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes,
                                             reverse)
    unfolded = (output.unflatten(1, (-1, size)), h_n.unflatten(0, (-1, size)),
                c_n.unflatten(0, (-1, size)), gates.unflatten(1, (-1, size)),
                cells.unflatten(1, (-1, size)))
    return unfolded, (2, 1, 1, 2, 2)


@torch.library.register_vmap("fused_lstm::backward")
def _backward_vmap(info, in_dims, *args):
    return _per_member(backward, info, in_dims, args)
