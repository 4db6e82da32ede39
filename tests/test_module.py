"""FusedLSTM against nn.LSTM, sharing one state_dict: outputs, states, every gradient,
constructor and forward checks."""
import copy
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import (PackedSequence, pack_padded_sequence, pack_sequence,
                                pad_packed_sequence)

from fused_lstm import FusedLSTM
from fused_lstm.testing import compare_with_nn_lstm
from conftest import max_error

CONFIGS = [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=3, bidirectional=True),
    dict(proj_size=3),
    dict(num_layers=2, bidirectional=True, proj_size=2),
    dict(bias=False),
    dict(batch_first=True, num_layers=2),
    dict(num_layers=2, dropout=0.5),  # eval: dropout off
]


def pair(input_size=4, hidden_size=5, dtype=torch.float64, **kwargs):
    lstm = nn.LSTM(input_size, hidden_size, dtype=dtype, **kwargs).eval()
    fused = FusedLSTM(input_size, hidden_size, dtype=dtype, **kwargs).eval()
    fused.load_state_dict(lstm.state_dict())
    return lstm, fused


def initial_state(lstm, batch, dtype=torch.float64, unbatched=False):
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    shape = (layers,) if unbatched else (layers, batch)
    h0 = torch.randn(*shape, lstm.proj_size or lstm.hidden_size, dtype=dtype, requires_grad=True)
    c0 = torch.randn(*shape, lstm.hidden_size, dtype=dtype, requires_grad=True)
    return h0, c0


def outputs_and_grads(module, x, hx, extra=()):
    out, (h_n, c_n) = module(x, hx) if hx is not None else module(x)
    data = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    g = torch.Generator().manual_seed(1)
    loss = sum((torch.randn(t.shape, generator=g, dtype=t.dtype) * t).sum() for t in (data, h_n, c_n))
    leaves = [t for t in (x.data if hasattr(x, "batch_sizes") else x, *(hx or ()), *extra)
              if t.requires_grad] + list(module.parameters())
    return [data, h_n, c_n], torch.autograd.grad(loss, leaves, retain_graph=True)


def assert_same(lstm, fused, x, hx, tol=1e-10):
    extra = ()
    (o1, g1), (o2, g2) = outputs_and_grads(lstm, x, hx, extra), outputs_and_grads(fused, x, hx, extra)
    for a, b in zip(o1, o2):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert max_error(a, b) < tol
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape
        assert max_error(a, b) < tol


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_nn_lstm_float64(kwargs, with_state):
    lstm, fused = pair(**kwargs)
    T, B = 6, 3
    shape = (B, T, 4) if kwargs.get("batch_first") else (T, B, 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert_same(lstm, fused, x, initial_state(lstm, B) if with_state else None)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2),
                                    dict(batch_first=True)], ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_unbatched(kwargs, with_state):
    lstm, fused = pair(**kwargs)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    hx = initial_state(lstm, None, unbatched=True) if with_state else None
    assert_same(lstm, fused, x, hx)
    out, (h, c) = fused(x, hx)
    assert out.dim() == 2 and h.dim() == 2 and c.dim() == 2


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True),
                                    dict(proj_size=2, bidirectional=True)], ids=str)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed(kwargs, enforce_sorted, with_state):
    lstm, fused = pair(**kwargs)
    lengths = [6, 4, 4, 1] if enforce_sorted else [3, 6, 1, 4]
    seqs = [torch.randn(n, 4, dtype=torch.float64) for n in lengths]
    x = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    x.data.requires_grad_()
    assert_same(lstm, fused, x, initial_state(lstm, 4) if with_state else None)


def test_packed_padded_batch_first():
    lstm, fused = pair(num_layers=2, batch_first=True, bidirectional=True)
    padded = torch.randn(3, 5, 4, dtype=torch.float64)
    packed = pack_padded_sequence(padded, [2, 5, 3], batch_first=True, enforce_sorted=False)
    (o1, s1), (o2, s2) = lstm(packed), fused(packed)
    u1, l1 = pad_packed_sequence(o1, batch_first=True)
    u2, l2 = pad_packed_sequence(o2, batch_first=True)
    assert torch.equal(l1, l2) and max_error(u1, u2) < 1e-12
    assert max_error(s1[0], s2[0]) < 1e-12 and max_error(s1[1], s2[1]) < 1e-12


@pytest.mark.parametrize("H,B,T", [(1, 3, 4), (33, 1, 5), (257, 2, 1), (16, 1, 1)])
def test_odd_sizes(H, B, T):
    lstm, fused = pair(3, H, num_layers=2)
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    assert_same(lstm, fused, x, initial_state(lstm, B))


@pytest.mark.parametrize("kwargs", [dict(), dict(num_layers=2, bidirectional=True),
                                    dict(proj_size=4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_as_accurate_as_nn_lstm(kwargs, dtype):
    """Outputs and every gradient against the float64 run, at most twice nn.LSTM's error at
    the dtype plus rounding (fused_lstm.testing; nn.LSTM's CPU kernel runs bfloat16 and
    float16 itself)."""
    _, fused = pair(32, 48, dtype=dtype, **kwargs)
    hx = initial_state(fused, 8, dtype)
    report = compare_with_nn_lstm(fused, torch.randn(40, 8, 32, dtype=dtype), hx)
    assert len(report) == 6 + len(list(fused.parameters()))  # output, h_n, c_n, 3 inputs
    failed = [str(e) for e in report if not e.ok]
    assert not failed, failed


def test_dropout_applies_between_layers_in_training_only():
    fused = FusedLSTM(4, 6, num_layers=3, dropout=0.5).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    fused.eval()
    a, b = fused(x)[0], fused(x)[0]
    assert torch.equal(a, b)
    fused.train()
    c, d = fused(x)[0], fused(x)[0]
    assert not torch.equal(c, a) and not torch.equal(c, d)
    fused.dropout = 1.0  # every input of layers 2 and 3 zeroed: their output is input-free
    x2 = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.allclose(fused(x)[0], fused(x2)[0])


def test_dropout_warning_and_checks_match_nn_lstm():
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        FusedLSTM(3, 4, dropout=0.2)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        nn.LSTM(3, 4, dropout=0.2)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


@pytest.mark.parametrize("args,kwargs", [
    ((0, 4), {}), ((3, 0), {}), ((3, 4), dict(num_layers=0)), ((3, 4), dict(proj_size=-1)),
    ((3, 4), dict(proj_size=4)), ((3, 4), dict(dropout=1.5)), ((3, 4), dict(dropout=True)),
    ((3, 4), dict(bias=1)), ((3, 4), dict(batch_first="yes")), ((3.0, 4), {}), ((3, 4.0), {}),
    ((3, 4), dict(dropout=None)), ((3, 4), dict(dropout="0.5")),
])
def test_constructor_errors_match_nn_lstm(args, kwargs):
    with pytest.raises(Exception) as theirs:
        nn.LSTM(*args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        FusedLSTM(*args, **kwargs)
    assert str(ours.value) == str(theirs.value)


def bad_inputs():
    f64 = dict(dtype=torch.float64)
    yield "T=0", torch.randn(0, 3, 4, **f64), None
    yield "unbatched T=0", torch.randn(0, 4, **f64), None
    yield "1-D", torch.randn(4, **f64), None
    yield "4-D", torch.randn(2, 3, 4, 4, **f64), None
    yield "input size", torch.randn(2, 3, 5, **f64), None
    yield "dtype", torch.randn(2, 3, 4, dtype=torch.float32), None
    yield "int", torch.randint(0, 3, (2, 3, 4)), None
    yield "h0 shape", torch.randn(2, 3, 4, **f64), (torch.randn(1, 2, 5, **f64), torch.randn(1, 3, 5, **f64))
    yield "c0 shape", torch.randn(2, 3, 4, **f64), (torch.randn(1, 3, 5, **f64), torch.randn(1, 3, 6, **f64))
    yield "h0 2-D", torch.randn(2, 3, 4, **f64), (torch.randn(3, 5, **f64), torch.randn(3, 5, **f64))
    yield "unbatched 3-D state", torch.randn(2, 4, **f64), (torch.randn(1, 1, 5, **f64),) * 2
    yield "three states", torch.randn(2, 3, 4, **f64), (torch.randn(1, 3, 5, **f64),) * 3
    yield "state is one tensor", torch.randn(2, 3, 4, **f64), torch.randn(1, 3, 5, **f64)
    # two faults: the first one nn.LSTM checks decides the exception type
    yield "int input, 2-D state", torch.randint(0, 3, (2, 3, 4)), (torch.randn(3, 5, **f64),) * 2
    yield "input size, bad state", torch.randn(2, 3, 5, **f64), (torch.randn(1, 2, 5, **f64),) * 2


@pytest.mark.parametrize("name,x,hx", list(bad_inputs()), ids=[b[0] for b in bad_inputs()])
def test_bad_input_raises_like_nn_lstm(name, x, hx):
    lstm, fused = pair()
    with pytest.raises(Exception) as theirs:
        lstm(x, hx)
    with pytest.raises(type(theirs.value)) as ours:
        fused(x, hx)
    if name not in ("three states", "state is one tensor"):
        assert str(ours.value) == str(theirs.value)


def test_bad_state_dtype_and_device_are_clear_errors():
    _, fused = pair()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    h = torch.randn(1, 3, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"hidden\[0\] dtype"):
        fused(x, (h.float(), h))
    with pytest.raises(RuntimeError, match=r"hidden\[1\] dtype"):
        fused(x, (h, h.float()))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size"):
        fused(pack_sequence([x[:, 0], x[:, 1]]), (h, h))
    with pytest.raises(RuntimeError, match="same device"):
        fused(x.to("meta"))


def test_nan_propagates_like_nn_lstm():
    lstm, fused = pair(num_layers=2)
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    x[1, 2, 0] = float("nan")
    (o1, (h1, c1)), (o2, (h2, c2)) = lstm(x), fused(x)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        assert torch.equal(a.isnan(), b.isnan())
        assert max_error(a.nan_to_num(), b.nan_to_num()) < 1e-12


def test_same_initial_weights_as_nn_lstm_from_same_seed():
    for kwargs in CONFIGS:
        torch.manual_seed(7)
        lstm = nn.LSTM(4, 5, **kwargs)
        torch.manual_seed(7)
        fused = FusedLSTM(4, 5, **kwargs)
        assert list(lstm.state_dict()) == list(fused.state_dict())
        for (n1, p1), (n2, p2) in zip(lstm.named_parameters(), fused.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_state_dict_loads_strictly_both_ways():
    lstm, fused = pair(num_layers=2, bidirectional=True, proj_size=2)
    back = nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    back.load_state_dict(fused.state_dict(), strict=True)
    for a, b in zip(back.parameters(), lstm.parameters()):
        assert torch.equal(a, b)


def test_surface_matches_nn_lstm():
    for kwargs in CONFIGS + [dict(batch_first=True, bias=False, proj_size=2, dropout=0.1, num_layers=2)]:
        lstm, fused = pair(**kwargs)
        assert repr(fused) == repr(lstm).replace("LSTM", "FusedLSTM", 1)
        assert fused.extra_repr() == lstm.extra_repr()
        assert fused._flat_weights_names == lstm._flat_weights_names
        assert fused._all_weights == lstm._all_weights
        assert [[p.shape for p in ws] for ws in fused.all_weights] == \
            [[p.shape for p in ws] for ws in lstm.all_weights]
        for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size", "mode"):
            assert getattr(fused, name) == getattr(lstm, name)


def test_from_lstm_copies_configuration_weights_and_mode():
    lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3,
                   dropout=0.25, dtype=torch.float64).eval()
    fused = FusedLSTM.from_lstm(lstm)
    assert fused.extra_repr() == lstm.extra_repr() and not fused.training
    assert fused.weight_ih_l0.dtype == torch.float64
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    assert max_error(fused(x)[0], lstm(x)[0]) < 1e-12
    fused.weight_hh_l0.data.zero_()
    assert lstm.weight_hh_l0.abs().sum() > 0  # copied, not shared


def test_parameter_reassignment_is_used():
    """Code that replaces a weight (weight drop, pruning) must see it used."""
    _, fused = pair()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    before = fused(x)[0]
    fused.weight_hh_l0 = nn.Parameter(torch.zeros_like(fused.weight_hh_l0))
    after = fused(x)[0]
    assert not torch.equal(before, after)
    assert fused._flat_weights[1] is fused.weight_hh_l0


def test_never_calls_nn_lstm_kernel(monkeypatch):
    import torch._VF as VF

    def poisoned(*args, **kwargs):
        raise AssertionError("FusedLSTM called nn.LSTM's kernel")

    lstm, fused = pair(num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    expected = lstm(x)[0]
    monkeypatch.setattr(VF, "lstm", poisoned)
    monkeypatch.setattr(torch, "lstm", poisoned)
    with pytest.raises(AssertionError):
        lstm(x)  # the poison works
    out = fused(x)[0]
    out.sum().backward()
    assert max_error(out, expected) < 1e-12


def test_backward_in_eval_mode_and_no_grad_forward():
    lstm, fused = pair()
    fused.eval()
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    fused(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        out, _ = fused(x)
    assert not out.requires_grad
    with torch.inference_mode():
        assert max_error(fused(x.detach())[0], lstm(x.detach())[0]) < 1e-12


@pytest.mark.parametrize("layers,bidirectional,proj", list(itertools.product([1, 2], [False, True], [0, 2])))
def test_gradcheck_module(layers, bidirectional, proj):
    fused = FusedLSTM(2, 3, num_layers=layers, bidirectional=bidirectional, proj_size=proj,
                      dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: fused(x)[0], (x, *fused.parameters()))


def test_has_nn_lstm_methods():
    """Code written for nn.LSTM calls its public methods (check_forward_args,
    permute_hidden, get_expected_hidden_size...): all exist, and behave alike."""
    lstm, fused = pair(num_layers=2, bidirectional=True, proj_size=3)
    public = {n for n in dir(nn.LSTM) if not n.startswith("__")}
    assert public - set(dir(FusedLSTM)) <= {"_update_flat_weights", "_weights_have_changed",
                                            "_init_flat_weights"}
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    for method in ("get_expected_hidden_size", "get_expected_cell_size"):
        assert getattr(fused, method)(x, None) == getattr(lstm, method)(x, None)
    perm = torch.tensor([1, 0])
    hx = (torch.randn(4, 2, 3), torch.randn(4, 2, 5))
    for a, b in zip(fused.permute_hidden(hx, perm), lstm.permute_hidden(hx, perm)):
        assert torch.equal(a, b)
    bad = (torch.randn(4, 2, 5, dtype=torch.float64), hx[1].double())
    for module in (lstm, fused):
        with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(4, 2, 3\), got \[4, 2, 5\]"):
            module.check_forward_args(x, bad, None)


def test_autocast_leaves_float64_alone():
    lstm, fused = pair()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = fused(x)
    assert out.dtype == h.dtype == c.dtype == torch.float64
    assert max_error(out, lstm(x)[0]) < 1e-12


@pytest.mark.parametrize("layers,bidirectional", list(itertools.product([2, 3], [False, True])))
@pytest.mark.parametrize("packed", [True, False])
def test_training_dropout_draws_what_nn_lstm_draws(layers, bidirectional, packed):
    """Same seed, same dropout masks: the same outputs and gradients, and the random state
    left where nn.LSTM leaves it (it drops out the packed data, [N, *], not a padded
    tensor), so that swapping the class changes nothing in a training run."""
    lstm, fused = pair(num_layers=layers, bidirectional=bidirectional, dropout=0.4)
    lstm.train(), fused.train()
    if packed:
        x = pack_sequence([torch.randn(n, 4, dtype=torch.float64) for n in (3, 6, 1, 4)],
                          enforce_sorted=False)
        x.data.requires_grad_()
    else:
        x = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    states = []
    for module in (lstm, fused):
        torch.manual_seed(5)
        states.append(outputs_and_grads(module, x, None))
        states[-1] += (torch.get_rng_state(),)
    (o1, g1, rng1), (o2, g2, rng2) = states
    for a, b in zip(o1 + list(g1), o2 + list(g2)):
        assert max_error(a, b) < 1e-12
    assert torch.equal(rng1, rng2)
    torch.manual_seed(6)
    assert max_error(fused(x)[0].data, o2[0]) > 1e-3  # another seed, other masks


def bad_packed():
    f64 = dict(dtype=torch.float64)
    yield "increasing", torch.randn(6, 4, **f64), torch.tensor([2, 3, 1])
    yield "fewer rows", torch.randn(4, 4, **f64), torch.tensor([3, 2, 1])
    yield "int32", torch.randn(6, 4, **f64), torch.tensor([3, 2, 1], dtype=torch.int32)
    yield "float", torch.randn(6, 4, **f64), torch.tensor([3.0, 2.0, 1.0])
    yield "2-D", torch.randn(6, 4, **f64), torch.tensor([[3, 2, 1]])
    yield "empty", torch.randn(0, 4, **f64), torch.tensor([], dtype=torch.int64)
    yield "3-D data", torch.randn(6, 1, 4, **f64), torch.tensor([3, 2, 1])


@pytest.mark.parametrize("name,data,batch_sizes", list(bad_packed()),
                         ids=[b[0] for b in bad_packed()])
def test_malformed_packed_sequence_raises_like_nn_lstm(name, data, batch_sizes):
    lstm, fused = pair(num_layers=2)
    with pytest.raises(Exception) as theirs:
        lstm(PackedSequence(data, batch_sizes))
    with pytest.raises(type(theirs.value)):
        fused(PackedSequence(data, batch_sizes))


@pytest.mark.parametrize("data,batch_sizes", [
    (torch.randn(3, 4, dtype=torch.float64), torch.tensor([2, 1, 0])),
    (torch.randn(8, 4, dtype=torch.float64), torch.tensor([3, 2, 1])),
], ids=["zero entry", "more rows"])
def test_malformed_packed_sequence_that_nn_lstm_runs_is_refused(data, batch_sizes):
    """nn.LSTM runs these without an error (steps of no rows; rows past sum(batch_sizes)
    ignored): FusedLSTM refuses them with a RuntimeError naming the fault."""
    lstm, fused = pair()
    lstm(PackedSequence(data, batch_sizes))
    with pytest.raises(RuntimeError, match="batch_sizes"):
        fused(PackedSequence(data, batch_sizes))


def test_batch_sizes_off_the_cpu_raise_like_nn_lstm():
    """PackedSequence's constructor refuses them; _replace (namedtuple's) does not."""
    packed = PackedSequence(torch.randn(6, 4, dtype=torch.float64), torch.tensor([3, 2, 1]))
    packed = packed._replace(batch_sizes=packed.batch_sizes.to("meta"))
    lstm, fused = pair()
    with pytest.raises(RuntimeError):
        lstm(packed)
    with pytest.raises(RuntimeError, match="batch_sizes must be on the CPU"):
        fused(packed)
