"""Reliability: long sequences, memory over many steps, determinism, bad input."""
import gc
import os
import resource

import pytest
import torch
from torch import nn

from fused_lstm import FusedLSTM
from conftest import max_error


def resident_mib():
    """The process's resident memory now (not its peak), where /proc tells it."""
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc/self/statm")
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def autograd_nodes(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.fixture
def one_thread():
    # 10 000 tiny steps: on a machine whose cores are busy, every step's parallel region
    # (ours and nn.LSTM's) waits for a descheduled thread, which turns seconds into minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ten_thousand_steps_forward_and_backward(one_thread):
    """No recursion and no graph per step: the autograd graph does not grow with T, and
    10 000 steps give nn.LSTM's outputs and gradients."""
    lstm = nn.LSTM(3, 8, dtype=torch.float64)  # one layer: nn.LSTM's float64 backward is slow
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(10_000, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (fused, lstm):
        out, (h_n, c_n) = module(x)
        loss = out.sum() + h_n.pow(2).sum() + c_n.sum()
        results.append([out, h_n, c_n, *torch.autograd.grad(loss, [x, *module.parameters()])])
        if module is fused:
            short = module(torch.randn(10, 2, 3, dtype=torch.float64, requires_grad=True))[0]
            assert autograd_nodes(out) == autograd_nodes(short)
    for ours, theirs in zip(*results):
        assert max_error(ours, theirs) < 1e-9


def test_saved_state_is_linear_in_sequence_length():
    lstm = FusedLSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4)

    def saved_bytes(steps):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        x = torch.randn(steps, 2, 3, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lstm(x)
        return total
    b1, b2, b4 = saved_bytes(500), saved_bytes(1000), saved_bytes(2000)
    assert b4 - b2 == 2 * (b2 - b1)
    # Per step and sequence, for each layer and direction: its input (3, then 2P = 8),
    # output (P = 4), gates and cells (4H + H = 40), in float32; nothing else.
    assert (b2 - b1) / 500 / 2 == 4 * (2 * (3 + 4 + 40) + 2 * (8 + 4 + 40))


def test_many_training_steps_do_not_grow_memory():
    lstm = FusedLSTM(3, 8, proj_size=4)
    optimizer = torch.optim.SGD(lstm.parameters(), lr=0.01)
    x = torch.randn(10, 2, 3)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def train(steps):
        for _ in range(steps):
            optimizer.zero_grad()
            lstm(x)[0].pow(2).mean().backward()
            optimizer.step()

    train(10)
    tensors, resident = live_tensors(), resident_mib()
    train(200)
    assert live_tensors() <= tensors  # none left behind (others may be freed meanwhile)
    assert resident_mib() - resident < 16


def deterministic_run(device):
    torch.manual_seed(0)
    lstm = FusedLSTM(16, 64, num_layers=2, bidirectional=True, device=device)
    x = torch.randn(20, 16, 16, device=device, requires_grad=True)
    out, (h_n, c_n) = lstm(x)
    grads = torch.autograd.grad(out.pow(2).sum() + h_n.sum(), [x, *lstm.parameters()])
    return [out, h_n, c_n, *grads]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_deterministic_twice_in_a_row(device):
    for first, second in zip(deterministic_run(device), deterministic_run(device)):
        assert torch.equal(first, second)


def test_non_finite_values_propagate_like_nn_lstm():
    lstm = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    x[1, 0, 0], x[2, 1, 1], x[3, 2, 2] = float("inf"), -float("inf"), float("nan")
    h0 = torch.randn(2, 4, 4, dtype=torch.float64)
    h0[0, 3, 0] = float("nan")
    c0 = torch.randn(2, 4, 4, dtype=torch.float64)
    results = []
    for module in (fused, lstm):
        xg = x.clone().requires_grad_()
        out, (h_n, c_n) = module(xg, (h0, c0))
        grads = torch.autograd.grad(out.sum(), [xg, *module.parameters()])
        results.append([out, h_n, c_n, *grads])
    for ours, theirs in zip(*results):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.isinf(), theirs.isinf())
        assert max_error(ours.nan_to_num(), theirs.nan_to_num()) < 1e-12


def test_huge_sizes_fail_clearly_before_allocating():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(RuntimeError, match="parameters need .* GiB"):  # nn.LSTM: RuntimeError
        FusedLSTM(10**6, 10**6)
    lstm = FusedLSTM(1, 512)
    x = torch.zeros(1, 1, 1).expand(10**6, 1000, 1)  # 4 bytes, implying terabytes of state
    with pytest.raises(torch.OutOfMemoryError, match="state kept for backward .* GiB"):
        lstm(x)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024


@pytest.mark.parametrize("name", ["state on another device", "complex input"])
def test_wrong_device_and_dtype_refused_like_nn_lstm(name):
    lstm = nn.LSTM(3, 4)
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(2, 5, 3)
    hx = (torch.zeros(1, 5, 4), torch.zeros(1, 5, 4))
    if name == "state on another device":
        hx = (hx[0].to("meta"), hx[1])
    else:
        x = x.to(torch.complex64)
    with pytest.raises(Exception) as theirs:
        lstm(x, hx)
    with pytest.raises(type(theirs.value)):
        fused(x, hx)
