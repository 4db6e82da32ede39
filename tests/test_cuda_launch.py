"""How the CUDA op launches its kernels, where only a GPU can tell (issue 16): a refused
cooperative launch falls back to the step kernels with one warning, and a call captured
into a CUDA graph takes the step kernels. Every test needs a CUDA device
(skipped without one, tests/conftest.py).

The refusal is provoked with FUSED_LSTM_TEST_OVERSIZED_GRID=1 (csrc/cuda/lstm_cuda.cu):
the cooperative launch then asks for 65535 rows of blocks, which no GPU holds at once,
so the runtime refuses it with cudaErrorCooperativeLaunchTooLarge, as it does where MPS,
a green context or other processes leave fewer SMs than the plan counted on."""
import warnings

import pytest
import torch

import fused_lstm  # noqa: F401  (registers the ops)
from conftest import max_error
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


def kernels_run(run):
    """The names of the CUDA kernels that run() launches, as the profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    return [event.key for event in profile.key_averages()]


def launches(names, kernel):
    return any(kernel in name for name in names)


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
        context = torch.cuda.green_contexts.GreenContext(num_sms=num_sms)
        stream = context.Stream()
    except (AttributeError, ImportError, RuntimeError, TypeError) as error:
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
