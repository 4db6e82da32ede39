"""TorchScript: torch.jit.script and torch.jit.trace of models containing FusedLSTM, as
with nn.LSTM (FusedLSTM.forward)."""
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM
from conftest import max_error


class Tagger(nn.Module):
    def __init__(self, lstm_class, **kwargs):
        super().__init__()
        self.lstm = lstm_class(4, 5, dtype=torch.float64, **kwargs)
        width = 5 if not kwargs.get("proj_size") else kwargs["proj_size"]
        self.head = nn.Linear(width * (2 if kwargs.get("bidirectional") else 1), 3,
                              dtype=torch.float64)

    def forward(self, x, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        output, (h_n, c_n) = self.lstm(x, hx)
        return self.head(output), h_n, c_n


CONFIGS = [dict(), dict(num_layers=2, bidirectional=True, batch_first=True),
           dict(num_layers=2, proj_size=2), dict(bias=False)]


def pair(**kwargs):
    ours, theirs = Tagger(FusedLSTM, **kwargs).eval(), Tagger(nn.LSTM, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_scripted_model_matches_nn_lstm(kwargs):
    ours, theirs = pair(**kwargs)
    scripted = torch.jit.script(ours)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert list(scripted.state_dict()) == list(theirs.state_dict())
    shape = (3, 6, 4) if kwargs.get("batch_first") else (6, 3, 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    layers = ours.lstm.num_layers * (2 if ours.lstm.bidirectional else 1)
    h0 = torch.randn(layers, 3, kwargs.get("proj_size") or 5, dtype=torch.float64)
    c0 = torch.randn(layers, 3, 5, dtype=torch.float64)
    for hx in (None, (h0, c0)):
        got, expected = scripted(x, hx), theirs(x, hx)
        for a, b in zip(got, expected):
            assert max_error(a, b) < 1e-12
        grads = torch.autograd.grad(got[0].sum(), [x, *scripted.parameters()])
        reference = torch.autograd.grad(expected[0].sum(), [x, *theirs.parameters()])
        for a, b in zip(grads, reference):
            assert max_error(a, b) < 1e-10


def test_scripted_unbatched_input_and_errors():
    ours, theirs = pair()
    scripted = torch.jit.script(ours)
    x = torch.randn(5, 4, dtype=torch.float64)
    for a, b in zip(scripted(x), theirs(x)):
        assert a.shape == b.shape and max_error(a, b) < 1e-12
    with pytest.raises(torch.jit.Error, match="input.size\\(-1\\) must be equal to input_size"):
        scripted(torch.randn(5, 3, 7, dtype=torch.float64))
    with pytest.raises(torch.jit.Error, match="Expected hidden\\[1\\] dtype"):
        scripted(torch.randn(5, 3, 4, dtype=torch.float64),
                 (torch.zeros(1, 3, 5, dtype=torch.float64), torch.zeros(1, 3, 5)))
    with pytest.raises(torch.jit.Error, match="Expected hidden\\[0\\] size"):
        scripted(torch.randn(5, 3, 4, dtype=torch.float64),
                 (torch.zeros(1, 2, 5, dtype=torch.float64), torch.zeros(1, 3, 5, dtype=torch.float64)))


def test_scripted_module_saves_and_loads():
    ours, _ = pair(num_layers=2)
    scripted = torch.jit.script(ours)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    assert torch.equal(loaded(x)[0], scripted(x)[0])


def test_eager_model_keeps_its_behaviour_after_scripting():
    """Scripting replaces the submodule by its scripted stand-in (torch.jit's behaviour
    for __prepare_scriptable__); the eager model must still do all FusedLSTM does."""
    ours, theirs = pair(num_layers=2)
    torch.jit.script(ours)
    packed = pack_sequence([torch.randn(3, 4, dtype=torch.float64),
                            torch.randn(2, 4, dtype=torch.float64)])
    out, _ = ours.lstm(packed)
    expected, _ = theirs.lstm(packed)
    assert max_error(out.data, expected.data) < 1e-12
    ours.train()
    ours.lstm.dropout = 0.0
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert max_error(ours(x)[0], theirs(x)[0]) < 1e-12


def test_trace():
    ours, theirs = pair(bidirectional=True)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    y = torch.randn(9, 2, 4, dtype=torch.float64)  # another length and batch
    for a, b in zip(traced(y), theirs(y)):
        assert max_error(a, b) < 1e-12
