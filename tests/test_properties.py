"""Property-based tests: FusedLSTM against nn.LSTM in float64 (the reference) on
configurations and inputs drawn by hypothesis, which shrinks any failure to the
smallest one it can find."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM
from conftest import max_error

# float64: the same arithmetic up to summation order. float32: its rounding, amplified
# by at most a few steps of recurrence on these small sizes.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


@st.composite
def cases(draw):
    hidden_size = draw(st.integers(1, 7))
    config = dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden_size,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden_size - 1)) if draw(st.booleans()) else 0,
    )
    batch = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 6), min_size=batch, max_size=batch))
    return dict(
        config=config,
        lengths=lengths,
        packed=draw(st.booleans()),
        with_state=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run(module, x, hx):
    """Outputs and the gradients of a random projection of them, in float64."""
    params = list(module.parameters())
    out, (h_n, c_n) = module(x, hx)
    data = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    g = torch.Generator().manual_seed(0)
    loss = sum((torch.randn(t.shape, generator=g, dtype=torch.float64) * t.double()).sum()
               for t in (data, h_n, c_n))
    leaves = [x.data if hasattr(x, "batch_sizes") else x, *(hx or ()), *params]
    return [t.double() for t in (data, h_n, c_n, *torch.autograd.grad(loss, leaves))]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_nn_lstm_float64(case):
    torch.manual_seed(case["seed"])
    config, dtype = case["config"], case["dtype"]
    fused = FusedLSTM(**config, dtype=dtype)
    reference = nn.LSTM(**config, dtype=torch.float64)
    reference.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    lengths, batch = case["lengths"], len(case["lengths"])
    if case["packed"]:
        seqs = [torch.randn(n, config["input_size"], dtype=dtype) for n in lengths]
        x = pack_sequence(seqs, enforce_sorted=False)
        x.data.requires_grad_()
        x64 = pack_sequence([s.double() for s in seqs], enforce_sorted=False)
        x64.data.requires_grad_()
    else:
        steps = max(lengths)
        shape = (batch, steps) if config["batch_first"] else (steps, batch)
        x = torch.randn(*shape, config["input_size"], dtype=dtype, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
    hx = hx64 = None
    if case["with_state"]:
        layers = config["num_layers"] * (2 if config["bidirectional"] else 1)
        sizes = (config["proj_size"] or config["hidden_size"], config["hidden_size"])
        hx = tuple(torch.randn(layers, batch, n, dtype=dtype, requires_grad=True) for n in sizes)
        hx64 = tuple(h.detach().double().requires_grad_() for h in hx)
    for ours, theirs in zip(run(fused, x, hx), run(reference, x64, hx64)):
        assert ours.shape == theirs.shape
        scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
        assert max_error(ours, theirs) <= TOLERANCE[dtype] * scale
