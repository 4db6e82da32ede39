"""FusedLSTM: torch.nn.LSTM's interface and behaviour on the fused kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _C, _memory, functional


class FusedLSTM(nn.Module):
    r"""A drop-in replacement for :class:`torch.nn.LSTM`.

    Same constructor, parameter names, shapes, registration order and initialisation (the
    same seed gives the same weights), so one ``state_dict`` loads into either class; the
    same forward: a ``[T, B, I]`` / ``[B, T, I]`` (``batch_first``) tensor, an unbatched
    ``[T, I]`` tensor or a :class:`~torch.nn.utils.rnn.PackedSequence`, and an optional
    ``(h_0, c_0)``; returns ``output, (h_n, c_n)``. Bad input raises where nn.LSTM raises,
    with the same exception type.

    It subclasses :class:`torch.nn.Module`, not ``nn.LSTM``, so that ``torch.compile``
    traces it (dynamo refuses to wrap nn.LSTM and its subclasses). Each layer and
    direction runs one fused op, ``torch.ops.fused_lstm.forward``.
    """

    __constants__ = nn.RNNBase.__constants__ + ["_reference"]
    __jit_unused_properties__ = ["all_weights", "_flat_weights"]

    # Whether each layer runs the reference loop (eager only) in place of the fused op.
    _reference = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        # nn.LSTM's checks, warning, attributes and parameter layout, from one on the meta
        # device, which allocates nothing: the parameters' size is checked first.
        lstm = nn.LSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                       bidirectional, proj_size, device="meta", dtype=dtype)
        for name in nn.RNNBase.__constants__ + ["_flat_weights_names", "_all_weights"]:
            setattr(self, name, getattr(lstm, name))
        where = torch.device(device) if device is not None else torch.get_default_device()
        _memory.check_fits(sum(p.nbytes for p in lstm.parameters()), where, "the parameters")
        for name, p in lstm.named_parameters():
            setattr(self, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device)))
        self.reset_parameters()

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> FusedLSTM:
        """A copy of ``lstm``: its configuration, device, dtype, parameters and training mode."""
        return convert(cls, lstm)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles forward (tensor input) on the parameters as one list."""
        self._script_weights = self._flat_weights
        return self

    def flatten_parameters(self) -> None:
        """A no-op, as nn.LSTM's is off cuDNN: the kernels need no flat weight buffer."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return _parameters_by_name(self, self._flat_weights_names)  # read twice a forward

    # nn.LSTM's own (its names, signatures and messages; code written for nn.LSTM may
    # call them), compiled by TorchScript as ours.
    all_weights = nn.RNNBase.all_weights
    reset_parameters = nn.RNNBase.reset_parameters
    extra_repr = nn.RNNBase.extra_repr
    check_input = nn.RNNBase.check_input
    check_hidden_size = nn.RNNBase.check_hidden_size
    get_expected_hidden_size = nn.LSTM.get_expected_hidden_size
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """nn.LSTM's forward, checks in its order. One path for eager mode and TorchScript;
        PackedSequence input, autocast and the memory check are eager only."""
        if not torch.jit.is_scripting():
            if _native_call_allowed() and not (self._reference or (
                    self.training and self.dropout > 0 and self.num_layers > 1)):
                result = _C.lstm_forward(
                    input, hx, self._parameters, self._flat_weights_names, self.num_layers,
                    self.bidirectional, self.batch_first, self.input_size, self.hidden_size,
                    self.proj_size)
                if result is not None:
                    return result
            if isinstance(input, PackedSequence):
                data, batch_sizes, sorted_indices, unsorted_indices = input
                _check_batch_sizes(batch_sizes, data)
                _check_two_states(hx)
                output, hidden = self._run(data, hx, batch_sizes, sorted_indices, unsorted_indices)
                return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), hidden
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            expected = 3 if batched else 2
            if hx[0].dim() != expected or hx[1].dim() != expected:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {expected}-D but "
                                   f"got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not torch.jit.is_scripting():
                _check_two_states(hx)
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        output, (h_n, c_n) = self._run(input, hx, None, None, None)
        if not batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _run(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]], batch_sizes: Optional[Tensor],
        sorted_indices: Optional[Tensor], unsorted_indices: Optional[Tensor],
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """The checks and the layers on the batched tensor or (with batch_sizes) the packed
        data; the output in the same layout."""
        if hx is None:
            h0 = input.new_zeros(self.get_expected_hidden_size(input, batch_sizes))
            c0 = input.new_zeros(self.get_expected_cell_size(input, batch_sizes))
        else:
            h0, c0 = hx[0], hx[1]
        self.check_forward_args(input, (h0, c0), batch_sizes)
        if torch.jit.is_scripting():
            _check_devices_and_dtypes(input, self.weight_ih_l0, h0, c0, False)
            weights = self._script_weights
        else:
            _check_devices_and_dtypes(input, self.weight_ih_l0, h0, c0,
                                      torch._C._is_any_autocast_enabled())
            _memory.check_forward(input, batch_sizes, self.batch_first, h0, self.hidden_size)
            input, h0, c0, *weights = _in_autocast_dtype((input, h0, c0, *self._flat_weights))
        h0, c0 = self.permute_hidden((h0, c0), sorted_indices)
        output, h_n, c_n = functional.lstm(
            input, h0, c0, weights, self.num_layers, self.bidirectional, self.dropout,
            self.training, batch_sizes, self.batch_first, self._reference,
        )
        return output, self.permute_hidden((h_n, c_n), unsorted_indices)


def convert(cls, lstm: nn.Module):
    """A ``cls`` (FusedLSTM, nn.LSTM) with the configuration, device, dtype, parameters and
    training mode of ``lstm`` (either class; copied, not shared)."""
    weight = lstm.weight_ih_l0
    converted = cls(
        lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
        lstm.dropout, lstm.bidirectional, lstm.proj_size, device=weight.device, dtype=weight.dtype,
    )
    converted.load_state_dict(lstm.state_dict())
    return converted.train(lstm.training)


def _check_devices_and_dtypes(input: Tensor, weight: Tensor, h0: Tensor, c0: Tensor,
                              autocast: bool) -> None:
    """The checks nn.LSTM's kernel makes after check_forward_args (its messages for the
    devices)."""
    if input.device != weight.device:
        raise RuntimeError("Input and parameter tensors are not at the same device, found input "
                           f"tensor at {input.device} and parameter tensor at {weight.device}")
    for k, state in enumerate((h0, c0)):
        if state.device != input.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found input "
                               f"tensor at {input.device} and hidden tensor at {state.device}")
        if state.dtype != input.dtype and not autocast:
            raise RuntimeError(
                f"Expected hidden[{k}] dtype {input.dtype} (the input's), got {state.dtype}")


def _check_batch_sizes(batch_sizes: Tensor, data: Tensor) -> None:
    """A hand-built PackedSequence's batch_sizes, with the exception types nn.LSTM raises
    for each fault (pack_sequence never makes these). nn.LSTM runs two malformed cases
    without an error, where it ignores data rows past sum(batch_sizes) or runs steps of no
    rows (zero entries): those are refused too, as RuntimeError."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    if batch_sizes.device.type != "cpu":
        raise RuntimeError(f"batch_sizes must be on the CPU, got it on {batch_sizes.device}")
    if batch_sizes.dim() != 1 or batch_sizes.is_floating_point():
        raise TypeError(f"batch_sizes must be a 1-D tensor of int64, got {batch_sizes.dtype} "
                        f"of shape {list(batch_sizes.shape)}")
    if batch_sizes.dtype != torch.int64:
        raise RuntimeError(f"batch_sizes must be int64, got {batch_sizes.dtype}")
    sizes = batch_sizes.tolist()
    for t in range(1, len(sizes)):
        if sizes[t] > sizes[t - 1]:
            raise RuntimeError(f"batch_sizes must be non-increasing, got {sizes[t]} at step {t} "
                               f"after {sizes[t - 1]}")
    if sizes and sizes[-1] <= 0:
        raise RuntimeError(
            f"batch_sizes must be positive, got {sizes[-1]} at step {len(sizes) - 1}")
    if data.dim() >= 1 and sum(sizes) != data.size(0):
        raise RuntimeError(f"the packed data has {data.size(0)} rows, batch_sizes sum to "
                           f"{sum(sizes)}")


def _check_two_states(hx) -> None:
    if hx is not None and (isinstance(hx, Tensor) or len(hx) != 2):
        raise RuntimeError("lstm expects two hidden states")


def _native_call_allowed() -> bool:
    """Whether a module's forward may try its one native call (csrc/module_calls.cpp),
    which takes only eager calls that nothing differentiates and that run no Python
    dispatch: not under torch.compile or export, autocast, torch.func transforms or
    forward-mode AD (it checks the rest itself: tracing, modes, tensor subclasses, autograd)."""
    return not (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()
                or torch._C._are_functorch_transforms_active()
                or torch.autograd.forward_ad._current_level >= 0)


def _parameters_by_name(module: nn.Module, names) -> list:
    """The module's parameters (or None) called `names`, read from _parameters:
    nn.Module.__getattr__ costs 0.5 us a parameter, a tenth of a small step. A parametrized
    weight is not there: its attribute computes it."""
    params = module._parameters
    return [params[n] if n in params else getattr(module, n) for n in names]


def _in_autocast_dtype(tensors: tuple) -> tuple:
    """``tensors`` (the input first, None kept) as autocast runs them, as nn.LSTM does on
    cuDNN: under autocast for the input's device, floating-point ones but float64 in its
    dtype (autocast's own rule); else unchanged."""
    device = tensors[0].device.type
    if not (torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


class ReferenceLSTM(FusedLSTM):
    """FusedLSTM's interface on the Python time-step loop (fused_lstm.reference): the
    slow baseline of the benchmark and the examples, with everything else equal."""

    _reference = True

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError("ReferenceLSTM runs the Python reference loop and cannot be "
                           "scripted; script a FusedLSTM")


# A whole saved model (torch.save(model)) loads with torch.load's default weights_only=True
# when the user trusts only their own classes, as with nn.LSTM inside. Registered under
# their qualified names: those entries stay when a user's safe_globals([FusedLSTM, ...])
# context removes the plain class on exit.
torch.serialization.add_safe_globals(
    [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in (FusedLSTM, ReferenceLSTM)]
)
