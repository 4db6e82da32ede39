"""The fused ops' derivatives beyond the first (double backward, nested torch.func
transforms), forward-mode AD, and their vmap rules. Derivatives are taken through the reference loop, which autograd differentiates to any
order (slower, never wrong), in the kernels' accumulate dtype. There an absent bias,
output gradient or tangent is the zeros the kernels read it as (made here, never
requiring grad); w_hr, whose absence changes the layer, stays optional and comes last,
so that leaving it out moves no other.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.fused_lstm.*)
from . import reference

forward = torch.ops.fused_lstm.forward.default
backward = torch.ops.fused_lstm.backward.default


def _layer_params(input, h0, c0, w_ih, w_hh, bias, w_hr):
    """The params the reference loop is differentiated in: a zero bias for none, w_hr if any."""
    bias = w_hh.new_zeros(w_hh.shape[0]) if bias is None else bias
    return (input, h0, c0, w_ih, w_hh, bias) + (() if w_hr is None else (w_hr,))


def _zeros_for_none(tensors, like):
    return tuple(torch.zeros_like(p) if t is None else t for t, p in zip(tensors, like))


def _reference_layer(batch_sizes, reverse, acc):
    """reference.lstm_layer of :func:`_layer_params`, computed in ``acc``, in the input's dtype."""
    def layer(*params):
        outputs = reference.lstm_layer(*(p.to(acc) for p in params), batch_sizes=batch_sizes,
                                       reverse=reverse)
        return tuple(o.to(params[0].dtype) for o in outputs)

    return layer


def _jvp(f, primals, tangents):
    """J·v of f at primals, from two reverse passes: v ↦ J·v is the vector-Jacobian
    product of the linear map u ↦ Jᵀ·u. (torch.func.jvp would nest a forward-mode level
    inside torch.autograd.forward_ad's, which torch refuses.)"""
    outputs, vjp = torch.func.vjp(f, *primals)
    _, vjp_of_vjp = torch.func.vjp(lambda *u: vjp(u), *(torch.zeros_like(o) for o in outputs))
    return vjp_of_vjp(tangents)


class _DifferentiableBackward(torch.autograd.Function):
    """The backward op's seven results (its arguments, and bias), differentiable: what the
    forward's formula returns under create_graph=True and torch.func. Its own derivatives
    are those of the reference loop's first derivative. Its primals are the three output
    gradients, then :func:`_layer_params`; ``bias`` is not read by the op (the saved gates
    hold its effect) but is a primal, so that second derivatives reach it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(batch_sizes, reverse, output, gates, cells, *primals):
        w_hr = primals[9] if len(primals) > 9 else None
        return backward(*primals[:8], w_hr, batch_sizes, reverse, output, gates, cells)

    @staticmethod
    def setup_context(ctx, inputs, output):
        batch_sizes, ctx.reverse, _, gates, _ = inputs[:5]
        ctx.save_for_backward(batch_sizes, *inputs[5:])
        ctx.save_for_forward(batch_sizes, *inputs[5:])
        ctx.acc = gates.dtype  # the kernels keep the gates in their accumulate dtype

    @staticmethod
    def backward(ctx, *grad_grads):
        first_derivative, primals = _first_derivative(ctx)
        results, vjp = torch.func.vjp(first_derivative, *primals)
        return (None,) * 5 + vjp(_zeros_for_none(grad_grads, results))

    @staticmethod
    def jvp(ctx, *tangents):
        first_derivative, primals = _first_derivative(ctx)
        results = _jvp(first_derivative, primals, _zeros_for_none(tangents[5:], primals))
        # without w_hr the op returns an empty grad_w_hr
        return results + (primals[3].new_empty(0),) * (7 - len(results))


def _first_derivative(ctx):
    """What _DifferentiableBackward differentiates, and its primals: the backward op's
    results as a function of ``(grad_output, grad_h_n, grad_c_n, *params)`` through the
    reference loop, with torch.func (differentiable again, also inside transforms)."""
    batch_sizes, *primals = ctx.saved_tensors
    layer = _reference_layer(batch_sizes, ctx.reverse, ctx.acc)

    def first_derivative(grad_output, grad_h_n, grad_c_n, *params):
        return torch.func.vjp(layer, *params)[1]((grad_output, grad_h_n, grad_c_n))

    return first_derivative, primals


def _per_member(op, info, in_dims, args):
    """``op`` once per vmapped member, stacked: right for any batching, and the rule that keeps
    weight gradients per member (the kernels sum them over the batch)."""
    results = [op(*(a if d is None else a.select(d, n) for a, d in zip(args, in_dims)))
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
def _forward_vmap(info, in_dims, input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse,
                  save_for_backward=True):
    args = (input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse, save_for_backward)
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
    output, h_n, c_n, gates, cells = forward(input, h0, c0, w_ih, w_hh, bias, w_hr,
                                             batch_sizes, reverse, save_for_backward)
    unfolded = (output.unflatten(1, (-1, size)), h_n.unflatten(0, (-1, size)),
                c_n.unflatten(0, (-1, size)))
    if not save_for_backward:  # gates and cells are empty: nothing per member
        return (*unfolded, gates, cells), (2, 1, 1, None, None)
    return (*unfolded, gates.unflatten(1, (-1, size)), cells.unflatten(1, (-1, size))), \
        (2, 1, 1, 2, 2)


@torch.library.register_vmap("fused_lstm::backward")
def _backward_vmap(info, in_dims, *args):
    return _per_member(backward, info, in_dims, args)
