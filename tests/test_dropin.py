"""What a training script written for nn.LSTM does around the module, with FusedLSTM
swapped in: whole-model save and load, ONNX export to onnxruntime, double backward,
torch.func, the meta device."""
import copy
import importlib.util
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from fused_lstm import FusedLSTM, ReferenceLSTM
from conftest import max_error

F64 = dict(dtype=torch.float64)


class Tagger(nn.Module):
    """A user's model: an LSTM and a linear head."""

    def __init__(self, lstm_class=FusedLSTM, **kwargs):
        super().__init__()
        self.lstm = lstm_class(3, 6, **kwargs)
        d = 2 if self.lstm.bidirectional else 1
        self.head = nn.Linear(d * (self.lstm.proj_size or 6), 2)

    def forward(self, x, hx=None):
        output, (h_n, c_n) = self.lstm(x, hx)
        return self.head(output), h_n, c_n


def initial_state(lstm, batch, dtype=torch.float32):
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    return (torch.randn(layers, batch, lstm.proj_size or lstm.hidden_size, dtype=dtype),
            torch.randn(layers, batch, lstm.hidden_size, dtype=dtype))


# --- whole-model save and load ------------------------------------------------------

def test_whole_model_loads_with_weights_only_trusting_only_the_users_classes(tmp_path):
    model = Tagger(num_layers=2, bidirectional=True)
    model.reference = ReferenceLSTM(3, 4)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    # What a script trusts for nn.LSTM; FusedLSTM registers itself on import.
    with torch.serialization.safe_globals([Tagger, nn.Linear, nn.LSTM]):
        loaded = torch.load(path)
    assert type(loaded.lstm) is FusedLSTM and type(loaded.reference) is ReferenceLSTM
    x = torch.randn(5, 4, 3)
    expected = model(x)
    loaded.lstm.flatten_parameters()
    for a, b in zip(loaded(x), expected):
        assert torch.equal(a, b)
    assert loaded.reference(x)[0].equal(model.reference(x)[0])
    # A script that does list our class: leaving its context must not untrust it.
    with torch.serialization.safe_globals([Tagger, nn.Linear, FusedLSTM, ReferenceLSTM]):
        torch.load(path)
    with torch.serialization.safe_globals([Tagger, nn.Linear]):
        assert torch.equal(torch.load(path)(x)[0], expected[0])


def test_flatten_parameters_after_loading_then_training_matches_nn_lstm(tmp_path):
    """A script written for cuDNN calls flatten_parameters() after loading a model and
    before each forward, and trains: FusedLSTM ends with the parameters and outputs that
    nn.LSTM ends with."""
    lstm = nn.LSTM(3, 5, num_layers=2, **F64)
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(4, 2, 3, **F64)
    trained = []
    for model in (lstm, fused):
        torch.save(model, tmp_path / "model.pt")
        with torch.serialization.safe_globals([nn.LSTM]):
            loaded = torch.load(tmp_path / "model.pt")
        loaded.flatten_parameters()
        optimizer = torch.optim.SGD(loaded.parameters(), lr=0.5)
        for _ in range(2):
            loaded.flatten_parameters()
            optimizer.zero_grad()
            loaded(x)[0].pow(2).sum().backward()
            optimizer.step()
        trained.append(loaded)
    theirs, ours = trained
    assert not torch.equal(theirs.weight_hh_l1, lstm.weight_hh_l1)  # the steps moved it
    for (n1, p1), (n2, p2) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and max_error(p1, p2) < 1e-12
    assert max_error(ours(x)[0], theirs(x)[0]) < 1e-12


def test_state_dict_save_load_and_deepcopy(tmp_path):
    lstm = FusedLSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    x = torch.randn(4, 2, 3)
    torch.save(lstm.state_dict(), tmp_path / "sd.pt")
    fresh = FusedLSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    twin = copy.deepcopy(lstm)
    expected = lstm(x)[0]
    assert torch.equal(fresh(x)[0], expected) and torch.equal(twin(x)[0], expected)
    twin.weight_hh_l0.data.zero_()
    assert not torch.equal(twin(x)[0], expected) and torch.equal(lstm(x)[0], expected)


# --- ONNX ------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the onnx extra (onnx, onnxscript, onnxruntime)",
)


def run_onnx(path, inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def lstm_nodes(path):
    import onnx

    return sum(node.op_type == "LSTM" for node in onnx.load(str(path)).graph.node)


@needs_onnx
@pytest.mark.parametrize("kwargs,with_state,exporter", [
    (dict(num_layers=2, bidirectional=True), True, {}),
    (dict(batch_first=True, bias=False), False, {}),
    (dict(proj_size=2, bidirectional=True), False, {}),
    (dict(num_layers=2, bidirectional=True), True, dict(dynamo=False)),
    (dict(batch_first=True, bias=False), False, dict(dynamo=False)),
], ids=str)
def test_onnx_export_runs_in_onnxruntime(tmp_path, kwargs, with_state, exporter):
    """The default exporter (torch.export) and the TorchScript one; without a state, the
    file is exported with a dynamic batch (and length, but for proj_size) and run at other
    sizes."""
    model = Tagger(**kwargs).eval()
    lstm = model.lstm
    time_dim, batch_dim = (1, 0) if lstm.batch_first else (0, 1)

    def example(steps, batch):
        x = torch.randn(*((batch, steps) if lstm.batch_first else (steps, batch)), 3)
        return (x, initial_state(lstm, batch)) if with_state else (x,)
    args = example(4, 2)
    dynamic = {}
    if not with_state:
        axes = {batch_dim: "batch"} if lstm.proj_size else {time_dim: "steps", batch_dim: "batch"}
        dynamic = dict(dynamic_shapes=(axes,)) if exporter == {} else \
            dict(input_names=["x"], dynamic_axes={"x": axes})
        args = example(4 if lstm.proj_size else 6, 3)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, example(4, 2), path, **exporter, **dynamic)
    if lstm.proj_size == 0:  # ONNX's LSTM has no projection: those run as basic operators
        assert lstm_nodes(path) == lstm.num_layers * (2 if lstm.bidirectional else 1)
    flat = [args[0], *args[1]] if with_state else [args[0]]
    with torch.no_grad():
        expected = model(*args)
    for ours, theirs in zip(run_onnx(path, flat), expected):
        assert ours.shape == theirs.shape
        assert max_error(torch.from_numpy(ours), theirs) <= 1e-5


# --- double backward -----------------------------------------------------------------

@pytest.mark.parametrize("layers,bidirectional,proj,packed", [
    (1, False, 0, False), (2, True, 0, False), (1, True, 2, False), (2, False, 2, True),
    (1, True, 0, True),
])
def test_gradgradcheck(layers, bidirectional, proj, packed):
    lstm = FusedLSTM(2, 3, num_layers=layers, bidirectional=bidirectional, proj_size=proj, **F64)
    h0, c0 = (t.requires_grad_() for t in initial_state(lstm, 3, torch.float64))
    if packed:
        lengths = [4, 2, 1]
        data = torch.randn(sum(lengths), 2, **F64, requires_grad=True)
        batch_sizes = pack_sequence([torch.empty(n) for n in lengths]).batch_sizes

        def run(data, h0, c0, *params):
            out, (h, c) = functional_call(lstm, dict(zip(names, params)),
                                          (PackedSequence(data, batch_sizes), (h0, c0)))
            return out.data, h, c
        x = data
    else:
        x = torch.randn(4, 3, 2, **F64, requires_grad=True)

        def run(x, h0, c0, *params):
            out, (h, c) = functional_call(lstm, dict(zip(names, params)), (x, (h0, c0)))
            return out, h, c
    names = [n for n, _ in lstm.named_parameters()]
    inputs = (x, h0, c0, *lstm.parameters())
    assert torch.autograd.gradgradcheck(run, inputs, fast_mode=True)


def pair(**kwargs):
    lstm = nn.LSTM(3, 4, **F64, **kwargs)
    fused = FusedLSTM(3, 4, **F64, **kwargs)
    fused.load_state_dict(lstm.state_dict())
    return lstm, fused


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True), dict(proj_size=2)],
                         ids=str)
def test_gradient_penalty_matches_nn_lstm(kwargs):
    """The gradient of a gradient norm (WGAN-GP, input-gradient regularisers): a second
    derivative through the whole network, to the input and to every weight."""
    results = []
    x = torch.randn(5, 2, 3, **F64)
    for module in pair(**kwargs):
        xg = x.clone().requires_grad_()
        out = module(xg)[0]
        (grad_x,) = torch.autograd.grad(out.tanh().sum(), xg, create_graph=True)
        penalty = (grad_x.norm(dim=-1) - 1).pow(2).sum()
        results.append(torch.autograd.grad(penalty, [xg, *module.parameters()]))
    for ours, theirs in zip(*results):
        assert ours.abs().sum() > 0
        assert max_error(ours, theirs) < 1e-10


def test_second_derivative_is_the_hessian():
    lstm, fused = pair(bidirectional=True)
    x = torch.randn(3, 1, 3, **F64)
    ours = jacrev(jacrev(lambda x: fused(x)[0].pow(2).sum()))(x)
    theirs = torch.autograd.functional.hessian(lambda x: lstm(x)[0].pow(2).sum(), x)
    assert theirs.abs().max() > 1e-3
    assert max_error(ours, theirs) < 1e-10


# --- torch.func ----------------------------------------------------------------------

def test_functional_call_uses_the_substituted_parameters():
    fused = FusedLSTM(3, 4, num_layers=2, **F64)
    other = FusedLSTM(3, 4, num_layers=2, **F64)
    x = torch.randn(5, 2, 3, **F64)
    out = functional_call(fused, dict(other.named_parameters()), (x,))
    assert torch.equal(out[0], other(x)[0]) and not torch.equal(out[0], fused(x)[0])


def ensemble_loss(base):
    def loss(params, x):
        out, (h_n, c_n) = functional_call(base, params, (x,))
        return out.sin().sum() + h_n.pow(2).sum() + c_n.sum()
    return loss


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True), dict(proj_size=2)],
                         ids=str)
def test_vmap_over_an_ensemble_matches_a_loop(kwargs):
    members = [FusedLSTM(3, 4, **F64, **kwargs) for _ in range(3)]
    params, _ = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, 2, 3, **F64)
    outputs = vmap(lambda p, x: functional_call(base, p, (x,))[0], in_dims=(0, None))(params, x)
    grads = vmap(grad(ensemble_loss(base)), in_dims=(0, None))(params, x)
    for k, member in enumerate(members):
        assert max_error(outputs[k], member(x)[0]) < 1e-12
        expected = torch.autograd.grad(ensemble_loss(member)(dict(member.named_parameters()), x),
                                       list(member.parameters()))
        for (name, _), g in zip(member.named_parameters(), expected):
            assert max_error(grads[name][k], g) < 1e-12  # per member, never summed


def test_func_grad_matches_autograd():
    fused = FusedLSTM(3, 4, num_layers=2, bidirectional=True, **F64)
    x = torch.randn(5, 2, 3, **F64)
    loss = ensemble_loss(fused)
    ours = grad(loss, argnums=(0, 1))(dict(fused.named_parameters()), x)
    xg = x.clone().requires_grad_()
    theirs = torch.autograd.grad(loss(dict(fused.named_parameters()), xg),
                                 [*fused.parameters(), xg])
    assert max_error(ours[1], theirs[-1]) < 1e-12
    for g, t in zip(ours[0].values(), theirs):
        assert max_error(g, t) < 1e-12


@pytest.mark.parametrize("packed", [False, True])
def test_per_sample_gradients_match_a_loop(packed):
    fused = FusedLSTM(3, 4, bidirectional=True, **F64)
    params = {k: v.detach() for k, v in fused.named_parameters()}
    if packed:  # samples of the same lengths, shared batch_sizes
        batch_sizes = pack_sequence([torch.empty(n) for n in (4, 3, 1)]).batch_sizes
        samples = torch.randn(5, int(batch_sizes.sum()), 3, **F64)
        wrap = lambda data: PackedSequence(data, batch_sizes)  # noqa: E731
    else:
        samples = torch.randn(5, 6, 1, 3, **F64)
        wrap = lambda x: x  # noqa: E731

    def loss(params, sample):
        out, (h_n, _) = functional_call(fused, params, (wrap(sample),))
        data = out.data if packed else out
        return data.pow(2).sum() + h_n.sum()
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, samples)
    for k in range(len(samples)):
        expected = torch.autograd.grad(loss(dict(fused.named_parameters()), samples[k]),
                                       list(fused.parameters()))
        for name, g in zip(params, expected):
            assert max_error(per_sample[name][k], g) < 1e-12


def test_vmap_with_shared_weights_runs_one_fused_call():
    """With only activations batched, the members ride in the batch of one kernel call
    instead of a call per member (the per-example fallback)."""
    fused = FusedLSTM(3, 4)
    xs = torch.randn(6, 5, 2, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = vmap(lambda x: fused(x)[0])(xs)
    calls = sum(e.count for e in prof.key_averages() if e.key == "fused_lstm::forward")
    assert 1 <= calls < len(xs)
    assert max_error(out, torch.stack([fused(x)[0] for x in xs])) < 1e-6


# --- module life cycle ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(num_layers=2, bidirectional=True, proj_size=2,
                                         batch_first=True), dict()], ids=str)
def test_meta_device_construction_forward_and_materialisation(kwargs):
    lstm_meta = nn.LSTM(3, 5, device="meta", **kwargs)
    fused = FusedLSTM(3, 5, device="meta", **kwargs)
    with torch.device("meta"):
        fused_ctx = FusedLSTM(3, 5, **kwargs)
    assert all(p.is_meta for p in itertools.chain(fused.parameters(), fused_ctx.parameters()))
    x = torch.randn(4, 7, 3, device="meta", requires_grad=True)
    out, (h_n, c_n) = fused(x)
    expected_out, (expected_h, expected_c) = lstm_meta(x)
    assert out.is_meta and out.shape == expected_out.shape
    assert h_n.shape == expected_h.shape and c_n.shape == expected_c.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and fused.weight_hh_l0.grad.shape == fused.weight_hh_l0.shape
    packed = pack_sequence([torch.randn(n, 3) for n in (5, 3, 2)]).to("meta")
    out, (h_n, _) = fused_ctx(packed)
    expected_out, (expected_h, _) = nn.LSTM(3, 5, device="meta", **kwargs)(packed)
    assert out.data.shape == expected_out.data.shape and h_n.shape == expected_h.shape
    for module in (fused, lstm_meta):
        torch.manual_seed(11)
        module.to_empty(device="cpu")
        module.reset_parameters()
    for a, b in zip(fused.parameters(), lstm_meta.parameters()):
        assert a.device.type == "cpu" and torch.equal(a, b)
