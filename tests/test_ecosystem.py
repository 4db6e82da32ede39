"""FusedLSTM with the rest of PyTorch: torch.compile, torch.export, autocast, CUDA graphs,
DistributedDataParallel."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.export import Dim

from fused_lstm import FusedLSTM
from conftest import assert_as_accurate_as, max_error


def initial_state(lstm, batch, **kwargs):
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    return (torch.randn(layers, batch, lstm.proj_size or lstm.hidden_size, **kwargs),
            torch.randn(layers, batch, lstm.hidden_size, **kwargs))


def outputs_and_grads(module, x, hx):
    x = x.detach().requires_grad_()
    hx = tuple(h.detach().requires_grad_() for h in hx)
    out, (h_n, c_n) = module(x, hx)
    loss = out.pow(2).sum() + h_n.sum() + c_n.tanh().sum()
    return [out, h_n, c_n, *torch.autograd.grad(loss, [x, *hx, *module.parameters()])]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward_match_eager(backend):
    """fullgraph=True: any graph break is an error. (Dynamo refuses to trace nn.LSTM.)"""
    torch._dynamo.reset()
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True)
    compiled = torch.compile(lstm, fullgraph=True, backend=backend)
    x = torch.randn(5, 2, 3)
    hx = initial_state(lstm, 2)
    for ours, eager in zip(outputs_and_grads(compiled, x, hx), outputs_and_grads(lstm, x, hx)):
        assert ours.shape == eager.shape
        assert max_error(ours, eager) < 1e-6


def test_export_and_run_the_exported_program():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedLSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(10, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = Tagger().eval()
    program = torch.export.export(model, (torch.randn(2, 4, 3),),
                                  dynamic_shapes=({0: Dim("batch"), 1: Dim("steps")},))
    targets = [node.target for node in program.graph.nodes]
    assert targets.count(torch.ops.fused_lstm.forward.default) == 4
    x = torch.randn(3, 7, 3)
    assert torch.equal(program.module()(x), model(x))


@pytest.mark.parametrize("kwargs", [dict(num_layers=2), dict(proj_size=3, bidirectional=True)],
                         ids=str)
def test_cpu_autocast_bfloat16(kwargs):
    """nn.LSTM fails under CPU autocast to bfloat16 (oneDNN has no such primitive); ours
    computes in bfloat16 with float32 gates and cells, and trains in float32."""
    lstm = FusedLSTM(8, 6, **kwargs)
    x = torch.randn(7, 3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = lstm(x)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    # As accurate as nn.LSTM run in bfloat16 (its CPU kernel has a bfloat16 path outside
    # autocast), both measured against float64 on the same bfloat16-rounded values.
    rounded = copy.deepcopy(lstm)
    for p in rounded.parameters():
        p.data = p.data.bfloat16().float()
    reference = nn.LSTM(8, 6, **kwargs)
    reference.load_state_dict(rounded.state_dict())
    exact = copy.deepcopy(reference).double()(x.detach().bfloat16().double())
    theirs = reference.bfloat16()(x.detach().bfloat16())
    assert_as_accurate_as((out, h_n, c_n), (theirs[0], *theirs[1]), (exact[0], *exact[1]))
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in lstm.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_runs_in_its_dtype_like_nn_lstm(dtype):
    lstm = nn.LSTM(8, 16, num_layers=2, device="cuda")
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(10, 4, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        ours, theirs = fused(x), lstm(x)
    for o, t in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert o.dtype == t.dtype == dtype
    # both against float64 on the values autocast rounded to `dtype`
    exact_lstm = copy.deepcopy(lstm)
    for p in exact_lstm.parameters():
        p.data = p.data.to(dtype).double()
    exact = exact_lstm(x.detach().to(dtype).double())
    assert_as_accurate_as((ours[0], *ours[1]), (theirs[0], *theirs[1]), (exact[0], *exact[1]))
    ours[0].float().sum().backward()
    assert fused.weight_ih_l0.grad.dtype == torch.float32


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_of_forward_and_training_step():
    lstm = FusedLSTM(8, 16, num_layers=2, bidirectional=True, device="cuda")
    optimizer = torch.optim.SGD(lstm.parameters(), lr=0.1)
    static_x = torch.randn(12, 4, 8, device="cuda")

    def train_step():
        optimizer.zero_grad(set_to_none=False)
        loss = lstm(static_x)[0].pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(3):
            train_step()
    torch.cuda.current_stream().wait_stream(side)

    forward_graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(forward_graph):
        static_out = lstm(static_x)[0]
    step_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(step_graph):
        static_loss = train_step()

    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        forward_graph.replay()
        with torch.no_grad():
            assert max_error(static_out, lstm(static_x)[0]) < 1e-5
        expected = copy.deepcopy(lstm)
        expected_loss = expected(static_x)[0].pow(2).mean()
        expected_loss.backward()
        step_graph.replay()
        assert abs(static_loss.item() - expected_loss.item()) < 1e-5
        for p, q in zip(lstm.parameters(), expected.parameters()):
            assert max_error(p, q.detach() - 0.1 * q.grad) < 1e-5


def _ddp_worker(rank, directory, state_dict, x):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank,
                            world_size=2)
    try:
        lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
        lstm.load_state_dict(state_dict)
        model = nn.parallel.DistributedDataParallel(lstm)
        shard = x.chunk(2, dim=1)[rank]
        model(shard)[0].pow(2).mean().backward()
        if rank == 0:
            torch.save([p.grad for p in lstm.parameters()], f"{directory}/grads.pt")
        # Neither rank tears its connections down while the other still reads them (gloo
        # aborts a process whose peer closed first).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_averages_the_gradients(tmp_path):
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    single = []
    for shard in x.chunk(2, dim=1):
        single.append(torch.autograd.grad(lstm(shard)[0].pow(2).mean(), list(lstm.parameters())))
    mp.spawn(_ddp_worker, args=(str(tmp_path), lstm.state_dict(), x), nprocs=2, join=True)
    for ddp_grad, a, b in zip(torch.load(tmp_path / "grads.pt"), *single):
        assert max_error(ddp_grad, (a + b) / 2) < 1e-12
