"""The CPU kernels' paths (csrc/cpu): our micro-kernel and the library's (brgemm) for the
recurrent products, on the ISA build this machine picks (run the file again under
ATEN_CPU_CAPABILITY=avx2 and =default for the others); inference that keeps nothing for
backward; short sequences."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fused_lstm
from fused_lstm import FusedLSTM, reference
from fused_lstm.testing import compare_with_nn_lstm
from conftest import assert_as_accurate_as, max_error
from test_op import make_args, random_batch_sizes

forward = torch.ops.fused_lstm.forward


@pytest.fixture(params=["ours", "library"])
def product(request, monkeypatch):
    """Runs a test on the persistent path with each recurrent product (the library's
    runs only for float32 where cpu_capability() is AVX512; elsewhere both run ours)."""
    monkeypatch.setenv("FUSED_LSTM_CPU_PATH", "persistent")
    monkeypatch.setenv("FUSED_LSTM_CPU_PRODUCT", request.param)
    return request.param


def nn_lstm(args, batch_sizes, reverse):
    """output, h_n, c_n of torch's own LSTM (oneDNN's on the CPU) on the op's arguments;
    packed rows are run padded, reverse as the forward pass over the time-flipped input
    (so only without batch_sizes for reverse)."""
    x, h0, c0, w_ih, w_hh, bias = args[:6]
    if reverse:
        x = x.flip(0)
    weights = [w_ih, w_hh] + ([bias, torch.zeros_like(bias)] if bias is not None else [])
    out, h_n, c_n = torch.lstm(x, (h0[None], c0[None]), weights, bias is not None, 1, 0.0,
                               False, False, False)
    return (out.flip(0) if reverse else out), h_n[0], c_n[0]


def stable_args(T, B, I, H, dtype=torch.float32):
    """Weights near nn.LSTM's initial scale, so that the recurrence is not chaotic: with
    weights of order 1 at H = 257 rounding errors grow 8x per step, and the ratio of two
    correct kernels' errors is chance."""
    return make_args(T, B, I, H, dtype=dtype, scale=2.0 / H ** 0.5)


def reference_of(args, batch_sizes, reverse):
    return reference.lstm_layer(*[None if a is None else a.double() for a in args],
                                batch_sizes=batch_sizes, reverse=reverse)


# H = 1 with 64 rows: the rule compares largest errors, and those of a tensor of five values
# are chance (ours is 1.2-1.4x nn.LSTM's error on average at H = 1, over 100 seeds).
SHAPES = [(1, 1, 3, 257), (9, 5, 4, 33), (9, 64, 3, 1), (9, 1, 6, 257), (8, 6, 5, 257),
          (2, 4, 7, 40)]


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_float64_matches_reference(T, B, I, H, packed, reverse, product):
    # float64 rounding over sums of 257 terms of size ~1 stays near 1e-13; a wrong kernel
    # is off by orders of magnitude more
    args = make_args(T, B, I, H)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    for saved in (True, False):
        ours = forward(*args, batch_sizes, reverse, saved)
        for o, r in zip(ours[:3], reference_of(args, batch_sizes, reverse)):
            assert max_error(o, r) < 1e-11


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_float32_as_accurate_as_nn_lstm(T, B, I, H, reverse, product):
    args = stable_args(T, B, I, H)
    expected = reference_of(args, None, reverse)
    theirs = nn_lstm(args, None, reverse)
    for saved in (True, False):
        assert_as_accurate_as(forward(*args, None, reverse, saved)[:3], theirs, expected)


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_float32_packed_as_accurate_as_nn_lstm(T, B, I, H, reverse, product):
    """Packed: nn.LSTM's error on the same inputs, padded, is the yardstick."""
    args = stable_args(T, B, I, H)
    batch_sizes = random_batch_sizes(T, B)
    ours = forward(*args, batch_sizes, reverse)[:3]
    expected = reference_of(args, batch_sizes, reverse)
    their_error = max(max_error(t, r) for t, r in zip(nn_lstm(args, None, False),
                                                       reference_of(args, None, False)))
    for o, r in zip(ours, expected):
        ulp = torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        assert max_error(o, r) <= 2 * their_error + 4 * ulp


def gradients(args, batch_sizes, reverse, cotangents, of_reference=False):
    """Gradients of every present argument for sum(cotangent * output), through the op's
    backward or through the float64 reference loop."""
    inputs = [a.detach().double() if of_reference else a.detach() for a in args if a is not None]
    inputs = [a.requires_grad_() for a in inputs]
    padded = inputs + [None] * (len(args) - len(inputs))
    outs = (reference.lstm_layer(*padded, batch_sizes=batch_sizes, reverse=reverse)
            if of_reference else forward(*padded, batch_sizes, reverse)[:3])
    loss = sum((w.to(o.dtype) * o).sum() for w, o in zip(cotangents, outs))
    return torch.autograd.grad(loss, inputs)


def cotangents_for(args, batch_sizes, reverse):
    return [torch.randn_like(o) for o in forward(*args, batch_sizes, reverse)[:3]]


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_backward_float64_matches_reference(T, B, I, H, packed, reverse, product):
    args = stable_args(T, B, I, H, torch.float64)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    cotangents = cotangents_for(args, batch_sizes, reverse)
    ours = gradients(args, batch_sizes, reverse, cotangents)
    expected = gradients(args, batch_sizes, reverse, cotangents, of_reference=True)
    for o, e in zip(ours, expected):
        assert max_error(o, e) < 1e-12 * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_library_product_as_accurate_as_ours(T, B, I, H, packed, reverse, monkeypatch):
    """float32 outputs and gradients through the library's products (brgemm) against
    those through ours, both measured against the float64 reference loop on the same
    inputs. (Against nn.LSTM, see test_forward_float32_as_accurate_as_nn_lstm.)"""
    monkeypatch.setenv("FUSED_LSTM_CPU_PATH", "persistent")
    args = stable_args(T, B, I, H)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    cotangents = cotangents_for(args, batch_sizes, reverse)
    results = {}
    for product in ("library", "ours"):
        monkeypatch.setenv("FUSED_LSTM_CPU_PRODUCT", product)
        results[product] = (*forward(*args, batch_sizes, reverse, False)[:3],
                            *gradients(args, batch_sizes, reverse, cotangents))
    expected = (*reference_of(args, batch_sizes, reverse),
                *gradients(args, batch_sizes, reverse, cotangents, of_reference=True))
    assert_as_accurate_as(results["library"], results["ours"], expected)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_in_chunks_matches_the_saving_forward(packed, reverse, dtype):
    """save_for_backward=False runs the sequence in chunks of steps (here 4 of 11: B·4H =
    2^16 gate values per step): the chunks' seams carry the state, packed rows that end
    inside a chunk keep their last state, reversed rows start at their own last step."""
    T, B, I, H = 11, 64, 5, 256
    args = make_args(T, B, I, H, dtype=dtype, scale=0.5)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    saved = forward(*args, batch_sizes, reverse)
    chunked = forward(*args, batch_sizes, reverse, False)
    assert chunked[3].numel() == 0 and chunked[4].numel() == 0
    assert saved[3].shape == (T, B, 4 * H) and saved[4].shape == (T, B, H)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for s, c, r in zip(saved[:3], chunked[:3], reference_of(args, batch_sizes, reverse)):
        assert max_error(s, c) < tolerance
        if dtype == torch.float64:
            assert max_error(c, r) < 1e-12


def largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_inference_keeps_nothing_for_backward():
    """Under no_grad and inference_mode the op neither returns nor allocates the [T,B,4H]
    gates (nor the cells); with grad on, autograd still gets them and is right."""
    T, B, I, H = 300, 16, 8, 32
    lstm = nn.LSTM(I, H)
    fused = FusedLSTM(I, H)
    fused.load_state_dict(lstm.state_dict())
    x = torch.randn(T, B, I)
    gates_bytes = T * B * 4 * H * 4
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is torch.ops.fused_lstm.forward.default:
                seen.append([t.numel() for t in result[3:]])
            return result

    for context in (torch.no_grad, torch.inference_mode):
        with context(), Spy():
            out, (h_n, c_n) = fused(x)
        assert seen.pop() == [0, 0]
        with context():
            assert largest_allocation(lambda: fused(x)) < gates_bytes / 2
    # The same measure sees the gates where they are kept: it can fail.
    assert largest_allocation(lambda: fused(x)) >= gates_bytes

    with torch.no_grad():
        expected = lstm(x)
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(h_n, expected[1][0])
    torch.testing.assert_close(c_n, expected[1][1])

    xg = x.clone().requires_grad_()
    out, (h_n, c_n) = fused(xg)
    grads = torch.autograd.grad((out.sum() + c_n.sum()), [xg, *fused.parameters()])
    xr = x.clone().requires_grad_()
    ref_out, (_, ref_c) = lstm(xr)
    ref_grads = torch.autograd.grad((ref_out.sum() + ref_c.sum()), [xr, *lstm.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_frozen_module_in_grad_mode_keeps_nothing():
    """Grad mode on but nothing requiring grad (a frozen encoder): nothing to save."""
    fused = FusedLSTM(8, 32).requires_grad_(False)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is torch.ops.fused_lstm.forward.default:
                seen.append(result[3].numel())
            return result

    with Spy():
        fused(torch.randn(5, 2, 8))
        fused(torch.randn(5, 2, 8).requires_grad_())
    assert seen == [0, 5 * 2 * 4 * 32]


@pytest.mark.parametrize("T", [1, 2, 7, 8, 9])
@pytest.mark.parametrize("B", [1, 4])
def test_streaming_calls_carry_the_state(T, B):
    """A sequence fed in calls of T steps (short ones take the step-by-step path, longer
    ones the persistent one) equals the whole sequence in one call, as in nn.LSTM."""
    I, H = 6, 257
    fused = FusedLSTM(I, H).double()
    x = torch.randn(3 * T, B, I, dtype=torch.float64)
    with torch.no_grad():
        whole, (h_whole, c_whole) = fused(x)
        state, pieces = None, []
        for piece in x.split(T):
            y, state = fused(piece, state)
            pieces.append(y)
    assert max_error(torch.cat(pieces), whole) < 1e-12
    assert max_error(state[0], h_whole) < 1e-12 and max_error(state[1], c_whole) < 1e-12
    expected = reference_of([x, torch.zeros(B, H, dtype=torch.float64),
                             torch.zeros(B, H, dtype=torch.float64), fused.weight_ih_l0,
                             fused.weight_hh_l0, fused.bias_ih_l0 + fused.bias_hh_l0],
                            None, False)
    assert max_error(whole, expected[0]) < 1e-12


def test_opcheck_without_saving():
    args = make_args(3, 2, 4, 5)
    torch.library.opcheck(forward, (*args, random_batch_sizes(3, 2), True, False))


def run_capability(value):
    script = "import torch, fused_lstm; print(torch.ops.fused_lstm.cpu_capability())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=value)
    return subprocess.run([sys.executable, "-c", script], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_cpu_capability_follows_torch():
    """The kernels' build follows torch's own capability (ATEN_CPU_CAPABILITY included)."""
    native = torch.backends.cpu.get_cpu_capability()
    mine = torch.ops.fused_lstm.cpu_capability()
    assert mine == (native if native in ("AVX512", "AVX2") else "DEFAULT")
    assert run_capability("default") == "DEFAULT"
    if native in ("AVX512", "AVX2"):
        assert run_capability("avx2") == "AVX2"


@pytest.mark.parametrize("T,B,I,H", [(50, 8, 64, 512), (30, 1, 64, 1024)])
def test_module_float32_as_accurate_as_nn_lstm_at_training_sizes(T, B, I, H, product):
    """A layer of nn.LSTM's initialisation over tens of steps, outputs and every gradient,
    by fused_lstm.testing's rule. The recurrent products sum 4H = 2048 terms in the
    backward: as one running sum per value (not in blocks of the depth) the gradients of
    h0 and c0 came out 2-2.4x nn.LSTM's error, and summed onto the gates' x·w_ihᵀ + bias
    (not from zero) the forward's c_n 3.3x."""
    lstm = fused_lstm.FusedLSTM(I, H)
    x = torch.randn(T, B, I)
    hx = (torch.randn(1, B, H), torch.randn(1, B, H))
    report = compare_with_nn_lstm(lstm, x, hx)
    assert all(e.ok for e in report), [str(e) for e in report if not e.ok]
