"""FusedLSTMCell against nn.LSTMCell, sharing one state_dict: outputs, states, every
gradient, bad input; one step of FusedLSTM; and the rest of PyTorch around it (torch.func,
torch.compile, torch.export, TorchScript, ONNX, autocast, the meta device, saving, DDP)."""
import copy
import importlib.util
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.export import Dim
from torch.func import functional_call, grad, stack_module_state, vmap

from fused_lstm import FusedLSTM, FusedLSTMCell
from conftest import assert_as_accurate_as, max_error
from test_dropin import lstm_nodes, needs_onnx, run_onnx

F64 = dict(dtype=torch.float64)


def pair(input_size=3, hidden_size=5, **kwargs):
    cell = nn.LSTMCell(input_size, hidden_size, **kwargs)
    return cell, FusedLSTMCell.from_lstm_cell(cell)


def run_steps(cell, xs, hx, cotangents):
    """The cell over the steps of ``xs`` from ``hx`` (None: zeros): the last state, and
    the gradients of a loss on every step's state, of xs, hx and every parameter."""
    leaves = [t for t in (xs, *(hx or ())) if t.requires_grad] + list(cell.parameters())
    state, outputs = hx, []
    for x in xs:
        state = cell(x, state)
        outputs += state
    loss = sum((g * o).sum() for g, o in zip(cotangents, outputs))
    return [*state, *torch.autograd.grad(loss, leaves)]


def compare(sizes, dtype, batch=4, steps=3, unbatched=False, with_state=True, bias=True):
    """Ours and nn.LSTMCell at ``dtype``, both measured against nn.LSTMCell in float64."""
    input_size, hidden_size = sizes
    theirs, ours = pair(input_size, hidden_size, bias=bias, dtype=dtype)
    exact = copy.deepcopy(theirs).double()
    shape = () if unbatched else (batch,)
    xs = torch.randn(steps, *shape, input_size, **F64)
    hx = tuple(torch.randn(*shape, hidden_size, **F64) for _ in range(2)) if with_state else None
    cotangents = [torch.randn(*shape, hidden_size, **F64) for _ in range(2 * steps)]

    def run(cell, dtype):
        leaves_x = xs.to(dtype).requires_grad_()
        leaves_hx = tuple(h.to(dtype).requires_grad_() for h in hx) if with_state else None
        return run_steps(cell, leaves_x, leaves_hx, [c.to(dtype) for c in cotangents])

    results = run(ours, dtype), run(theirs, dtype), run(exact, torch.float64)
    for o, t in zip(results[0], results[1]):
        assert o.shape == t.shape and o.dtype == t.dtype
    if dtype == torch.float64:
        # No more precise run to measure both against: equal to nn.LSTMCell to rounding.
        for o, t in zip(results[0], results[1]):
            assert max_error(o, t) <= 64 * torch.finfo(dtype).eps * max(1.0, t.abs().max().item())
    else:
        assert_as_accurate_as(*results)
    return results


# --- the module against nn.LSTMCell ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
# H = 1 with a batch of 64: the rule compares largest errors, and those of a tensor of a few
# values are chance (at B = 3 in bfloat16, ours failed 2 seeds of 40 while its mean error
# over the 40 was 0.6 of nn.LSTMCell's)
@pytest.mark.parametrize("sizes,batch", [((3, 5), 4), ((7, 1), 64), ((5, 33), 1), ((9, 257), 2),
                                         ((33, 16), 1)], ids=str)
def test_outputs_and_gradients_as_accurate_as_nn_lstm_cell(dtype, sizes, batch):
    compare(sizes, dtype, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("unbatched,with_state,bias", [(True, True, True), (True, False, True),
                                                        (False, False, True), (False, True, False),
                                                        (True, False, False)], ids=str)
def test_unbatched_without_state_and_without_bias(dtype, unbatched, with_state, bias):
    ours, _, _ = compare((4, 6), dtype, unbatched=unbatched, with_state=with_state, bias=bias)
    assert ours[0].shape == ((6,) if unbatched else (4, 6))


def test_gradcheck_and_gradgradcheck_through_the_module():
    cell = FusedLSTMCell(3, 4, **F64)
    names = [n for n, _ in cell.named_parameters()]
    x = torch.randn(2, 3, **F64, requires_grad=True)
    h0, c0 = (torch.randn(2, 4, **F64, requires_grad=True) for _ in range(2))

    def two_steps(x, h0, c0, *params):
        p = dict(zip(names, params))
        state = functional_call(cell, p, (x, (h0, c0)))
        return functional_call(cell, p, (x.flip(0), state))

    inputs = (x, h0, c0, *cell.parameters())
    assert torch.autograd.gradcheck(two_steps, inputs)
    assert torch.autograd.gradgradcheck(two_steps, inputs, fast_mode=True)


def test_gradient_penalty_matches_nn_lstm_cell():
    results = []
    x = torch.randn(3, 3, **F64)
    for cell in pair(**F64):
        xg = x.clone().requires_grad_()
        h, c = cell(xg, cell(xg))  # from a non-zero state: every weight matters
        (grad_x,) = torch.autograd.grad(h.tanh().sum() + c.sum(), xg, create_graph=True)
        penalty = (grad_x.norm(dim=-1) - 1).pow(2).sum()
        results.append(torch.autograd.grad(penalty, [xg, *cell.parameters()]))
    for ours, theirs in zip(*results):
        assert ours.abs().sum() > 0 and max_error(ours, theirs) < 1e-12


def test_no_grad_and_inference_mode():
    theirs, ours = pair(**F64)
    x = torch.randn(2, 3, **F64)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            h, c = ours(x)
            assert not h.requires_grad
            assert max_error(h, theirs(x)[0]) < 1e-13


# --- one step of FusedLSTM ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_cell_over_a_sequence_is_one_layer_of_fused_lstm(dtype):
    """Within rounding, not bitwise: the layer computes the input's product for all steps
    in one GEMM ([T*B, I] x [I, 4H]), the cell one per step ([B, I] x [I, 4H]), and the
    library's summation order depends on the product's shape (measured: their results
    differ in the last bits in float32 and float64). The recurrence and the cell update
    are the same kernel; at T = 1 the two are the very same call, bitwise."""
    cell = FusedLSTMCell(6, 33, dtype=dtype)
    lstm = FusedLSTM(6, 33, dtype=dtype)
    lstm.load_state_dict({f"{name}_l0": p for name, p in cell.state_dict().items()})
    exact = nn.LSTM(6, 33, **F64)
    exact.load_state_dict(lstm.state_dict())
    xs = torch.randn(20, 3, 6, dtype=dtype)
    hx = tuple(torch.randn(3, 33, dtype=dtype) for _ in range(2))
    state, outputs = hx, []
    for x in xs:
        state = cell(x, state)
        outputs.append(state[0])
    stepped = (torch.stack(outputs), *state)
    output, (h_n, c_n) = lstm(xs, tuple(h.unsqueeze(0) for h in hx))
    layer = (output, h_n[0], c_n[0])
    reference, (h_ref, c_ref) = exact(xs.double(), tuple(h.double().unsqueeze(0) for h in hx))
    if dtype == torch.float64:  # the rule is for the dtypes a float64 run is more precise than
        for a, b in zip(stepped, layer):
            assert max_error(a, b) < 1e-12
    else:
        assert_as_accurate_as(stepped, layer, (reference, h_ref[0], c_ref[0]))
    single, (h_1, c_1) = lstm(xs[:1], tuple(h.unsqueeze(0) for h in hx))
    assert torch.equal(cell(xs[0], hx)[0], h_1[0]) and torch.equal(cell(xs[0], hx)[1], c_1[0])


# --- constructor, parameters, errors ----------------------------------------------------

def test_same_parameters_and_initial_weights_as_nn_lstm_cell():
    for kwargs in (dict(), dict(bias=False)):
        torch.manual_seed(3)
        theirs = nn.LSTMCell(4, 7, **kwargs)
        torch.manual_seed(3)
        ours = FusedLSTMCell(4, 7, **kwargs)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == \
            [(n, p.shape) for n, p in theirs.named_parameters()]
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        assert ours.extra_repr() == theirs.extra_repr()
        assert ours.bias_ih is theirs.bias_ih is None or kwargs == {}


def test_state_dict_loads_strictly_both_ways():
    theirs, ours = nn.LSTMCell(3, 5), FusedLSTMCell(3, 5)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(FusedLSTMCell(3, 5).state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3)
    assert max_error(ours(x)[0], theirs(x)[0]) < 1e-6


def test_from_lstm_cell_copies_configuration_weights_and_mode():
    cell = nn.LSTMCell(3, 5, bias=False, dtype=torch.float64).eval()
    fused = FusedLSTMCell.from_lstm_cell(cell)
    assert (fused.input_size, fused.hidden_size, fused.bias, fused.training) == (3, 5, False, False)
    assert fused.weight_ih.dtype == torch.float64
    assert fused.weight_ih.data_ptr() != cell.weight_ih.data_ptr()
    assert torch.equal(fused.weight_hh, cell.weight_hh)


@pytest.mark.parametrize("args,kwargs", [((3.5, 4), {}), ((3, -1), {}), ((-3, 1), {}),
                                         (("3", 4), {}), ((3, 4), dict(bias=0))], ids=str)
def test_constructor_behaves_as_nn_lstm_cell(args, kwargs):
    try:
        theirs = nn.LSTMCell(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        with pytest.raises(type(error)):
            FusedLSTMCell(*args, **kwargs)
    else:
        ours = FusedLSTMCell(*args, **kwargs)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


class Scaled(nn.Module):
    def forward(self, weight):
        return 0.5 * weight


def test_reassigned_parametrized_and_weight_normed_weights_are_used():
    """The cell reads its weights from _parameters when they are there (faster than the
    module's attribute lookup), and through the attribute when something else provides it."""
    x = torch.randn(2, 3, **F64)
    for change in ("reassign", "parametrize", "weight_norm"):
        theirs, ours = pair(**F64)
        weight_hh = torch.randn(20, 5, **F64)
        for cell in (theirs, ours):
            if change == "reassign":
                cell.weight_hh = nn.Parameter(weight_hh.clone())
            elif change == "parametrize":
                nn.utils.parametrize.register_parametrization(cell, "weight_ih", Scaled())
            else:
                with pytest.warns(FutureWarning):
                    nn.utils.weight_norm(cell, "weight_hh")
        before = ours(x, ours(x))
        assert all(max_error(a, b) < 1e-13 for a, b in zip(before, theirs(x, theirs(x))))
        grads = torch.autograd.grad(before[0].sum(), list(ours.parameters()))
        assert all(g.abs().sum() > 0 for g in grads)


X, H = torch.randn(2, 3), torch.randn(2, 5)
BAD_INPUTS = {
    "3-D input": (torch.randn(1, 2, 3), None),
    "0-D input": (torch.tensor(1.0), None),
    "input_size": (torch.randn(2, 4), None),
    "unbatched input_size": (torch.randn(4), None),
    "batch of h_0": (X, (torch.randn(3, 5), H)),
    "batch of c_0": (X, (H, torch.randn(3, 5))),
    "hidden_size of h_0": (X, (torch.randn(2, 4), H)),
    "hidden_size of c_0": (X, (H, torch.randn(2, 4))),
    "3-D h_0": (X, (torch.randn(1, 2, 5), H)),
    "0-D c_0": (X, (H, torch.tensor(1.0))),
    "batched state, unbatched input": (torch.randn(3), (H, H)),
    "unbatched state, batched input": (X, (torch.randn(5), torch.randn(5))),
    "a tensor as state": (X, H),
    "one state": (X, (H,)),
    "three states": (X, (H, H, H)),
    "float64 input": (X.double(), (H, H)),
    "float64 input, no state": (X.double(), None),
    "float64 h_0": (X, (H.double(), H)),
    "integer input": (torch.ones(2, 3, dtype=torch.long), None),
    "complex input": (X.to(torch.complex64), None),
    "h_0 on the meta device": (X, (H.to("meta"), H)),
    "input on the meta device": (X.to("meta"), (H, H)),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_like_nn_lstm_cell(name):
    x, hx = BAD_INPUTS[name]
    theirs, ours = pair()
    with pytest.raises(Exception) as expected:
        theirs(x, hx)
    with pytest.raises(type(expected.value)) as got:
        ours(x, hx)
    # Where nn.LSTMCell's message names the cell's sizes, ours is the same.
    if "size" in str(expected.value) or "Expected" in str(expected.value):
        assert str(got.value) == str(expected.value)


def test_a_list_as_state_and_an_empty_batch_work_as_in_nn_lstm_cell():
    theirs, ours = pair()
    for x, hx in ((X, [H, H]), (torch.randn(0, 3), None)):
        for a, b in zip(ours(x, hx), theirs(x, hx)):
            assert a.shape == b.shape and max_error(a, b) < 1e-6


# --- torch.func ---------------------------------------------------------------------------

@pytest.mark.parametrize("unbatched", [False, True])
def test_vmap_over_inputs_matches_a_loop(unbatched):
    cell = FusedLSTMCell(3, 4, **F64)
    shape = (5,) if unbatched else (5, 2)
    xs = torch.randn(*shape, 3, **F64)
    hs, cs = torch.randn(*shape, 4, **F64), torch.randn(*shape, 4, **F64)
    h, c = vmap(lambda x, h, c: cell(x, (h, c)))(xs, hs, cs)
    def loss(params, x, h, c):
        return functional_call(cell, params, (x, (h, c)))[0].pow(2).sum()
    params = {k: v.detach() for k, v in cell.named_parameters()}
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, xs, hs, cs)
    for k in range(5):
        expected = cell(xs[k], (hs[k], cs[k]))
        assert max_error(h[k], expected[0]) < 1e-13 and max_error(c[k], expected[1]) < 1e-13
        grads = torch.autograd.grad(expected[0].pow(2).sum(), list(cell.parameters()))
        for (name, _), g in zip(cell.named_parameters(), grads):
            assert max_error(per_sample[name][k], g) < 1e-12


def test_vmap_over_an_ensemble_matches_a_loop():
    members = [FusedLSTMCell(3, 4, **F64) for _ in range(3)]
    params, _ = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(2, 3, **F64)

    def loss(p, x):
        h, c = functional_call(base, p, (x,))
        h, c = functional_call(base, p, (x, (h, c)))
        return h.sin().sum() + c.pow(2).sum()
    states = vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))(params, x)
    grads = vmap(grad(loss), in_dims=(0, None))(params, x)
    for k, member in enumerate(members):
        for got, expected in zip(states, member(x)):
            assert max_error(got[k], expected) < 1e-13
        expected = torch.autograd.grad(loss(dict(member.named_parameters()), x),
                                       list(member.parameters()))
        for (name, _), g in zip(member.named_parameters(), expected):
            assert max_error(grads[name][k], g) < 1e-12  # per member, never summed


# --- compile, export, TorchScript, ONNX ------------------------------------------------------

class Decoder(nn.Module):
    """A user's model that steps the cell itself: it feeds its own output back."""

    def __init__(self, cell_class=FusedLSTMCell, steps: int = 4, **kwargs):
        super().__init__()
        self.cell = cell_class(3, 5, **kwargs)
        self.head = nn.Linear(5, 3, **kwargs)
        self.steps = steps

    def forward(self, x, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        h, c = self.cell(x, hx)
        outputs = [self.head(h)]
        for _ in range(self.steps - 1):
            h, c = self.cell(outputs[-1], (h, c))
            outputs.append(self.head(h))
        return torch.stack(outputs), h, c


def decoders(**kwargs):
    ours, theirs = Decoder(**kwargs), Decoder(nn.LSTMCell, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def outputs_and_grads(model, x, hx=None):
    x = x.detach().requires_grad_()
    outputs = model(x, hx)
    loss = outputs[0].pow(2).sum() + outputs[1].sum() + outputs[2].tanh().sum()
    return [*outputs, *torch.autograd.grad(loss, [x, *model.parameters()])]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_of_a_decoder_loop(backend):
    torch._dynamo.reset()
    ours, theirs = decoders(**F64)
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, **F64)
    for got, expected in zip(outputs_and_grads(compiled, x), outputs_and_grads(theirs, x)):
        assert got.shape == expected.shape and max_error(got, expected) < 1e-12


def test_export_and_run_the_exported_program():
    ours, theirs = decoders()
    program = torch.export.export(ours.eval(), (torch.randn(2, 3),),
                                  dynamic_shapes=({0: Dim("batch")},))
    targets = [node.target for node in program.graph.nodes]
    assert targets.count(torch.ops.fused_lstm.forward.default) == ours.steps
    x = torch.randn(5, 3)
    for got, expected in zip(program.module()(x), theirs(x)):
        assert max_error(got, expected) < 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_torchscript_compiles_the_cell_itself(bias):
    ours, theirs = decoders(bias=bias, **F64)
    scripted = torch.jit.script(ours)
    assert isinstance(scripted.cell, torch.jit.ScriptModule)
    assert list(scripted.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 3, **F64)
    hx = (torch.randn(2, 5, **F64), torch.randn(2, 5, **F64))
    for state in (None, hx):
        for got, expected in zip(outputs_and_grads(scripted, x, state),
                                 outputs_and_grads(theirs, x, state)):
            assert max_error(got, expected) < 1e-12
    cell = torch.jit.script(FusedLSTMCell.from_lstm_cell(theirs.cell))
    for got, expected in zip(cell(x[0]), theirs.cell(x[0])):  # unbatched
        assert got.shape == expected.shape and max_error(got, expected) < 1e-12
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(x)[0], scripted(x)[0])


def test_torchscript_errors():
    cell = torch.jit.script(FusedLSTMCell(3, 5, **F64))
    with pytest.raises(torch.jit.Error, match="input has inconsistent input_size"):
        cell(torch.randn(2, 4, **F64))
    with pytest.raises(torch.jit.Error, match="Expected input to be 1D or 2D"):
        cell(torch.randn(1, 2, 3, **F64))
    with pytest.raises(torch.jit.Error, match="doesn't match hidden1 batch size"):
        cell(torch.randn(2, 3, **F64), (torch.zeros(2, 5, **F64), torch.zeros(3, 5, **F64)))
    with pytest.raises(RuntimeError, match="dtype"):  # the op's own check
        cell(torch.randn(2, 3))


@needs_onnx
@pytest.mark.parametrize("exporter", [{}, dict(dynamo=False)], ids=["torch.export", "torchscript"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, exporter):
    """Each step exports as one ONNX LSTM node (the layer's translation, fused_lstm._onnx)."""
    model = Decoder(steps=3).eval()
    path = tmp_path / "decoder.onnx"
    state = (torch.randn(2, 5), torch.randn(2, 5))
    torch.onnx.export(model, (torch.randn(2, 3), state), path, **exporter)
    assert lstm_nodes(path) == model.steps
    x, state = torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5))
    with torch.no_grad():
        expected = model(x, state)
    for got, theirs in zip(run_onnx(path, [x, *state]), expected):
        assert got.shape == theirs.shape
        assert max_error(torch.from_numpy(got), theirs) <= 1e-5


# --- autocast, devices, life cycle ------------------------------------------------------------

def test_cpu_autocast_bfloat16():
    """In autocast's dtype (as FusedLSTM, and nn.LSTMCell on CUDA), float32 gradients; as
    accurate as nn.LSTMCell run in bfloat16 on the same bfloat16-rounded values."""
    cell = FusedLSTMCell(8, 6)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = cell(x)
        h, c = cell(x, (h, c))
    assert h.dtype == c.dtype == torch.bfloat16
    theirs = nn.LSTMCell(8, 6)
    theirs.load_state_dict({k: v.bfloat16().float() for k, v in cell.state_dict().items()})
    exact = copy.deepcopy(theirs).double()
    xd = x.detach().bfloat16()
    low = theirs.bfloat16()
    assert_as_accurate_as((h, c), low(xd, low(xd)), exact(xd.double(), exact(xd.double())))
    (h.float().sum() + c.float().sum()).backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in cell.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cell.double()(x.detach().double())[0].dtype == torch.float64


def test_meta_device_construction_forward_and_materialisation():
    theirs = nn.LSTMCell(3, 5, device="meta")
    ours = FusedLSTMCell(3, 5, device="meta")
    with torch.device("meta"):
        in_context = FusedLSTMCell(3, 5)
    assert all(p.is_meta for p in [*ours.parameters(), *in_context.parameters()])
    x = torch.randn(4, 3, device="meta", requires_grad=True)
    h, c = ours(x)
    assert h.is_meta and h.shape == c.shape == theirs(x)[0].shape
    (h.sum() + c.sum()).backward()
    assert x.grad.shape == x.shape and ours.weight_hh.grad.shape == ours.weight_hh.shape
    for module in (ours, theirs):
        torch.manual_seed(11)
        module.to_empty(device="cpu")
        module.reset_parameters()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert a.device.type == "cpu" and torch.equal(a, b)


def test_deepcopy_pickle_and_whole_model_load_with_weights_only(tmp_path):
    model = Decoder()
    x = torch.randn(2, 3)
    expected = model(x)
    twin, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    path = tmp_path / "decoder.pt"
    torch.save(model, path)
    # What a script trusts for nn.LSTMCell; FusedLSTMCell registers itself on import.
    with torch.serialization.safe_globals([Decoder, nn.Linear]):
        loaded = torch.load(path)
    for copied in (twin, unpickled, loaded):
        assert type(copied.cell) is FusedLSTMCell
        assert all(torch.equal(a, b) for a, b in zip(copied(x), expected))
    twin.cell.weight_hh.data.zero_()
    assert not torch.equal(twin(x)[0], expected[0]) and torch.equal(model(x)[0], expected[0])


def _ddp_worker(rank, directory, state_dict, x):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank,
                            world_size=2)
    try:
        model = Decoder(**F64)
        model.load_state_dict(state_dict)
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(x.chunk(2)[rank])[0].pow(2).mean().backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], f"{directory}/grads.pt")
        dist.barrier()  # as in test_ecosystem: neither rank closes while the other reads
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_averages_the_gradients(tmp_path):
    model = Decoder(**F64)
    x = torch.randn(4, 3, **F64)
    single = [torch.autograd.grad(model(shard)[0].pow(2).mean(), list(model.parameters()))
              for shard in x.chunk(2)]
    mp.spawn(_ddp_worker, args=(str(tmp_path), model.state_dict(), x), nprocs=2, join=True)
    for ddp_grad, a, b in zip(torch.load(tmp_path / "grads.pt"), *single):
        assert max_error(ddp_grad, (a + b) / 2) < 1e-12


# --- the benchmark ----------------------------------------------------------------------------

def load_benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cell.py"
    spec = importlib.util.spec_from_file_location("benchmark_cell", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_and_stops_on_a_wrong_cell(monkeypatch, capsys):
    bench = load_benchmark()
    threads = torch.get_num_threads()
    tiny = ["--batch", "2", "--hidden", "4", "--steps", "3", "--quick", "--threads", "1"]
    try:
        rows = bench.main(tiny)
        table = capsys.readouterr().out
        assert "torch capability" in table and "threads" in table
        assert "| 2 | 4 | inference |" in table and "| 2 | 4 | training step |" in table
        assert all(row["fused_ms"] > 0 and row["fused_max_error"] < 1e-5 for row in rows)
        forward = FusedLSTMCell.forward
        monkeypatch.setattr(FusedLSTMCell, "forward",
                            lambda self, x, hx=None: tuple(t * 1.001 for t in forward(self, x, hx)))
        with pytest.raises(SystemExit, match="FusedLSTMCell is wrong"):
            bench.main(tiny + ["--mode", "fwd"])
    finally:
        torch.set_num_threads(threads)
