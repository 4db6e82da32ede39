"""How the CUDA op launches its kernels, where only a GPU can tell (issue 16): a refused
cooperative launch falls back to the step kernels with one warning, a call captured into
a CUDA graph takes the step kernels, and bfloat16/float16 at H = 257 and more on the
persistent kernel meet the accuracy rule against cuDNN (what
test_cuda_precision_emulated.py checks on the host emulation, here on the tensor cores
themselves, whose order of summation the emulation does not reproduce). Every test needs
a CUDA device (skipped without one, tests/conftest.py).

The refusal is provoked with FUSED_LSTM_TEST_OVERSIZED_GRID=1 (csrc/cuda/lstm_cuda.cu):
the cooperative launch then asks for 65535 rows of blocks, which no GPU holds at once,
so the runtime refuses it with cudaErrorCooperativeLaunchTooLarge, as it does where MPS,
a green context or other processes leave fewer SMs than the plan counted on."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fused_lstm  # noqa: F401  (registers the ops)
from fused_lstm import FusedLSTM
from conftest import assert_as_accurate_as, max_error
from test_cuda import kernels_run, launches
from test_op import make_args

pytestmark = pytest.mark.cuda

forward = torch.ops.fused_lstm.forward
backward = torch.ops.fused_lstm.backward


@pytest.fixture(autouse=True)
def _fp32_is_fp32_and_every_warning_shown():
    """TF32 off (nn.LSTM in true float32), and TORCH_WARN_ONCE warning every time, so that
    each test sees the fallback's warning whatever ran before it in this process."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.is_warn_always_enabled())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_warn_always(True)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_warn_always(saved[2])


def seed_layer(dtype=torch.float32):
    """The seed's layer: the persistent kernel fits it on any GPU with cooperative launches."""
    return make_args(12, 32, 28, 256, dtype=dtype, device="cuda", scale=0.1)


def forward_and_backward(args, batch_sizes=None):
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, False)
    grads = backward(out, h_n, c_n, *args[:5], None, batch_sizes, False, out, gates, cells)
    return (out, h_n, c_n, *grads)


def on_step_kernels(monkeypatch, run):
    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", "stepwise")
    try:
        return run()
    finally:
        monkeypatch.delenv("FUSED_LSTM_CUDA_PATH")


# -------------------------------------------------- a refused cooperative launch falls back

def test_refused_launch_runs_on_the_step_kernels_with_a_warning(monkeypatch):
    """Refused: the step kernels' results, bit for bit, one warning per call naming the
    reason, no persistent kernel run, and the runtime's error cleared (the step kernels'
    own launch checks would raise it otherwise)."""
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH", raising=False)
    args = seed_layer()
    expected = on_step_kernels(monkeypatch, lambda: forward_and_backward(args))
    monkeypatch.setenv("FUSED_LSTM_TEST_OVERSIZED_GRID", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = kernels_run(lambda: forward_and_backward(args))
        ours = forward_and_backward(args)
    refusals = [w for w in caught if "cooperative launch of the persistent kernel" in str(w.message)]
    # forward and backward, twice: four refused launches (TORCH_WARN_ONCE shows each here)
    assert len(refusals) == 4, [str(w.message) for w in caught]
    # cudaGetErrorString(cudaErrorCooperativeLaunchTooLarge)
    assert "too many blocks in cooperative launch" in str(refusals[0].message)
    assert launches(names, "step_kernel") and not launches(names, "persistent_kernel"), names
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)
    monkeypatch.delenv("FUSED_LSTM_TEST_OVERSIZED_GRID")
    torch.cuda.synchronize()
    names = kernels_run(lambda: forward_and_backward(args))
    assert launches(names, "persistent_kernel"), names


def test_refused_launch_warns_once_by_default(monkeypatch):
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH", raising=False)
    monkeypatch.setenv("FUSED_LSTM_TEST_OVERSIZED_GRID", "1")
    torch.set_warn_always(False)
    args = seed_layer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            forward_and_backward(args)
    refusals = [w for w in caught if "was refused" in str(w.message)]
    assert len(refusals) <= 1  # none where an earlier test of this process already warned


def test_forced_persistent_and_refused_raises(monkeypatch):
    """Forced onto the persistent kernel, a refusal is an error that says so (and, like
    a layer that does not fit, matches test_cuda.py's "does not fit"); the next call runs."""
    args = seed_layer()
    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", "persistent")
    monkeypatch.setenv("FUSED_LSTM_TEST_OVERSIZED_GRID", "1")
    with pytest.raises(RuntimeError, match="does not fit .* now: its cooperative launch .* refused"):
        forward(*args, None, False)
    monkeypatch.delenv("FUSED_LSTM_TEST_OVERSIZED_GRID")
    out = forward(*args, None, False)[0]
    torch.cuda.synchronize()
    assert out.isfinite().all()


@pytest.mark.parametrize("num_sms", [8, 16])
def test_green_context_with_few_sms(num_sms, monkeypatch):
    """On a green context of a few SMs, the plan (read off the whole device) does not fit:
    either the runtime refuses it and the step kernels run, or it runs; never an error or
    a hang, and the results are the step kernels' within float32 rounding."""
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH", raising=False)
    try:
        from torch.cuda.green_contexts import GreenContext

        context = GreenContext(num_sms=num_sms)
        stream = context.Stream()
    except (ImportError, RuntimeError, TypeError) as error:
        pytest.skip(f"no green contexts here: {error}")
    args = seed_layer()
    expected = on_step_kernels(monkeypatch, lambda: forward_and_backward(args))
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ours = forward_and_backward(args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(ours, expected):
        assert max_error(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


# --------------------------------------------------------------- CUDA-graph capture

@pytest.mark.parametrize("path", [None, "persistent"])
def test_captured_calls_take_the_step_kernels(path, monkeypatch):
    """Captured (by default, and forced onto the persistent kernel), forward and backward
    replay on the step kernels, with their results (up to cuBLAS's choice of algorithm in
    the graph)."""
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH", raising=False)
    args = seed_layer()
    batch_sizes = torch.tensor([32] * 6 + [20] * 4 + [3] * 2)
    expected = on_step_kernels(monkeypatch, lambda: forward_and_backward(args, batch_sizes))
    if path:
        monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", path)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward_and_backward(args, batch_sizes)  # warm up: cuBLAS handles, the allocator
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = forward_and_backward(args, batch_sizes)
    names = kernels_run(graph.replay)
    assert launches(names, "step_kernel") and not launches(names, "persistent_kernel"), names
    for a, b in zip(static, expected):
        assert max_error(a, b) <= 1e-6 * max(1.0, b.abs().max().item())


# ------------------------------------ bfloat16/float16 on the persistent kernel, large H

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("saturating", [False, True])
@pytest.mark.parametrize("T,B,H", [(16, 5, 257), (8, 33, 513), (4, 64, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_persistent_low_precision_is_as_accurate_as_cudnn(T, B, H, dtype, saturating, seed,
                                                          monkeypatch):
    """On tensor cores, h as hi + lo parts of the input's dtype (forward) and grad_gates
    rounded to it (backward): forward and every gradient within twice cuDNN's error
    against float64 (plus a few roundings), on the same inputs, over several seeds, with
    nn.LSTM's initialisation and with saturating weights (standard deviation 0.5)."""
    torch.manual_seed(1000 + seed)
    lstm = nn.LSTM(16, H, device="cuda", dtype=dtype)
    if saturating:
        with torch.no_grad():
            for p in lstm.parameters():
                p.mul_(0.5 * (3 * H) ** 0.5)  # uniform(±1/sqrt(H)) has deviation 1/sqrt(3H)
    fused = FusedLSTM(16, H, device="cuda", dtype=dtype)
    fused.load_state_dict(lstm.state_dict())
    ref = copy.deepcopy(lstm).double()
    x = torch.randn(T, B, 16, device="cuda").to(dtype)
    state = [torch.randn(1, B, H, device="cuda").to(dtype) for _ in range(2)]
    cotangents = [torch.randn(T, B, H, device="cuda"), torch.randn(1, B, H, device="cuda"),
                  torch.randn(1, B, H, device="cuda")]

    def outputs_and_grads(module, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (x, *state)]
        out, (h_n, c_n) = module(leaves[0], tuple(leaves[1:]))
        loss = sum((cast(c) * t).sum() for c, t in zip(cotangents, (out, h_n, c_n)))
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
        return [t.detach() for t in (out, h_n, c_n, *grads)]

    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", "persistent")
    names = kernels_run(lambda: outputs_and_grads(fused, lambda t: t.to(dtype)))
    assert launches(names, "persistent_kernel") and not launches(names, "step_kernel"), names
    ours = outputs_and_grads(fused, lambda t: t.to(dtype))
    theirs = outputs_and_grads(lstm, lambda t: t.to(dtype))
    expected = outputs_and_grads(ref, lambda t: t.to(dtype).double())
    assert_as_accurate_as(ours, theirs, expected)
