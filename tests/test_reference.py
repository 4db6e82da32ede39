"""The reference loop is the oracle of every other test: check it against nn.LSTM first."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import ReferenceLSTM, reference
from conftest import max_error


def layer_weights(lstm: nn.LSTM, suffix: str = "l0"):
    w = {name: getattr(lstm, f"{name}_{suffix}", None)
         for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
    bias = None if w["bias_ih"] is None else w["bias_ih"] + w["bias_hh"]
    return w["weight_ih"], w["weight_hh"], bias, w["weight_hr"]


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_nn_lstm(proj_size, bias):
    lstm = nn.LSTM(5, 7, bias=bias, proj_size=proj_size, dtype=torch.float64)
    T, B, P = 6, 4, proj_size or 7
    x = torch.randn(T, B, 5, dtype=torch.float64)
    h0, c0 = torch.randn(1, B, P, dtype=torch.float64), torch.randn(1, B, 7, dtype=torch.float64)
    expected, (h_n, c_n) = lstm(x, (h0, c0))
    w_ih, w_hh, b, w_hr = layer_weights(lstm)
    out, h, c = reference.lstm_layer(x, h0[0], c0[0], w_ih, w_hh, b, w_hr)
    assert max_error(out, expected) < 1e-12
    assert max_error(h, h_n[0]) < 1e-12 and max_error(c, c_n[0]) < 1e-12


def test_layer_reverse_equals_nn_lstm_backward_direction():
    lstm = nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected, (h_n, c_n) = lstm(x)
    out, h, c = reference.lstm_layer(x, h_n.new_zeros(2, 4), h_n.new_zeros(2, 4),
                                     *layer_weights(lstm, "l0_reverse"), reverse=True)
    assert max_error(out, expected[..., 4:]) < 1e-12
    assert max_error(h, h_n[1]) < 1e-12 and max_error(c, c_n[1]) < 1e-12


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=2, batch_first=True),
])
def test_reference_module_equals_nn_lstm_packed(kwargs):
    lstm = nn.LSTM(3, 5, dtype=torch.float64, **kwargs)
    ref = ReferenceLSTM(3, 5, dtype=torch.float64, **kwargs)
    ref.load_state_dict(lstm.state_dict())
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (2, 5, 1, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    (y1, (h1, c1)), (y2, (h2, c2)) = lstm(packed), ref(packed)
    assert max_error(y1.data, y2.data) < 1e-12
    assert max_error(h1, h2) < 1e-12 and max_error(c1, c2) < 1e-12
