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
def _forward_fake(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse,
                  save_for_backward=True):
    torch._check(input.dim() == 3, lambda: f"fused_lstm: expected a 3-D input, got {input.dim()}-D")
    seq_len, batch, _ = input.shape
    hidden4, out_size = w_hh.shape
    hidden = hidden4 // 4
    acc = accumulate_dtype(input.dtype)
    saved = (seq_len, batch, hidden4), (seq_len, batch, hidden)
    return (
        input.new_empty(seq_len, batch, out_size),
        input.new_empty(batch, out_size),
        input.new_empty(batch, hidden),
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
    args = (grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, batch_sizes,
            ctx.reverse, out, gates, cells)
    # Grad mode is on in a backward only under create_graph=True (and torch.func): then the
    # gradients may be differentiated again.
    if torch.is_grad_enabled():
        grads = list(BackwardFunction.apply(*args[:8], bias, *args[8:]))
    else:
        # Without a gradient of the input (a first layer's data), its GEMM is skipped.
        grads = list(backward(*args, ctx.needs_input_grad[0]))
        if not ctx.needs_input_grad[0]:
            grads[0] = None
    if bias is None:
        grads[5] = None
    if w_hr is None:
        grads[6] = None
    return (*grads, None, None)


class BackwardFunction(torch.autograd.Function):
    """The backward op, made differentiable: the first derivative is always the fused
    kernel's; its own derivatives (double backward, gradient penalties, nested torch.func
    transforms, forward-over-reverse) are computed through the reference loop, and only
    when asked for.

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
        ctx.save_for_forward(*inputs[:11])
        ctx.reverse = inputs[11]

    @staticmethod
    def backward(ctx, *grad_grads):
        *saved, batch_sizes = ctx.saved_tensors
        derivative = _FirstDerivative(saved[:3], saved[3:], batch_sizes, ctx.reverse)
        results, vjp = torch.func.vjp(derivative, *derivative.primals)
        cotangents = [torch.zeros_like(r) if g is None else g.to(r.dtype)
                      for r, g in zip(results, derivative.select(grad_grads))]
        grads = derivative.unflatten(vjp(tuple(cotangents)))
        return (*grads, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        *saved, batch_sizes = ctx.saved_tensors
        derivative = _FirstDerivative(saved[:3], saved[3:], batch_sizes, ctx.reverse)
        out_tangents = _jvp(derivative, derivative.primals, derivative.tangents(tangents[:10]))
        return derivative.outputs(out_tangents, saved[3], saved[9])


def _jvp(f, primals, tangents):
    """J·v of f at primals, from two reverse passes: v ↦ J·v is the vector-Jacobian
    product of the linear map u ↦ Jᵀ·u. (torch.func.jvp would nest a forward-mode level
    inside torch.autograd.forward_ad's, which torch refuses.)"""
    outputs, vjp = torch.func.vjp(f, *primals)
    _, vjp_of_vjp = torch.func.vjp(lambda *u: vjp(u), *(torch.zeros_like(o) for o in outputs))
    return vjp_of_vjp(tuple(tangents))


def _present(tensors):
    return [i for i, t in enumerate(tensors) if t is not None]


def _fill(template, indices, values):
    filled = list(template)
    for i, v in zip(indices, values):
        filled[i] = v
    return filled


def _tangent_or_zeros(tangent, primal):
    return torch.zeros_like(primal) if tangent is None else tangent.to(primal.dtype)


def _reference_layer(params, batch_sizes, reverse):
    """reference.lstm_layer as a function of the present ones of params (input, h0, c0,
    w_ih, w_hh, bias, w_hr), and those primals."""
    present = _present(params)

    def layer(*tensors):
        return reference.lstm_layer(*_fill(params, present, tensors), batch_sizes=batch_sizes,
                                    reverse=reverse)

    return layer, tuple(params[i] for i in present)


def _reference_vjp(params, grads_out, batch_sizes, reverse):
    """The first derivative through the reference loop: the gradients of the layer's
    params (None where absent) given those of its outputs (None for zero). Built with
    torch.func, so it is differentiable again both under autograd and inside torch.func
    transforms."""
    layer, primals = _reference_layer(params, batch_sizes, reverse)
    outputs, vjp = torch.func.vjp(layer, *primals)
    cotangents = tuple(_tangent_or_zeros(g, o) for o, g in zip(outputs, grads_out))
    return _fill([None] * len(params), _present(params), vjp(cotangents))


class _FirstDerivative:
    """The backward op's result (grad_input ... grad_w_hr) as a function of the present
    ones of its differentiable arguments (grads_out, then params), computed through
    :func:`_reference_vjp` in the accumulate dtype; what BackwardFunction differentiates.
    Without a bias the op still returns the gradient of a zero bias: so does this."""

    def __init__(self, grads_out, params, batch_sizes, reverse):
        params = list(params)
        self.bias_given = params[5] is not None
        if params[5] is None:
            params[5] = params[3].new_zeros(params[3].shape[0])
        self.grads_out, self.params = list(grads_out), params
        self.batch_sizes, self.reverse = batch_sizes, reverse
        self.present_out, self.present_params = _present(self.grads_out), _present(params)
        self.primals = tuple([self.grads_out[i] for i in self.present_out]
                             + [params[i] for i in self.present_params])
        self.acc = accumulate_dtype(params[0].dtype)

    def __call__(self, *tensors):
        tensors = [t.to(self.acc) for t in tensors]
        split = len(self.present_out)
        grads_out = _fill(self.grads_out, self.present_out, tensors[:split])
        params = _fill(self.params, self.present_params, tensors[split:])
        grads = _reference_vjp(params, grads_out, self.batch_sizes, self.reverse)
        return tuple(grads[i] for i in self.present_params)

    def select(self, per_param):
        """Of one value per param, those of the present params."""
        return [per_param[i] for i in self.present_params]

    def tangents(self, per_argument):
        """Tangents of the primals, from one per differentiable argument (grads_out and
        params, bias before w_hr as BackwardFunction takes them)."""
        per_argument = list(per_argument[:3]) + list(per_argument[3:])
        chosen = [per_argument[i] for i in self.present_out] + \
                 [per_argument[3 + i] for i in self.present_params]
        return tuple(_tangent_or_zeros(t, p) for t, p in zip(chosen, self.primals))

    def unflatten(self, grads):
        """Gradients of the primals, as one entry (or None) per argument; none for the
        zero bias that stands in for an absent one."""
        split = len(self.present_out)
        per_param = _fill([None] * len(self.params), self.present_params, grads[split:])
        if not self.bias_given:
            per_param[5] = None
        return (*_fill([None] * 3, self.present_out, grads[:split]), *per_param)

    def outputs(self, results, input, w_hr):
        """The backward op's seven results, in the input's dtype, from those computed
        (one per present param); an empty grad_w_hr without w_hr, as the op returns."""
        full = _fill([None] * len(self.params), self.present_params, results)
        full = [None if r is None else r.to(input.dtype) for r in full]
        if w_hr is None:
            full[6] = input.new_empty(0)
        return tuple(full)


torch.library.register_autograd("fused_lstm::forward", _backward, setup_context=_setup_context)


class ForwardFunction(torch.autograd.Function):
    """The forward op with the same autograd formula, as an autograd.Function that
    torch.func transforms accept (grad, vjp, vmap of either): the Function that
    register_autograd generates lacks setup_context, which functorch requires (pytorch
    issue 170834, torch <= 2.13), and forward-mode AD, which this one has (jvp, through
    the reference loop: correct, slower). Its vmap rule comes from the ops' own."""

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
        dtype = params[0].dtype
        acc = accumulate_dtype(dtype)
        layer, primals = _reference_layer([None if p is None else p.to(acc) for p in params],
                                          batch_sizes, ctx.reverse)
        chosen = [_tangent_or_zeros(tangents[i], params[i]).to(acc) for i in _present(params)]
        out_tangents = _jvp(layer, primals, tuple(chosen))
        return (*(t.to(dtype) for t in out_tangents), None, None)


def needs_function_form() -> bool:
    """Whether the op must run as ForwardFunction: under torch.func transforms, or with
    forward-mode AD active (neither reaches register_autograd's formula)."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0)


def needs_saving(args) -> bool:
    """Whether a forward with these arguments may be differentiated: grad mode on and some
    tensor requiring grad. Otherwise nothing is kept for a backward."""
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def forward_inference(*args):
    """The forward op with save_for_backward=False: output, h_n, c_n. Outside
    torch.compile it dispatches below autograd, which would only pass it through (its
    registered formula costs microseconds of Python per call: a streaming model calls
    the op once per frame)."""
    if torch.compiler.is_compiling():
        return forward(*args, False)[:3]
    with torch._C._AutoDispatchBelowAutograd():
        return forward(*args, False)[:3]


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
    output, h_n, c_n, gates, cells = forward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes,
                                             reverse, save_for_backward)
    unfolded = (output.unflatten(1, (-1, size)), h_n.unflatten(0, (-1, size)),
                c_n.unflatten(0, (-1, size)))
    if not save_for_backward:  # gates and cells are empty: nothing per member
        return (*unfolded, gates, cells), (2, 1, 1, None, None)
    return (*unfolded, gates.unflatten(1, (-1, size)), cells.unflatten(1, (-1, size))), \
        (2, 1, 1, 2, 2)


@torch.library.register_vmap("fused_lstm::backward")
def _backward_vmap(info, in_dims, *args):
    return _per_member(backward, info, in_dims, args)


def run_forward(*args):
    if needs_function_form():
        return ForwardFunction.apply(*args)[:3]
    if needs_saving(args) or torch.jit.is_tracing():
        return forward(*args)[:3]
    return forward_inference(*args)
