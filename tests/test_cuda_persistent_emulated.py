"""The persistent CUDA kernel (csrc/cuda/persistent_program.cuh) run on the CPU: every thread
of the cooperative grid a fiber of its own, meeting the others only at the kernel's block
and grid barriers (tests/emulator), tensor-core tiles computed from the lanes' registers,
on emulated devices of several sizes, against the CPU op. Catches indexing, tiling,
masking, staging and step-order bugs of the persistent kernel and a missing barrier, and
checks its geometry (the plan), without a GPU."""
import pytest
import torch

import emulator
import fused_lstm  # noqa: F401  (registers the ops)
from conftest import assert_as_accurate_as, max_error
from test_op import make_args, nn_lstm_layer, random_batch_sizes

emulated = emulator.load()
persistent_forward = emulated.persistent_forward
persistent_backward = emulated.persistent_backward
persistent_plan = emulated.persistent_plan
stepwise_forward = emulated.forward
stepwise_backward = emulated.backward
forward = torch.ops.fused_lstm.forward
backward = torch.ops.fused_lstm.backward

# (SMs, shared memory per block): an H100's (132 SMs, 227 KiB), few SMs (many units and
# weight tiles per block), and little shared memory (the depth staged in several chunks).
DEVICES = {"h100": (132, 232448), "three_sms": (3, 232448), "small_shared": (5, 16384)}
# T, B, I, H: partial unit blocks (33, 70), one row, more rows than a chunk (70, 120), I = 0.
SHAPES = [(4, 3, 5, 33), (3, 70, 4, 40), (5, 1, 3, 8), (1, 1, 1, 1), (6, 2, 0, 3), (3, 37, 2, 70),
          (2, 120, 3, 24)]
# Against the CPU op, relative to the largest value. float32 and float64 multiply with FMAs
# in their own precision, as the CPU op does. bfloat16 and float16 multiply on tensor
# cores, with the recurrent operand (h, or the gates' gradient) rounded to the input's
# dtype where the CPU op keeps it in float32: their outputs and gradients (in the input's
# dtype) are held to the accuracy rule against a float64 run instead (at most twice the
# CPU op's error); the bounds here are for the gates and cells they keep in float32, in
# which the CPU op has only float32's rounding, the kernel that of the recurrent operand.
BOUND = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
TENSOR_CORES = (torch.bfloat16, torch.float16)
PLAN_FIELDS = ("units", "unit_blocks", "row_groups", "group_rows", "m_tiles", "n_tiles",
               "splits", "depth", "chunk_depth", "shared_bytes")


def plan(H, B, dtype, backward, device):
    fields = persistent_plan(H, B, dtype, backward, *DEVICES[device])
    return dict(zip(PLAN_FIELDS, fields)) if fields else None


# Every (shape, device, dtype) where both directions fit.
CASES = [(shape, device, dtype) for shape in SHAPES for device in DEVICES for dtype in BOUND
         if all(plan(shape[3], shape[1], dtype, backward_pass, device)
                for backward_pass in (False, True))]


def assert_close(a, b, bound):
    """Within `bound` relative to the largest value, plus one rounding of a's own dtype (a
    result rounded to bfloat16/float16 from nearly equal float32 values may land one step
    apart)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert max_error(a, b) <= (bound + torch.finfo(a.dtype).eps) * scale


def run_both(args, batch_sizes, reverse, device, grads=None):
    """The emulated persistent kernel and the CPU op: forward, and backward for `grads`
    (random cotangents by default) on the CPU op's saved tensors."""
    ours = persistent_forward(*args, batch_sizes, reverse, *DEVICES[device])
    theirs = forward(*args, batch_sizes, reverse)
    out, h_n, c_n, gates, cells = theirs
    if grads is None:
        grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    saved = (*args[:5], args[6], batch_sizes, reverse, out, gates, cells)
    return (ours, theirs, persistent_backward(*grads, *saved, *DEVICES[device]),
            backward(*grads, *saved))


def nn_lstm_run(args, batch_sizes, reverse, grads):
    """nn.LSTM at the args' dtype: out, h_n, c_n and the gradients of the present args.
    nn.LSTM refuses input_size 0: there it runs on one zero input column with zero weights
    for it, the same layer."""
    leaves = [a.detach().requires_grad_() for a in args if a is not None]
    it = iter(leaves)
    layer_args = [None if a is None else next(it) for a in args]
    if args[0].shape[2] == 0:
        layer_args[0] = torch.nn.functional.pad(layer_args[0], (0, 1))
        layer_args[3] = torch.nn.functional.pad(layer_args[3], (0, 1))
    outputs = nn_lstm_layer(layer_args, batch_sizes, reverse)
    return [t.detach() for t in outputs] + list(torch.autograd.grad(outputs, leaves, grads))


def run_exact(args, batch_sizes, reverse, grads):
    """The CPU op in float64 on the same (rounded) inputs and cotangents: forward, backward."""
    args = [a if a is None else a.double() for a in args]
    out = forward(*args, batch_sizes, reverse)
    saved = (*args[:5], args[6], batch_sizes, reverse, out[0], out[3], out[4])
    return out, backward(*(g.double() for g in grads), *saved)


@pytest.mark.parametrize("packed,reverse", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("shape,device,dtype", CASES, ids=str)
def test_forward_and_backward_match_cpu_op(shape, device, dtype, reverse, packed):
    T, B, I, H = shape
    args = make_args(T, B, I, H, dtype=dtype, bias=H != 8, scale=0.5)
    batch_sizes = random_batch_sizes(T, B) if packed else None
    grads = (torch.randn(T, B, H, dtype=dtype), torch.randn(B, H, dtype=dtype),
             torch.randn(B, H, dtype=dtype))
    ours, theirs, ours_grads, their_grads = run_both(args, batch_sizes, reverse, device, grads)
    if dtype in TENSOR_CORES:
        # The rule is against nn.LSTM's own error at the dtype, not the CPU op's (which keeps
        # the recurrence in float32 where the tensor cores take the dtype's operands).
        exact, exact_grads = run_exact(args, batch_sizes, reverse, grads)
        differentiated = len([a for a in args if a is not None])  # no grad of an absent bias
        nn_lstm = nn_lstm_run(args, batch_sizes, reverse, grads)
        assert_as_accurate_as([*ours[:3], *ours_grads[:differentiated]], nn_lstm,
                              [*exact[:3], *exact_grads[:differentiated]])
        for a, b in zip(ours[3:], theirs[3:]):
            assert_close(a, b, BOUND[dtype])
    else:
        for a, b in zip([*ours, *ours_grads], [*theirs, *their_grads]):
            assert_close(a, b, BOUND[dtype])


def test_cases_cover_the_geometry():
    """The cases above exercise, on FMAs and on tensor cores, forward and backward: several
    units per block, several blocks of units with the last one partial, row groups, more rows
    in a group than in a chunk, several tiles of weight rows and of batch rows, warps
    splitting the depth, and the depth staged in several chunks."""
    features = {
        "several units": lambda p, H: p["units"] > 1,
        "partial unit block": lambda p, H: p["unit_blocks"] > 1 and H % p["units"] != 0,
        "row groups": lambda p, H: p["row_groups"] > 1,
        "chunks of rows": lambda p, H: p["group_rows"] > 16 * p["n_tiles"],
        "weight tiles": lambda p, H: p["m_tiles"] > 1,
        "row tiles": lambda p, H: p["n_tiles"] > 1,
        "split depth": lambda p, H: p["splits"] > 1,
        "chunks of depth": lambda p, H: p["chunk_depth"] < p["depth"],
    }
    for tensor_cores in (False, True):
        for backward_pass in (False, True):
            plans = [(plan(shape[3], shape[1], dtype, backward_pass, device), shape[3])
                     for shape, device, dtype in CASES
                     if (dtype in (torch.bfloat16, torch.float16)) == tensor_cores]
            missing = [name for name, has in features.items()
                       if not any(has(p, H) for p, H in plans)]
            assert not missing, (tensor_cores, backward_pass, missing)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", list(DEVICES))
def test_tensor_core_product_is_exact_for_exact_operands(dtype, device):
    """One step from h0, which the op takes in the input's dtype: the tensor-core operands
    are then exact, and the gates and cells (kept in float32) match the CPU op to float32
    rounding. The backward's only recurrent product, grad_h0 = grad_gates·w_hh, rounds
    grad_gates to the input's dtype: within that rounding (w_ih = I so that grad_input is
    grad_gates)."""
    B, H = 37, 24
    args = make_args(1, B, 4 * H, H, dtype=dtype, scale=0.5)
    args[3] = torch.eye(4 * H, dtype=dtype)
    if not plan(H, B, dtype, False, device) or not plan(H, B, dtype, True, device):
        pytest.skip("does not fit this emulated device")
    ours, theirs, grads, expected = run_both(args, None, False, device)
    for a, b in zip(ours[3:], theirs[3:]):
        assert_close(a, b, 4 * torch.finfo(torch.float32).eps)
    grad_gates = expected[0][0].double()
    unit = torch.finfo(dtype).eps / 2
    rounding = 2 * unit * (grad_gates.abs() @ args[4].double().abs() + expected[1].double().abs())
    assert ((grads[1].double() - expected[1].double()).abs() <= rounding + 1e-6).all()
    for a, b in zip(grads[2:], expected[2:]):
        assert_close(a, b, 4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("which", range(4))
def test_backward_with_some_gradients_undefined(which):
    args = make_args(5, 4, 3, 6)
    batch_sizes = torch.tensor([4, 3, 3, 1, 1])
    out = forward(*args, batch_sizes, True)[0]
    grads = [torch.randn_like(out), torch.randn(4, 6, dtype=out.dtype),
             torch.randn(4, 6, dtype=out.dtype)]
    if which < 3:
        grads[which] = None
    else:
        grads = [None, None, None]
    _, _, ours, theirs = run_both(args, batch_sizes, True, "three_sms", grads)
    for a, b in zip(ours, theirs):
        assert max_error(a, b) < 1e-12


def test_dead_rows_are_zero():
    args = make_args(5, 3, 2, 4)
    batch_sizes = torch.tensor([3, 3, 2, 1, 1])
    for reverse in (False, True):
        out, h_n, c_n, gates, cells = persistent_forward(*args, batch_sizes, reverse,
                                                         *DEVICES["h100"])
        for t, n in enumerate(batch_sizes.tolist()):
            assert out[t, n:].eq(0).all() and gates[t, n:].eq(0).all() and cells[t, n:].eq(0).all()
            assert out[t, :n].ne(0).all()


def test_projection_runs_on_the_step_kernels():
    """With w_hr the persistent path is not taken (as on the GPU): the step kernels' results,
    bit for bit."""
    args = make_args(4, 5, 3, 9, P=4)
    batch_sizes = torch.tensor([5, 4, 2, 2])
    ours = persistent_forward(*args, batch_sizes, True, *DEVICES["h100"])
    theirs = stepwise_forward(*args, batch_sizes, True)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    out, h_n, c_n, gates, cells = theirs
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    saved = (*args[:5], args[6], batch_sizes, True, out, gates, cells)
    ours = persistent_backward(*grads, *saved, *DEVICES["h100"])
    assert all(torch.equal(a, b) for a, b in zip(ours, stepwise_backward(*grads, *saved)))


def test_non_contiguous_inputs_and_empty_batch():
    args = make_args(4, 3, 5, 6)
    strided = [a.t().contiguous().t() if a is not None and a.dim() == 2 else a for a in args]
    strided[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    ours = persistent_forward(*strided, None, False, *DEVICES["h100"])
    for a, b in zip(ours, forward(*args, None, False)):
        assert max_error(a, b) < 1e-12
    out, h_n, _, gates, _ = persistent_forward(*make_args(3, 0, 2, 4), None, False,
                                               *DEVICES["h100"])
    assert out.shape == (3, 0, 4) and h_n.shape == (0, 4) and gates.shape == (3, 0, 16)


def test_a_layer_that_does_not_fit_is_an_error():
    """w_hh of 4·H·H float64 values does not fit in 5 SMs of 16 KiB: the error names the
    sizes and the way out."""
    args = make_args(2, 3, 4, 70)
    message = "does not fit a layer with hidden_size 70 and batch 3.*stepwise"
    with pytest.raises(RuntimeError, match=message):
        persistent_forward(*args, None, False, *DEVICES["small_shared"])


def test_plan_reads_the_device():
    """On an H100's 132 SMs, the seed's layer (H = 256) in bfloat16 takes 4 units per block
    (64 blocks of one weight tile each) and its 32 rows in two row groups; with 264 SMs,
    the same geometry; with 16 SMs, 16 units per block. Every plan fits the shared memory it
    was given, and its grid the SMs."""
    h100 = plan(256, 32, torch.bfloat16, False, "h100")
    assert (h100["units"], h100["unit_blocks"], h100["row_groups"]) == (4, 64, 2)
    assert persistent_plan(256, 32, torch.bfloat16, False, 264, 232448)[:3] == [4, 64, 2]
    assert persistent_plan(256, 32, torch.bfloat16, False, 16, 232448)[:2] == [16, 16]
    for shape, device, dtype in CASES:
        for backward_pass in (False, True):
            p = plan(shape[3], shape[1], dtype, backward_pass, device)
            sms, shared = DEVICES[device]
            assert p["shared_bytes"] <= shared
            assert p["unit_blocks"] * p["row_groups"] <= sms * min(8, shared // p["shared_bytes"])
            assert p["units"] * p["unit_blocks"] >= shape[3] > p["units"] * (p["unit_blocks"] - 1)


def test_bad_device_arguments_are_checked():
    with pytest.raises(RuntimeError, match="at least one SM"):
        persistent_forward(*make_args(2, 2, 2, 2), None, False, 0, 1024)
