"""The modules' native calls (csrc/module_calls.cpp): where nothing is differentiated, a
FusedLSTM or FusedLSTMCell forward is one native call that must return, to the bit, what
the Python forward returns, and must step aside (return None) wherever the Python path
has something to do: autograd, tracing, modes, subclasses, bad arguments."""
import itertools
import threading

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell, cell as cell_module, modules
from test_cell import BAD_INPUTS as BAD_CELL_INPUTS
from test_module import bad_inputs, pair

CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=3, bidirectional=True, proj_size=3),
    dict(proj_size=2),
    dict(bias=False),
    dict(batch_first=True, num_layers=2),
    dict(num_layers=2, dropout=0.5),  # eval: no dropout, the native call runs
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


class Spy:
    """Stands for fused_lstm._C in modules.py and cell.py: counts the native calls that
    ran (returned a result) and those that stepped aside (None)."""

    def __init__(self):
        self.ran = self.declined = 0

    def _count(self, fn):
        def counted(*args):
            result = fn(*args)
            if result is None:
                self.declined += 1
            else:
                self.ran += 1
            return result
        return counted

    def __getattr__(self, name):
        return self._count(getattr(fused_lstm._C, name))


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setattr(modules, "_C", s)
    monkeypatch.setattr(cell_module, "_C", s)
    return s


def python_path(monkeypatch):
    monkeypatch.setattr(modules, "_native_call_allowed", lambda: False)
    monkeypatch.setattr(cell_module, "_native_call_allowed", lambda: False)


def flat(result):
    output, state = result
    return [output, *state] if isinstance(state, tuple) else [output, state]


def assert_identical(ours, expected):
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        assert torch.equal(a, b)
        assert not a.requires_grad and a.grad_fn is None


def lstm_calls(kwargs, dtype, device="cpu"):
    """(module, x, hx) for batched and unbatched input, with and without a state."""
    fused = FusedLSTM(4, 5, dtype=dtype, device=device, **kwargs).eval()
    layers = fused.num_layers * (2 if fused.bidirectional else 1)
    out_size = fused.proj_size or fused.hidden_size
    for unbatched, with_state in itertools.product([False, True], [False, True]):
        shape = (3, 2, 4) if not unbatched else (3, 4)
        if kwargs.get("batch_first") and not unbatched:
            shape = (2, 3, 4)
        x = torch.randn(shape, dtype=dtype, device=device)
        batch = () if unbatched else (2,)
        hx = (torch.randn(layers, *batch, out_size, dtype=dtype, device=device),
              torch.randn(layers, *batch, 5, dtype=dtype, device=device)) if with_state else None
        yield fused, x, hx


def native_and_python(monkeypatch, spy, fn):
    """fn() through the native call (which must have run), then through the Python path."""
    ran = spy.ran
    ours = fn()
    assert spy.ran == ran + 1, "the native call did not run"
    with monkeypatch.context() as m:
        python_path(m)
        expected = fn()
    return ours, expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_native_lstm_call_returns_what_the_python_path_returns(monkeypatch, spy, kwargs, dtype,
                                                               device):
    for fused, x, hx in lstm_calls(kwargs, dtype, device):
        with torch.no_grad():
            ours, expected = native_and_python(monkeypatch, spy, lambda: fused(x, hx))
        assert_identical(flat(ours), flat(expected))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("unbatched,with_state", list(itertools.product([False, True], [False, True])))
def test_native_cell_call_returns_what_the_python_path_returns(monkeypatch, spy, dtype, bias,
                                                               unbatched, with_state, device):
    cell = FusedLSTMCell(4, 5, bias=bias, dtype=dtype, device=device)
    batch = () if unbatched else (3,)
    x = torch.randn(*batch, 4, dtype=dtype, device=device)
    hx = tuple(torch.randn(*batch, 5, dtype=dtype, device=device)
               for _ in range(2)) if with_state else None
    with torch.inference_mode():
        ours, expected = native_and_python(monkeypatch, spy, lambda: cell(x, hx))
    assert_identical(list(ours), list(expected))


def test_grad_mode_with_nothing_to_differentiate_runs_natively(monkeypatch, spy):
    fused = FusedLSTM(4, 5, num_layers=2).requires_grad_(False)
    x = torch.randn(3, 2, 4)
    ours, expected = native_and_python(monkeypatch, spy, lambda: fused(x))
    assert_identical(flat(ours), flat(expected))


def test_the_states_it_returns_are_the_callers(spy):
    fused = FusedLSTM(4, 5, batch_first=True)
    with torch.no_grad():
        output, (h_n, c_n) = fused(torch.randn(2, 3, 4))
    assert spy.ran == 1
    h_n.detach_()  # nn.LSTM's states may be detached in place (truncated BPTT does)
    c_n.detach_()
    output.add_(1)
    _, (h_1, _) = fused(torch.randn(2, 3, 4), (h_n, c_n))
    assert h_1.requires_grad  # a training call from them: the Python path, with autograd


def test_a_streaming_loop_equals_one_call_over_the_sequence(spy):
    fused = FusedLSTM(4, 5, num_layers=2).eval()
    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        whole, (h_whole, c_whole) = fused(x)
        state, frames = None, []
        for frame in x.split(1):
            out, state = fused(frame, state)
            frames.append(out)
    assert spy.ran == 7
    torch.testing.assert_close(torch.cat(frames), whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(state, (h_whole, c_whole), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,x,hx", list(bad_inputs()), ids=[b[0] for b in bad_inputs()])
def test_bad_input_without_grad_raises_like_nn_lstm(spy, name, x, hx):
    lstm, fused = pair()
    with torch.no_grad():
        with pytest.raises(Exception) as theirs:
            lstm(x, hx)
        with pytest.raises(type(theirs.value)) as ours:
            fused(x, hx)
    assert spy.ran == 0
    if name not in ("three states", "state is one tensor"):
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", BAD_CELL_INPUTS)
def test_bad_input_without_grad_raises_like_nn_lstm_cell(spy, name):
    x, hx = BAD_CELL_INPUTS[name]
    theirs = nn.LSTMCell(3, 5)
    ours = FusedLSTMCell.from_lstm_cell(theirs)
    with torch.no_grad():
        with pytest.raises(Exception) as expected:
            theirs(x, hx)
        with pytest.raises(type(expected.value)):
            ours(x, hx)
    assert spy.ran == 0


class Sub(torch.Tensor):
    pass


class SeeOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class SeeFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_steps_aside_wherever_python_has_work(spy):
    fused = FusedLSTM(4, 5).eval()
    cell = FusedLSTMCell(4, 5)
    x = torch.randn(3, 2, 4)
    # Autograd: the op with its formula.
    out, _ = fused(x)
    assert out.grad_fn is not None
    assert cell(x[0])[0].grad_fn is not None
    with torch.no_grad():
        # A tensor subclass, a dispatch mode and a function mode see every op.
        assert type(fused(x.as_subclass(Sub))[0]) is Sub
        with SeeOps() as mode:
            fused(x)
            cell(x[0])
        assert mode.ops.count("fused_lstm.forward.default") == 2
        with SeeFunctions() as mode:
            fused(x)
        assert mode.calls > 0
        # Tracing records the op.
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        assert "fused_lstm::forward" in str(traced.graph)
        # The meta device: the op's fake.
        assert fused.to("meta")(x.to("meta"))[0].is_meta
    assert spy.ran == 0
    # Autocast, the reference loop and dropout between layers never ask.
    asked = spy.declined
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert FusedLSTM(4, 5)(x)[0].dtype == torch.bfloat16
        modules.ReferenceLSTM(4, 5)(x)
        FusedLSTM(4, 5, num_layers=2, dropout=0.5).train()(x)
    assert spy.declined == asked and spy.ran == 0


def test_parametrized_weight_takes_the_python_path(monkeypatch, spy):
    fused = FusedLSTM(4, 5).eval()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(fused, "weight_hh_l0")
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        ours = fused(x)
    assert spy.ran == 0
    reference = FusedLSTM(4, 5).eval()
    reference.load_state_dict({k: v for k, v in fused.state_dict().items()
                               if not k.startswith("weight_hh_l0_")} |
                              {"weight_hh_l0": fused.weight_hh_l0.detach()})
    with torch.no_grad():
        assert_identical(flat(ours), flat(reference(x)))


def test_threads_share_a_module(spy):
    fused = FusedLSTM(8, 16).eval()
    xs = [torch.randn(5, 2, 8) for _ in range(4)]
    with torch.no_grad():
        expected = [fused(x)[0] for x in xs]
    results = [None] * len(xs)

    def run(k):
        with torch.no_grad():
            for _ in range(20):
                results[k] = fused(xs[k])[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, expected):
        assert torch.equal(a, b)


def test_functional_call_runs_on_the_given_parameters(spy):
    fused, cell = FusedLSTM(4, 5).eval(), FusedLSTMCell(4, 5)
    x = torch.randn(3, 2, 4)
    for module, arg in ((fused, x), (cell, x[0])):
        params = {k: torch.randn_like(v) for k, v in module.named_parameters()}
        same = type(module)(4, 5).eval()
        same.load_state_dict(params)
        with torch.no_grad():
            ours = torch.func.functional_call(module, params, (arg,))
            assert torch.equal(ours[0], same(arg)[0])
            assert not torch.equal(ours[0], module(arg)[0])
