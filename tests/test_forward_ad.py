"""Forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad), as
nn.LSTM has on the CPU: computed through the reference loop (fused_lstm/_ops.py), so each
test compares with nn.LSTM, never with that loop."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM
from conftest import max_error

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True, proj_size=2), dict(bias=False)]


def pair(**kwargs):
    lstm = nn.LSTM(3, 4, dtype=torch.float64, **kwargs)
    fused = FusedLSTM(3, 4, dtype=torch.float64, **kwargs)
    fused.load_state_dict(lstm.state_dict())
    return lstm, fused


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_jvp_and_dual_tensors_match_nn_lstm(kwargs):
    lstm, fused = pair(**kwargs)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    expected = torch.func.jvp(lambda x: lstm(x)[0], (x,), (v,))[1]
    got = torch.func.jvp(lambda x: fused(x)[0], (x,), (v,))[1]
    assert max_error(got, expected) < 1e-12 and expected.abs().max() > 1e-3
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fused(fwAD.make_dual(x, v))[1][1]).tangent
    with fwAD.dual_level():
        reference = fwAD.unpack_dual(lstm(fwAD.make_dual(x, v))[1][1]).tangent
    assert max_error(tangent, reference) < 1e-12


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_jacfwd_and_hessian_match_nn_lstm(kwargs):
    lstm, fused = pair(**kwargs)
    x = torch.randn(3, 1, 3, dtype=torch.float64)
    jacobians = [torch.func.jacfwd(lambda x: m(x)[1][1])(x) for m in (fused, lstm)]
    assert max_error(*jacobians) < 1e-12
    hessians = [torch.func.hessian(lambda x: m(x)[0].pow(2).sum())(x) for m in (fused, lstm)]
    assert max_error(*hessians) < 1e-12 and hessians[1].abs().max() > 1e-4


def test_hessian_with_respect_to_a_weight():
    lstm, fused = pair()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    w = lstm.weight_hh_l0.detach()

    def loss(module):
        return lambda w: functional_call(module, {"weight_hh_l0": w}, (x,))[0].pow(2).sum()

    got, expected = torch.func.hessian(loss(fused))(w), torch.func.hessian(loss(lstm))(w)
    assert max_error(got, expected) < 1e-11 and expected.abs().max() > 1e-4


def test_jvp_with_packed_input():
    """nn.LSTM cannot take a PackedSequence under torch.func.jvp ("Cannot access data
    pointer of Tensor that doesn't have storage"), and FusedLSTM's jvp is the reference
    loop's: the oracle is nn.LSTM's J·v from reverse mode (torch.autograd.functional.jvp,
    the vjp of its vjp; nn.LSTM has double backward on the CPU)."""
    lstm, fused = pair(bidirectional=True)
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (4, 2, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    v = torch.randn_like(packed.data)

    def run(module):
        def f(data):
            out, (h, c) = module(nn.utils.rnn.PackedSequence(data, *packed[1:]))
            return out.data, h, c
        return f

    ours = torch.func.jvp(run(fused), (packed.data,), (v,))[1]
    theirs = torch.autograd.functional.jvp(run(lstm), (packed.data,), (v,))[1]
    for a, b in zip(ours, theirs):
        assert max_error(a, b) < 1e-12 and b.abs().max() > 1e-3


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_jvp_along_every_parameter_matches_nn_lstm(kwargs):
    """Tangents on the weights, biases and projection too, not only on the input."""
    lstm, fused = pair(**kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    params = dict(lstm.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    results = [torch.func.jvp(lambda p: functional_call(m, p, (x,)), (params,), (tangents,))[1]
               for m in (fused, lstm)]
    (out, (h_n, c_n)), (ref_out, (ref_h, ref_c)) = results
    for a, b in ((out, ref_out), (h_n, ref_h), (c_n, ref_c)):
        assert max_error(a, b) < 1e-12 and b.abs().max() > 1e-3
