"""The native op (one layer, one direction) against the float64 reference loop."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

import fused_lstm  # noqa: F401  (registers the ops)
from fused_lstm import reference
from fused_lstm.functional import packed_positions, padded_to_packed
from conftest import assert_as_accurate_as, max_error

forward = torch.ops.fused_lstm.forward
backward = torch.ops.fused_lstm.backward


@pytest.fixture(params=["persistent", "stepwise", "stepwise-library"])
def cpu_path(request, monkeypatch):
    """Runs a test on every CPU path of the recurrence (csrc/cpu/lstm_cpu.cpp): the
    persistent one, and step by step with our row products (the default for a few rows,
    as every shape here has) or the library's GEMMs."""
    path, _, product = request.param.partition("-")
    monkeypatch.setenv("FUSED_LSTM_CPU_PATH", path)
    if product:
        monkeypatch.setenv("FUSED_LSTM_CPU_PRODUCT", product)
    return path


ARG_NAMES = ["input", "h0", "c0", "w_ih", "w_hh", "bias", "w_hr"]


def make_args(T, B, I, H, P=None, dtype=torch.float64, bias=True, device="cpu", scale=1.0):
    """Random op arguments: input, h0, c0, w_ih, w_hh, bias, w_hr."""
    P = P or H
    r = lambda *s: (torch.randn(*s, dtype=torch.float64) * scale).to(device, dtype)  # noqa: E731
    return [r(T, B, I), r(B, P), r(B, H), r(4 * H, I), r(4 * H, P),
            r(4 * H) if bias else None, r(P, H) if P != H else None]


def random_batch_sizes(T, B):
    """Non-increasing, starting at B, each at least 1."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    lengths = lengths.sort(descending=True).values
    return torch.tensor([(lengths > t).sum().item() for t in range(T)], dtype=torch.int64)


def run_both(args, batch_sizes, reverse):
    ours = forward(*args, batch_sizes, reverse)
    expected = reference.lstm_layer(*[None if a is None else a.double() for a in args],
                                     batch_sizes=batch_sizes, reverse=reverse)
    return ours, expected


SHAPES = [  # T, B, I, H, P
    (1, 1, 1, 1, None), (7, 3, 5, 33, None), (3, 2, 4, 257, None), (5, 1, 6, 8, None),
    (1, 4, 3, 6, None), (6, 3, 4, 9, 5), (4, 2, 3, 7, 1),
]


@pytest.mark.parametrize("T,B,I,H,P", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_matches_reference_float64(T, B, I, H, P, reverse, packed, cpu_path):
    args = make_args(T, B, I, H, P)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    (out, h_n, c_n, gates, cells), (ref_out, ref_h, ref_c) = run_both(args, batch_sizes, reverse)
    assert max_error(out, ref_out) < 1e-12
    assert max_error(h_n, ref_h) < 1e-12
    assert max_error(c_n, ref_c) < 1e-12
    assert gates.shape == (T, B, 4 * H) and cells.shape == (T, B, H)


def test_dead_rows_are_zero_and_state_is_last_live_step(cpu_path):
    T, B = 5, 3
    args = make_args(T, B, 2, 4)
    batch_sizes = torch.tensor([3, 3, 2, 1, 1])
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, False)
    for t, n in enumerate(batch_sizes.tolist()):
        assert out[t, n:].eq(0).all() and gates[t, n:].eq(0).all() and cells[t, n:].eq(0).all()
        assert out[t, :n].ne(0).all()
    # sequence lengths 5, 3, 2: each final state is its last real step's output
    for b, length in enumerate((5, 3, 2)):
        assert torch.equal(h_n[b], out[length - 1, b])
        assert torch.equal(c_n[b], cells[length - 1, b])


def nn_lstm_layer(args, batch_sizes, reverse):
    """The op's outputs on nn.LSTM at the args' dtype (bias as b_ih, b_hh = 0; reverse
    as the reverse direction of a bidirectional nn.LSTM, whose forward output is dropped),
    as a function of the args, so that autograd gives the gradients of each."""
    x, h0, c0, w_ih, w_hh, bias, w_hr = args
    H, P = w_hh.shape[0] // 4, w_hh.shape[1]
    lstm = nn.LSTM(x.shape[2], H, bias=bias is not None, proj_size=P if w_hr is not None else 0,
                   bidirectional=reverse, device=x.device, dtype=x.dtype)
    suffix = "_reverse" if reverse else ""
    weights = {f"weight_ih_l0{suffix}": w_ih, f"weight_hh_l0{suffix}": w_hh}
    if bias is not None:
        weights.update({f"bias_ih_l0{suffix}": bias,
                        f"bias_hh_l0{suffix}": torch.zeros_like(bias)})
    if w_hr is not None:
        weights[f"weight_hr_l0{suffix}"] = w_hr
    directions = 2 if reverse else 1
    h0, c0 = h0.expand(directions, *h0.shape), c0.expand(directions, *c0.shape)
    if batch_sizes is not None:
        x = PackedSequence(padded_to_packed(x, packed_positions(batch_sizes)), batch_sizes)
    out, (h_n, c_n) = functional_call(lstm, weights, (x, (h0, c0)))
    if batch_sizes is not None:
        out = pad_packed_sequence(out, total_length=len(batch_sizes))[0]
    return out[..., -P:], h_n[-1], c_n[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_low_precision_as_accurate_as_nn_lstm(dtype, reverse, packed, cpu_path):
    """Outputs and every gradient against the float64 run on the same (rounded) values, at
    most twice nn.LSTM's error at the dtype plus rounding (fused_lstm.testing). nn.LSTM's
    CPU kernel runs bfloat16 and float16 itself."""
    T, B, I, H = 20, 4, 16, 33
    args = make_args(T, B, I, H, dtype=dtype)
    # weights at nn.LSTM's scale, so that the recurrence neither saturates nor amplifies
    # rounding: errors stay a steady measure of each kernel's arithmetic
    args[3:6] = [(w.double() * H ** -0.5).to(dtype) for w in args[3:6]]
    args = [a.requires_grad_() if a is not None else None for a in args]
    batch_sizes = random_batch_sizes(T, B) if packed else None
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, reverse)
    assert out.dtype == h_n.dtype == c_n.dtype == dtype
    # gates and cells are kept in float32 for the 16-bit types
    assert gates.dtype == fused_lstm._ops.accumulate_dtype(dtype) == cells.dtype
    exact_args = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    cotangents = [torch.randn(t.shape, dtype=torch.float64).to(dtype) for t in (out, h_n, c_n)]
    runs = []
    for outputs, leaves in (((out, h_n, c_n), args),
                            (nn_lstm_layer(args, batch_sizes, reverse), args),
                            (nn_lstm_layer(exact_args, batch_sizes, reverse), exact_args)):
        leaves = [a for a in leaves if a is not None]
        grads = torch.autograd.grad(outputs, leaves, [c.to(outputs[0].dtype) for c in cotangents])
        runs.append([t.detach() for t in outputs] + list(grads))
    names = ["output", "h_n", "c_n"] + [f"grad of {n}" for n in ARG_NAMES[:6]]
    assert_as_accurate_as(*runs, names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_activations_within_a_few_ulp(dtype):
    """With zero weights the pre-activations are the bias: the saved gates are then the
    activations themselves, checked over a dense grid against float64."""
    H = 4096
    grid = torch.cat([torch.linspace(-30, 30, H - 8, dtype=torch.float64),
                      torch.tensor([0.0, -0.0, 1e-30, -1e-7, 3e-4, 0.29999, 0.3, 0.30001],
                                   dtype=torch.float64)])
    bias = grid.repeat(4).to(dtype)
    zeros = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    _, _, c_n, gates, cells = forward(zeros(1, 1, 1), zeros(1, H), zeros(1, H), zeros(4 * H, 1),
                                      zeros(4 * H, H), bias, None, None, False)
    i, f, g, o = gates[0, 0].double().chunk(4)
    eps = torch.finfo(dtype).eps
    grid = grid.to(dtype).double()  # the pre-activations the kernel saw
    for ours, exact in ((i, torch.sigmoid(grid)), (g, torch.tanh(grid)), (o, torch.sigmoid(grid))):
        assert ((ours - exact).abs() <= 4 * eps * exact.abs() + torch.finfo(dtype).tiny).all()
    assert torch.equal(g.sign(), grid.sign())
    # c = i * g from c0 = 0, and h = o * tanh(c)
    c = cells[0, 0].double()
    assert ((c - i * g).abs() <= 2 * eps * c.abs()).all()


def test_nan_propagates(cpu_path):
    args = make_args(4, 3, 2, 5)
    args[0][1, 1, 0] = float("nan")
    out, h_n, c_n, _, _ = forward(*args, None, False)
    assert not out[0].isnan().any()
    assert out[1:, 1].isnan().all() and not out[1:, 0].isnan().any()
    assert h_n[1].isnan().all() and c_n[1].isnan().all()


def test_large_preactivations_saturate_without_nan():
    args = make_args(3, 2, 3, 4, scale=1e3)
    out, h_n, c_n, _, _ = forward(*args, None, False)
    assert torch.isfinite(out).all() and out.abs().max() <= 1


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("P", [None, 2])
def test_gradcheck(packed, reverse, P, cpu_path):
    args = [a.requires_grad_() if a is not None else None for a in make_args(4, 3, 2, 3, P)]
    batch_sizes = torch.tensor([3, 2, 2, 1]) if packed else None
    f = lambda *a: forward(*a, batch_sizes, reverse)[:3]  # noqa: E731
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("packed", [False, True])
def test_gradgradcheck(packed):
    args = [a.requires_grad_() for a in make_args(3, 2, 2, 3) if a is not None]
    batch_sizes = torch.tensor([2, 2, 1]) if packed else None
    f = lambda *a: forward(*a, None, batch_sizes, True)[:3]  # noqa: E731
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("T,B,I,H,P", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
def test_backward_matches_reference(T, B, I, H, P, packed, cpu_path):
    args = [a.requires_grad_() if a is not None else None for a in make_args(T, B, I, H, P)]
    batch_sizes = random_batch_sizes(T, B) if packed else None
    for reverse in (False, True):
        out, h_n, c_n, _, _ = forward(*args, batch_sizes, reverse)
        ref = reference.lstm_layer(*args, batch_sizes=batch_sizes, reverse=reverse)
        weights = [torch.randn_like(t) for t in (out, h_n, c_n)]
        inputs = [a for a in args if a is not None]
        ours = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, (out, h_n, c_n))), inputs)
        theirs = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, ref)), inputs)
        for a, b in zip(ours, theirs):
            assert max_error(a, b) < 1e-11


def test_backward_with_only_some_output_gradients(cpu_path):
    args = make_args(5, 2, 3, 4)
    saved = forward(*args, None, False)
    out, h_n, c_n, gates, cells = saved
    for grads in [(torch.randn_like(out), None, None), (None, torch.randn_like(h_n), None),
                  (None, None, torch.randn_like(c_n)), (None, None, None)]:
        result = backward(*grads, *args[:5], None, None, False, out, gates, cells)
        full = backward(*[g if g is not None else torch.zeros_like(t) for g, t in zip(grads, (out, h_n, c_n))],
                        *args[:5], None, None, False, out, gates, cells)
        for a, b in zip(result, full):
            assert torch.equal(a, b)


@pytest.mark.parametrize("P", [None, 2])
def test_backward_without_the_input_gradient(P, cpu_path):
    """input_grad=False skips grad_input (returned empty); every other gradient is the
    same, bit for bit."""
    args = make_args(5, 3, 4, 6, P)
    batch_sizes = torch.tensor([3, 3, 2, 2, 1])
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, True)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    saved = (*args[:5], args[6], batch_sizes, True, out, gates, cells)
    full = backward(*grads, *saved)
    skipped = backward(*grads, *saved, False)
    assert full[0].shape == args[0].shape and skipped[0].shape == (0,)
    for a, b in zip(full[1:], skipped[1:]):
        assert torch.equal(a, b)
    torch.library.opcheck(backward, (*grads, *saved, False))


def test_module_skips_the_input_gradient_only_when_unneeded(monkeypatch):
    """FusedLSTM asks the backward op for grad_input exactly when the input needs it."""
    seen = []
    op = fused_lstm._ops.backward

    def spy(*args):
        seen.append(args[14] if len(args) > 14 else True)
        return op(*args)

    monkeypatch.setattr(fused_lstm._ops, "backward", spy)
    lstm = fused_lstm.FusedLSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    lstm(x)[0].sum().backward()
    assert seen == [True, False]  # layer 1's input (layer 0's output) needs it; x does not
    seen.clear()
    lstm(x.requires_grad_())[0].sum().backward()
    assert seen == [True, True] and x.grad is not None


def test_empty_batch(cpu_path):
    args = make_args(3, 0, 2, 4)
    out, h_n, c_n, gates, cells = forward(*args, None, False)
    assert out.shape == (3, 0, 4) and h_n.shape == (0, 4) and c_n.shape == (0, 4)


def test_non_contiguous_inputs():
    args = make_args(4, 3, 5, 6)
    expected = forward(*args, None, False)
    strided = [a.t().contiguous().t() if a is not None and a.dim() == 2 else a for a in args]
    strided[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    for a, b in zip(forward(*strided, None, False), expected):
        assert torch.equal(a, b)


def test_forward_does_not_write_its_inputs():
    args = make_args(4, 3, 5, 6)
    copies = [a.clone() for a in args if a is not None]
    forward(*args, torch.tensor([3, 2, 2, 1]), True)
    assert all(torch.equal(a, b) for a, b in zip([a for a in args if a is not None], copies))


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(0, a[0][0]), "3-D input"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "h0 of shape"),
    (lambda a: a.__setitem__(2, a[2][:, :-1]), "c0 of shape"),
    (lambda a: a.__setitem__(3, a[3][:, :-1]), "w_ih of shape"),
    (lambda a: a.__setitem__(4, a[4][:-1]), "4\\*hidden_size rows"),
    (lambda a: a.__setitem__(5, a[5][:-1]), "bias of shape"),
    (lambda a: a.__setitem__(1, a[1].float()), "h0 of dtype"),
    (lambda a: a.__setitem__(0, a[0].long()), "supports float32"),
    (lambda a: a.__setitem__(0, a[0][:0]), "sequence length"),
])
def test_bad_arguments_raise_clear_errors(mutate, message):
    args = make_args(3, 2, 4, 5)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        forward(*args, None, False)


@pytest.mark.parametrize("batch_sizes,message", [
    (torch.tensor([2, 3, 1]), "non-increasing"),
    (torch.tensor([2, 1]), "entries for 3 steps"),
    (torch.tensor([3, 2, 1]), "must equal the batch size"),
    (torch.tensor([2, 1, 0]), "positive"),
    (torch.tensor([2, 1, 1], dtype=torch.int32), "int64"),
])
def test_bad_batch_sizes_raise(batch_sizes, message):
    with pytest.raises(RuntimeError, match=message):
        forward(*make_args(3, 2, 4, 5), batch_sizes, False)


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed):
    args = make_args(4, 3, 2, 5, P=3, dtype=torch.float32)
    batch_sizes = torch.tensor([3, 3, 2, 1]) if packed else None
    torch.library.opcheck(forward, (*args, batch_sizes, True))
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, True)
    grads = (torch.randn_like(out), torch.randn_like(h_n), None)
    torch.library.opcheck(backward, (*grads, *args[:5], args[6], batch_sizes, True, out, gates, cells))
    # with gradients required, opcheck also checks the autograd registration
    diff = [a.requires_grad_() if a is not None else None for a in args]
    torch.library.opcheck(forward, (*diff, batch_sizes, False))


def test_portable_kernels_match_vectorized():
    """The DEFAULT build of the element-wise kernels (what CPUs without AVX2 run) gives
    the same results as the one this machine picks."""
    if torch.ops.fused_lstm.cpu_capability() == "DEFAULT":
        pytest.skip("this machine already runs the portable kernels")
    script = (
        "import torch, fused_lstm, sys\n"
        "assert torch.ops.fused_lstm.cpu_capability() == 'DEFAULT'\n"
        "torch.manual_seed(0)\n"
        "x, h, c = torch.randn(6, 3, 5), torch.randn(3, 7), torch.randn(3, 7)\n"
        "w_ih, w_hh, b = torch.randn(28, 5), torch.randn(28, 7), torch.randn(28)\n"
        "torch.save(torch.ops.fused_lstm.forward(x, h, c, w_ih, w_hh, b, None, None, False), sys.argv[1])\n"
    )
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fused_lstm_default_{os.getpid()}.pt")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
    portable = torch.load(path)
    os.remove(path)
    torch.manual_seed(0)
    x, h, c = torch.randn(6, 3, 5), torch.randn(3, 7), torch.randn(3, 7)
    w_ih, w_hh, b = torch.randn(28, 5), torch.randn(28, 7), torch.randn(28)
    vectorized = forward(x, h, c, w_ih, w_hh, b, None, None, False)
    for a, v in zip(portable, vectorized):
        assert max_error(a, v) < 1e-5


@pytest.mark.parametrize("H", [5, 40, 100])
def test_persistent_recurrence_does_not_depend_on_thread_count(H, monkeypatch):
    """Each column of the recurrence is computed whole by one thread, in a fixed order:
    the thread count changes who computes it, not the result. The input projection is a
    library GEMM with K = 3 here, which splits only rows and columns among threads.
    (grad_input and the weight gradients, library GEMMs with large K, are left out.)"""
    monkeypatch.setenv("FUSED_LSTM_CPU_PATH", "persistent")
    args = make_args(6, 7, 3, H, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        try:
            out = forward(*args, None, False)
            grads = backward(out[0], None, None, *args[:5], None, None, False, out[0], out[3], out[4])
        finally:
            torch.set_num_threads(threads)
        results.append((out, grads[1], grads[2]))
    (out1, dh1, dc1), (out2, dh2, dc2) = results
    for a, b in zip((*out1, dh1, dc1), (*out2, dh2, dc2)):
        assert torch.equal(a, b)
