"""The CUDA op and FusedLSTM on the GPU: against the float64 reference, against nn.LSTM
(cuDNN, TF32 off) sharing one state_dict, odd shapes, gradcheck, CUDA graphs, a second
GPU; each on both kernels of the recurrence (persistent and step by step, forced with
FUSED_LSTM_CUDA_PATH). Every test needs a CUDA device (skipped without one,
tests/conftest.py).

Tolerance (DESIGN.md): in float32, bfloat16 and float16 our error against float64 is at
most about twice the error nn.LSTM makes at the same dtype on the same inputs."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm  # noqa: F401  (registers the ops)
from fused_lstm import FusedLSTM, reference
from conftest import assert_as_accurate_as, max_error
from test_op import ARG_NAMES, make_args, nn_lstm_layer, random_batch_sizes

pytestmark = pytest.mark.cuda

forward = torch.ops.fused_lstm.forward
backward = torch.ops.fused_lstm.backward
LOW = [torch.float32, torch.bfloat16, torch.float16]
DTYPES = [torch.float64, *LOW]


@pytest.fixture(params=["persistent", "stepwise"])
def cuda_path(request, monkeypatch):
    """Runs a test on both kernels of the recurrence (csrc/cuda/lstm_cuda.cu), forced, so
    that each is tested whichever the default rule picks for the shapes at hand."""
    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", request.param)
    return request.param


def run_on_path(cuda_path, run):
    """run() on the forced path. Where the persistent kernel does not fit this GPU, forcing
    it fails with the documented error: the case is skipped with that reason (the step
    kernels' run of it is the `stepwise` case)."""
    try:
        return run()
    except RuntimeError as error:
        if cuda_path != "persistent" or "does not fit" not in str(error):
            raise
        pytest.skip(str(error).splitlines()[0])


def skip_persistent_with_projection(cuda_path, projected):
    """Forcing the persistent kernel leaves a layer with a projection on the step kernels
    (lstm_cuda.cu takes FUSED_LSTM_CUDA_PATH for layers without one): the `stepwise` case
    runs exactly that, so the `persistent` one says so instead of repeating it."""
    if cuda_path == "persistent" and projected:
        pytest.skip("the persistent kernel takes no projection: the step kernels run it, "
                    "tested by the stepwise case")


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    """nn.LSTM (cuDNN) and every matmul in true float32: TF32 off, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_kernels_are_registered_for_cuda():
    for op in ("forward", "backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", "CUDA")


# ---------------------------------------------------------------- the op against the loop

OP_SHAPES = [(1, 1, 1, 1, None), (7, 3, 5, 33, None), (5, 70, 4, 40, None), (6, 3, 4, 9, 5),
             (4, 1, 3, 257, None)]
def assert_op_matches_float64_reference(args, batch_sizes, reverse, dtype):
    """Forward and backward of the op against the float64 reference loop: in float64 to
    1e-12, in the other dtypes as accurate as nn.LSTM (cuDNN) at that dtype on the same
    values (fused_lstm.testing)."""
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, reverse)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert gates.dtype == cells.dtype == fused_lstm._ops.accumulate_dtype(dtype)
    leaves = [None if a is None else a.detach().double().requires_grad_() for a in args]
    ref = reference.lstm_layer(*leaves, batch_sizes=batch_sizes, reverse=reverse)
    cotangents = [torch.randn_like(t) for t in (out, h_n, c_n)]
    grads = backward(*cotangents, *args[:5], args[6], batch_sizes, reverse, out, gates, cells)
    used = [i for i, a in enumerate(args) if a is not None]
    expected = torch.autograd.grad(ref, [leaves[i] for i in used], [c.double() for c in cotangents])
    ours = [out, h_n, c_n] + [grads[i] for i in used]
    assert all(t.dtype == dtype for t in ours)
    exact = [*ref, *expected]
    if dtype == torch.float64:
        for o, e in zip(ours, exact):
            assert max_error(o, e) <= 1e-12 * max(1.0, e.abs().max().item())
        return
    their_args = [None if a is None else a.detach().requires_grad_() for a in args]
    their_out = nn_lstm_layer(their_args, batch_sizes, reverse)
    their_grads = torch.autograd.grad(their_out, [their_args[i] for i in used], cotangents)
    names = ["output", "h_n", "c_n"] + [f"grad of {ARG_NAMES[i]}" for i in used]
    assert_as_accurate_as(ours, [*their_out, *their_grads], exact, names)


@pytest.mark.parametrize("T,B,I,H,P", OP_SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_float64_reference(T, B, I, H, P, reverse, packed, dtype, cuda_path):
    skip_persistent_with_projection(cuda_path, P is not None)
    args = make_args(T, B, I, H, P, dtype=dtype, device="cuda", scale=0.5)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    assert_op_matches_float64_reference(args, batch_sizes, reverse, dtype)


# The benchmark's layers (benchmarks/run.py), three steps each: the geometries the
# persistent kernel gets there (several weight tiles, row groups, depth staged in chunks).
BENCHMARK_LAYERS = {"seed": (3, 32, 28, 256), "b1": (3, 1, 256, 256), "mid": (3, 64, 512, 512),
                    "long": (3, 16, 768, 768), "large": (3, 256, 1024, 1024)}


@pytest.mark.parametrize("name", BENCHMARK_LAYERS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_benchmark_layers_match_float64_reference(name, dtype, cuda_path):
    """Packed and reversed, weights at nn.LSTM's scale (1/sqrt(H)) so that the gates do not
    saturate."""
    T, B, I, H = BENCHMARK_LAYERS[name]
    args = make_args(T, B, I, H, dtype=dtype, device="cuda", scale=H ** -0.5)
    assert_op_matches_float64_reference(args, random_batch_sizes(T, B), True, dtype)


# ------------------------------------------------------------- FusedLSTM against nn.LSTM

CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, proj_size=3),
    dict(proj_size=4),
    dict(bias=False, batch_first=True),
]
INPUTS = ["padded", "unbatched", "packed_sorted", "packed_unsorted"]


def models(dtype, input_size, hidden_size, **kwargs):
    """nn.LSTM and FusedLSTM at `dtype` on the GPU sharing one state_dict, and the float64
    reference (nn.LSTM on the same, rounded, weights). Training mode: cuDNN refuses a
    backward in eval mode (no dropout here, so the mode changes nothing else)."""
    lstm = nn.LSTM(input_size, hidden_size, device="cuda", dtype=dtype, **kwargs)
    fused = FusedLSTM(input_size, hidden_size, device="cuda", dtype=dtype, **kwargs)
    fused.load_state_dict(lstm.state_dict())
    return lstm, fused, copy.deepcopy(lstm).double()


def make_inputs(kind, T, B, I, lstm, with_state, dtype):
    """Leaves (input, h0, c0 at `dtype`) and a builder of the module's arguments from them."""
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    out_size = lstm.proj_size or lstm.hidden_size
    unbatched = kind == "unbatched"
    batch_shape = () if unbatched else (B,)
    x_shape = (*batch_shape, T, I) if lstm.batch_first and not unbatched else (T, *batch_shape, I)
    if kind.startswith("packed"):
        x_shape = (T, B, I)
    leaves = [torch.randn(*x_shape, device="cuda").to(dtype)]
    if with_state:
        leaves += [torch.randn(layers, *batch_shape, out_size, device="cuda").to(dtype),
                   torch.randn(layers, *batch_shape, lstm.hidden_size, device="cuda").to(dtype)]
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    if kind == "packed_sorted":
        lengths = lengths.sort(descending=True).values

    def arguments(x, *state):
        if kind.startswith("packed"):
            x = pack_padded_sequence(x, lengths, enforce_sorted=kind == "packed_sorted")
        return (x, tuple(state)) if state else (x,)

    return leaves, arguments


def outputs_and_grads(module, leaves, arguments, dtype):
    """Outputs, h_n, c_n and the gradients of the leaves and parameters, for random
    cotangents drawn at `dtype` from a fixed seed (the same values for every module)."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    out, (h_n, c_n) = module(*arguments(*leaves))
    outputs = [out.data if isinstance(out, PackedSequence) else out, h_n, c_n]
    g = torch.Generator(device="cuda").manual_seed(1)
    loss = sum((torch.randn(t.shape, device="cuda", generator=g).to(dtype).to(t.dtype) * t).sum()
               for t in outputs)
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return [t.detach() for t in outputs] + list(grads)


def assert_like_nn_lstm(lstm, fused, ref, leaves, arguments, dtype):
    ours = outputs_and_grads(fused, leaves, arguments, dtype)
    theirs = outputs_and_grads(lstm, leaves, arguments, dtype)
    expected = outputs_and_grads(ref, [t.double() for t in leaves], arguments, dtype)
    assert len(ours) == len(theirs) == len(expected)
    for o, t in zip(ours, theirs):
        assert o.shape == t.shape and o.dtype == t.dtype and o.device == t.device
    if dtype == torch.float64:
        for o, e in zip(ours, expected):
            assert max_error(o, e) <= 1e-10 * max(1.0, e.abs().max().item())
    else:
        assert_as_accurate_as(ours, theirs, expected)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_nn_lstm(kwargs, kind, with_state, dtype, cuda_path):
    skip_persistent_with_projection(cuda_path, kwargs.get("proj_size", 0) > 0)
    lstm, fused, ref = models(dtype, 6, 20, **kwargs)
    leaves, arguments = make_inputs(kind, 9, 5, 6, lstm, with_state, dtype)
    assert_like_nn_lstm(lstm, fused, ref, leaves, arguments, dtype)


@pytest.mark.parametrize("T,B,H,kwargs", [
    (1, 1, 1, dict()), (2000, 1, 33, dict()), (2000, 4, 257, dict(bidirectional=True)),
    (20, 1024, 257, dict()), (5, 1024, 1000, dict()), (3, 7, 1000, dict(proj_size=100)),
    (1, 1024, 1, dict(num_layers=2)),
], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_shapes_match_nn_lstm(T, B, H, kwargs, dtype, cuda_path):
    skip_persistent_with_projection(cuda_path, kwargs.get("proj_size", 0) > 0)
    lstm, fused, ref = models(dtype, 16, H, **kwargs)
    leaves, arguments = make_inputs("padded", T, B, 16, lstm, True, dtype)
    run_on_path(cuda_path, lambda: assert_like_nn_lstm(lstm, fused, ref, leaves, arguments, dtype))


# ------------------------------------------------------------------ gradients, opcheck

@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("P", [None, 2])
def test_gradcheck(packed, reverse, P, cuda_path):
    skip_persistent_with_projection(cuda_path, P is not None)
    args = [a.requires_grad_() if a is not None else None
            for a in make_args(4, 3, 2, 3, P, device="cuda")]
    batch_sizes = torch.tensor([3, 2, 2, 1]) if packed else None
    f = lambda *a: forward(*a, batch_sizes, reverse)[:3]  # noqa: E731
    assert torch.autograd.gradcheck(f, args)


def test_gradgradcheck(cuda_path):
    args = [a.requires_grad_() for a in make_args(3, 2, 2, 3, device="cuda") if a is not None]
    f = lambda *a: forward(*a, None, torch.tensor([2, 2, 1]), True)[:3]  # noqa: E731
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck(packed, cuda_path):
    args = make_args(4, 3, 2, 5, P=3, dtype=torch.float32, device="cuda")
    batch_sizes = torch.tensor([3, 3, 2, 1]) if packed else None
    torch.library.opcheck(forward, (*args, batch_sizes, True))
    out, h_n, c_n, gates, cells = forward(*args, batch_sizes, True)
    grads = (torch.randn_like(out), torch.randn_like(h_n), None)
    torch.library.opcheck(backward, (*grads, *args[:5], args[6], batch_sizes, True, out, gates, cells))


def test_backward_in_eval_mode_and_non_contiguous_state(cuda_path):
    """Where cuDNN refuses ("cudnn RNN backward can only be called in training mode",
    "rnn: hx is not contiguous"), FusedLSTM runs, with the gradients of train mode."""
    fused = FusedLSTM(4, 8, num_layers=2, device="cuda").eval()
    x = torch.randn(5, 3, 4, device="cuda", requires_grad=True)
    h0 = torch.randn(3, 2, 8, device="cuda").transpose(0, 1)
    c0 = torch.randn(3, 2, 8, device="cuda").transpose(0, 1)
    assert not h0.is_contiguous()
    out, _ = fused(x, (h0, c0))
    (grad_eval,) = torch.autograd.grad(out.sum(), x)
    out, _ = fused.train()(x, (h0.contiguous(), c0.contiguous()))
    (grad_train,) = torch.autograd.grad(out.sum(), x)
    assert max_error(grad_eval, grad_train) <= 1e-6


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(1, a[1].cpu()), "h0 on cuda"),
    (lambda a: a.__setitem__(4, a[4].cpu()), "w_hh on cuda"),
])
def test_mixed_devices_raise(mutate, message):
    args = make_args(3, 2, 4, 5, device="cuda")
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        forward(*args, None, False)


def test_batch_sizes_on_the_gpu_raise():
    with pytest.raises(RuntimeError, match="CPU tensor"):
        forward(*make_args(3, 2, 4, 5, device="cuda"), torch.tensor([2, 2, 1], device="cuda"), False)


# ------------------------------------------------------------- CUDA graphs, several GPUs

@pytest.mark.parametrize("proj_size", [0, 5])
def test_cuda_graph_capture_and_replay_forward_and_backward(proj_size, cuda_path):
    skip_persistent_with_projection(cuda_path, proj_size > 0)
    model = FusedLSTM(8, 33, num_layers=2, bidirectional=True, proj_size=proj_size, device="cuda")
    static_x = torch.randn(10, 70, 8, device="cuda")
    weight = torch.randn(10, 70, 2 * (proj_size or 33), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph: allocator, cuBLAS handles
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            (model(static_x)[0] * weight).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, (static_h, static_c) = model(static_x)
        (static_out * weight).sum().backward()
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        out, (h_n, c_n) = model(static_x)
        expected = torch.autograd.grad((out * weight).sum(), list(model.parameters()))
        for a, b in zip((static_out, static_h, static_c), (out, h_n, c_n)):
            assert max_error(a, b) <= 1e-6
        for p, e in zip(model.parameters(), expected):
            assert max_error(p.grad, e) <= 1e-5 * max(1.0, e.abs().max().item())


def test_cuda_graph_capture_of_the_packed_reverse_op(cuda_path):
    args = make_args(6, 5, 3, 40, dtype=torch.float32, device="cuda")
    batch_sizes = torch.tensor([5, 4, 4, 2, 1, 1])
    forward(*args, batch_sizes, True)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = forward(*args, batch_sizes, True)
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    for a, b in zip(static, forward(*args, batch_sizes, True)):
        assert max_error(a, b) <= 1e-6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_device_of_its_tensors(cuda_path):
    """Tensors on cuda:1 with cuda:0 current: computed on cuda:1, same results as on cuda:0."""
    torch.cuda.set_device(0)
    args0 = make_args(5, 4, 3, 40, P=7, dtype=torch.float32, device="cuda:0")
    args1 = [None if a is None else a.to("cuda:1") for a in args0]
    batch_sizes = torch.tensor([4, 4, 3, 1, 1])
    on0, on1 = forward(*args0, batch_sizes, True), forward(*args1, batch_sizes, True)
    assert torch.cuda.current_device() == 0
    for a, b in zip(on0, on1):
        assert b.device == torch.device("cuda:1")
        assert max_error(a, b.to("cuda:0")) <= 1e-6
    grads0 = [torch.randn_like(t) for t in on0[:3]]
    grads1 = [g.to("cuda:1") for g in grads0]
    b0 = backward(*grads0, *args0[:5], args0[6], batch_sizes, True, *on0[:1], *on0[3:])
    b1 = backward(*grads1, *args1[:5], args1[6], batch_sizes, True, *on1[:1], *on1[3:])
    for a, b in zip(b0, b1):
        assert b.device == torch.device("cuda:1")
        assert max_error(a, b.to("cuda:0")) <= 1e-5 * max(1.0, a.abs().max().item())
    fused = FusedLSTM(3, 8, device="cuda:1")
    out, (h_n, c_n) = fused(torch.randn(4, 2, 3, device="cuda:1"))
    out.sum().backward()
    assert out.device == fused.weight_hh_l0.grad.device == torch.device("cuda:1")


# ------------------------------------------------------------------- the choice of kernel

def kernels_run(run):
    """The names of the CUDA kernels that run() launches, as the profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    return [event.key for event in profile.key_averages()]


def launches(names, kernel):
    return any(kernel in name for name in names)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_default_rule_runs_the_persistent_kernel_where_it_fits(dtype, monkeypatch):
    """The seed's layer fits any GPU with cooperative launches: by default, forward and
    backward run on the persistent kernel; forced stepwise, and with a projection, on the
    step kernels."""
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH", raising=False)
    args = make_args(35, 32, 28, 256, dtype=dtype, device="cuda", scale=0.1)

    def forward_and_backward():
        out, h_n, c_n, gates, cells = forward(*args, None, False)
        backward(out, h_n, c_n, *args[:5], None, None, False, out, gates, cells)

    names = kernels_run(forward_and_backward)
    assert launches(names, "persistent_kernel") and not launches(names, "step_kernel"), names
    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", "stepwise")
    names = kernels_run(forward_and_backward)
    assert launches(names, "step_kernel") and not launches(names, "persistent_kernel"), names
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH")
    projected = make_args(5, 4, 3, 8, P=2, dtype=dtype, device="cuda")
    names = kernels_run(lambda: forward(*projected, None, False))
    assert launches(names, "step_kernel") and not launches(names, "persistent_kernel"), names


def test_forcing_persistent_where_it_does_not_fit_raises(monkeypatch):
    """float64 w_hh of a layer with H = 2048 is 128 MiB: more than the shared memory of any
    GPU. Forced, a clear error; by default, the step kernels run it."""
    args = make_args(1, 2, 3, 2048, device="cuda")
    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", "persistent")
    with pytest.raises(RuntimeError, match="does not fit a layer with hidden_size 2048 and "):
        forward(*args, None, False)
    monkeypatch.delenv("FUSED_LSTM_CUDA_PATH")
    out = forward(*args, None, False)[0]
    ref = reference.lstm_layer(*[None if a is None else a.double() for a in args])[0]
    assert max_error(out, ref) <= 1e-12 * max(1.0, ref.abs().max().item())


def test_unknown_path_is_refused(monkeypatch):
    monkeypatch.setenv("FUSED_LSTM_CUDA_PATH", "fastest")
    with pytest.raises(RuntimeError, match="must be persistent or stepwise"):
        forward(*make_args(2, 2, 2, 2, device="cuda"), None, False)
