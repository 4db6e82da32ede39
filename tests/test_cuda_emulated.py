"""The CUDA op's host code and step kernels, run on the CPU: every thread of each launch
a fiber of its own, meeting the others only at the kernel's barriers (tests/emulator),
against the CPU op. Catches indexing, tiling, masking and step-order bugs of the CUDA
kernels, and a missing barrier, without a GPU."""
import pytest
import torch

import emulator
import fused_lstm  # noqa: F401  (registers the ops)
from conftest import max_error
from fused_lstm import reference
from test_op import make_args, random_batch_sizes

emulated = emulator.load()
emulated_forward = emulated.forward
emulated_backward = emulated.backward
forward = torch.ops.fused_lstm.forward
backward = torch.ops.fused_lstm.backward

# T, B, I, H, P: partial tiles of units (H = 33, 40), one row (B = 1), both tiles (the
# small-batch tile up to 64 rows, then the large one: B = 70 has a partial row block).
SHAPES = [
    (1, 1, 1, 1, None), (4, 3, 5, 33, None), (3, 70, 4, 40, None), (5, 1, 3, 8, None),
    (3, 5, 2, 9, 4), (2, 66, 3, 6, 3), (6, 2, 0, 3, None),
]
DTYPES = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def assert_close(a, b, dtype):
    """Within the bound of `dtype`, plus one rounding of a's own dtype: a result rounded to
    bfloat16/float16 from nearly equal float32 values may land one step apart."""
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert max_error(a, b) <= (DTYPES[dtype] + torch.finfo(a.dtype).eps) * scale


@pytest.mark.parametrize("T,B,I,H,P", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_forward_and_backward_match_cpu_op(T, B, I, H, P, reverse, packed, dtype):
    """Low-precision dtypes differ from the CPU op only in where they round: both
    compute in float32 from the same rounded weights."""
    args = make_args(T, B, I, H, P, dtype=dtype, bias=H != 9, scale=0.5)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    ours = emulated_forward(*args, batch_sizes, reverse)
    theirs = forward(*args, batch_sizes, reverse)
    for a, b in zip(ours, theirs):
        assert_close(a, b, dtype)
    out, h_n, c_n, gates, cells = theirs
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    saved = (*args[:5], args[6], batch_sizes, reverse, out, gates, cells)
    for a, b in zip(emulated_backward(*grads, *saved), backward(*grads, *saved)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("kernel", ["step", "persistent"])
@pytest.mark.parametrize("P", [None, 4])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_float64_matches_reference(kernel, P, reverse, packed):
    """Against the float64 reference loop rather than the CPU op, which shares the step
    bookkeeping (csrc/steps.h) with these kernels: only an oracle of its own sees a fault
    there. The persistent kernel on an H100's geometry (with a projection, the step kernels)."""
    T, B, I, H = 6, 5, 3, 7
    args = make_args(T, B, I, H, P)
    batch_sizes = torch.tensor([5, 4, 4, 2, 1, 1]) if packed else None
    device = (132, 232448) if kernel == "persistent" else ()
    run_forward = emulated.persistent_forward if device else emulated_forward
    run_backward = emulated.persistent_backward if device else emulated_backward
    out, h_n, c_n, gates, cells = run_forward(*args, batch_sizes, reverse, *device)
    leaves = [a.clone().requires_grad_() for a in args if a is not None]
    it = iter(leaves)
    expected = reference.lstm_layer(*[None if a is None else next(it) for a in args],
                                    batch_sizes=batch_sizes, reverse=reverse)
    for a, b in zip((out, h_n, c_n), expected):
        assert max_error(a, b) < 1e-12
    grads = [torch.randn_like(t) for t in (out, h_n, c_n)]
    theirs = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, expected)), leaves)
    ours = run_backward(*grads, *args[:5], args[6], batch_sizes, reverse, out, gates, cells,
                        *device)
    for a, b in zip([t for t in ours if t.numel()], theirs):
        assert max_error(a, b) < 1e-11


@pytest.mark.parametrize("which", range(4))
def test_backward_with_some_gradients_undefined(which):
    args = make_args(5, 4, 3, 6)
    batch_sizes = torch.tensor([4, 3, 3, 1, 1])
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, True)
    grads = [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n)]
    if which < 3:
        grads[which] = None
    else:
        grads = [None, None, None]
    saved = (*args[:5], None, batch_sizes, True, out, gates, cells)
    for a, b in zip(emulated_backward(*grads, *saved), backward(*grads, *saved)):
        assert max_error(a, b) < 1e-12


def test_dead_rows_are_zero():
    T, B = 5, 3
    args = make_args(T, B, 2, 4)
    batch_sizes = torch.tensor([3, 3, 2, 1, 1])
    for reverse in (False, True):
        out, h_n, c_n, gates, cells = emulated_forward(*args, batch_sizes, reverse)
        for t, n in enumerate(batch_sizes.tolist()):
            assert out[t, n:].eq(0).all() and gates[t, n:].eq(0).all() and cells[t, n:].eq(0).all()
            assert out[t, :n].ne(0).all()


def test_non_contiguous_and_empty_batch():
    args = make_args(4, 3, 5, 6)
    strided = [a.t().contiguous().t() if a is not None and a.dim() == 2 else a for a in args]
    strided[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    for a, b in zip(emulated_forward(*strided, None, False), forward(*args, None, False)):
        assert max_error(a, b) < 1e-12
    out, h_n, c_n, gates, cells = emulated_forward(*make_args(3, 0, 2, 4), None, False)
    assert out.shape == (3, 0, 4) and h_n.shape == (0, 4) and gates.shape == (3, 0, 16)


def test_bad_arguments_are_checked():
    args = make_args(3, 2, 4, 5)
    args[1] = args[1][:-1]
    with pytest.raises(RuntimeError, match="h0 of shape"):
        emulated_forward(*args, None, False)
