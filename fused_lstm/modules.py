"""FusedLSTM: torch.nn.LSTM's interface and behaviour on the fused kernels."""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from . import _memory, functional


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

    __constants__ = [
        "mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
        "dropout", "bidirectional", "proj_size", "_reference",
    ]
    __jit_unused_properties__ = ["all_weights", "_flat_weights"]

    # Whether each layer runs the reference loop (functional.lstm_layer_reference, eager only)
    # in place of the fused op (functional.lstm_layer).
    _reference = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the "
                "probability of an element being zeroed"
            )
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so "
                "non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(
                f"batch_first should be of type bool, got: {type(batch_first).__name__}"
            )
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(
                f"hidden_size should be of type int, got: {type(hidden_size).__name__}"
            )
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        num_directions = 2 if bidirectional else 1
        gate_size = 4 * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names = []
        self._all_weights = []
        shapes: list[tuple[int, ...]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                suffix = "_reverse" if direction == 1 else ""
                params = [
                    (f"weight_ih_l{layer}{suffix}", (gate_size, layer_input_size)),
                    (f"weight_hh_l{layer}{suffix}", (gate_size, real_hidden_size)),
                ]
                if bias:
                    params += [(f"bias_ih_l{layer}{suffix}", (gate_size,)),
                               (f"bias_hh_l{layer}{suffix}", (gate_size,))]
                if proj_size > 0:
                    params += [(f"weight_hr_l{layer}{suffix}", (proj_size, hidden_size))]
                self._flat_weights_names.extend(name for name, _ in params)
                self._all_weights.append([name for name, _ in params])
                shapes.extend(shape for _, shape in params)
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        _memory.check_fits(
            sum(math.prod(shape) for shape in shapes) * itemsize,
            torch.device(device) if device is not None else torch.get_default_device(),
            "the parameters",
        )
        for name, shape in zip(self._flat_weights_names, shapes):
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
        self.reset_parameters()

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> FusedLSTM:
        """A FusedLSTM with the configuration, device, dtype, parameters and training
        mode of ``lstm`` (copied, not shared)."""
        weight = lstm.weight_ih_l0
        fused = cls(
            lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
            lstm.dropout, lstm.bidirectional, lstm.proj_size,
            device=weight.device, dtype=weight.dtype,
        )
        fused.load_state_dict(lstm.state_dict())
        return fused.train(lstm.training)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script compiles this module's own forward (tensor input, not
        PackedSequence), which reads the parameters as one list, in nn.LSTM's order."""
        self._script_weights = self._flat_weights
        return self

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """A no-op, as nn.LSTM's is off cuDNN: the kernels need no flat weight buffer."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    # nn.LSTM's own (its names, signatures and messages; code written for nn.LSTM may
    # call them), compiled by TorchScript as ours.
    extra_repr = nn.RNNBase.extra_repr
    get_expected_hidden_size = nn.LSTM.get_expected_hidden_size
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    permute_hidden = nn.LSTM.permute_hidden

    def _layer_weights(self, dtype: Optional[torch.dtype]) -> List[functional.LayerWeights]:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, cast to `dtype` if given.
        Each layer's names are in nn.LSTM's order: w_ih, w_hh, then b_ih, b_hh with bias,
        then w_hr with a projection."""
        if torch.jit.is_scripting():
            flat = self._script_weights
        else:
            flat = self._cast_flat_weights(dtype)
        per_layer = len(self._all_weights[0])
        weights: List[functional.LayerWeights] = []
        for k in range(len(self._all_weights)):
            params = flat[k * per_layer:(k + 1) * per_layer]
            b_ih: Optional[Tensor] = None
            b_hh: Optional[Tensor] = None
            w_hr: Optional[Tensor] = None
            if self.bias:
                b_ih, b_hh = params[2], params[3]
            if self.proj_size > 0:
                w_hr = params[-1]
            weights.append((params[0], params[1], b_ih, b_hh, w_hr))
        return weights

    @torch.jit.unused
    def _cast_flat_weights(self, dtype: Optional[torch.dtype]) -> List[Tensor]:
        if dtype is None:
            return self._flat_weights
        return [w.to(dtype) if _autocast_eligible(w) else w for w in self._flat_weights]

    # nn.LSTM's check_input and check_forward_args, with its order and messages, plus the
    # device and state-dtype checks its kernel makes.
    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        weight = self.weight_ih_l0
        if not torch.jit.is_scripting():
            if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
                raise ValueError(
                    f"RNN input dtype ({input.dtype}) does not match weight dtype "
                    f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert "
                    f"model: model.to({input.dtype})"
                )
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}"
            )

    def check_forward_args(
        self, input: Tensor, hidden: Tuple[Tensor, Tensor], batch_sizes: Optional[Tensor]
    ) -> None:
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")
        weight = self.weight_ih_l0
        if input.device != weight.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor "
                f"at {input.device} and parameter tensor at {weight.device}"
            )
        autocast = False
        if not torch.jit.is_scripting():
            autocast = torch._C._is_any_autocast_enabled()
        for k in range(2):
            state = hidden[k]
            if state.device != input.device:
                raise RuntimeError(
                    "Input and hidden tensors are not at the same device, found input tensor "
                    f"at {input.device} and hidden tensor at {state.device}"
                )
            if state.dtype != input.dtype and not autocast:
                raise RuntimeError(
                    f"Expected hidden[{k}] dtype {input.dtype} (the input's), got {state.dtype}"
                )

    @torch.jit.unused
    def _check_memory(self, x: Tensor, layers: int, out_size: int) -> None:
        _memory.check_forward(x, layers, out_size, self.hidden_size)

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """nn.LSTM's forward, checks in its order (see nn.LSTM for the arguments).

        One path for eager mode and TorchScript (torch.jit.script compiles this module
        itself); PackedSequence input, autocast and the memory check are eager only."""
        if not torch.jit.is_scripting():
            if isinstance(input, PackedSequence):
                return self._forward_packed(input, hx)
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
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {expected}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not torch.jit.is_scripting():
                _check_two_states(hx)
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        output, h_n, c_n = self._run(input, hx, None, None, None)
        if not batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    @torch.jit.unused
    def _forward_packed(self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        _check_batch_sizes(batch_sizes, data)
        if hx is not None:
            _check_two_states(hx)
        output, h_n, c_n = self._run(data, hx, batch_sizes, sorted_indices, unsorted_indices)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

    def _run(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]],
        batch_sizes: Optional[Tensor], sorted_indices: Optional[Tensor],
        unsorted_indices: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The checks and the layer stack on ``input``, the batched tensor or (with
        batch_sizes) the packed data; returns the output in the same layout."""
        if hx is None:
            h0 = torch.zeros(self.get_expected_hidden_size(input, batch_sizes),
                             dtype=input.dtype, device=input.device)
            c0 = torch.zeros(self.get_expected_cell_size(input, batch_sizes),
                             dtype=input.dtype, device=input.device)
        else:
            h0, c0 = hx[0], hx[1]
        self.check_forward_args(input, (h0, c0), batch_sizes)
        h0, c0 = self.permute_hidden((h0, c0), sorted_indices)
        positions: Optional[Tensor] = None
        if batch_sizes is not None:
            positions = functional.packed_positions(batch_sizes).to(input.device)
            x = functional.packed_to_padded(input, batch_sizes, positions)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
            if x.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        dtype: Optional[torch.dtype] = None
        if not torch.jit.is_scripting():
            self._check_memory(x, h0.size(0), h0.size(2))
            dtype = _autocast_dtype(x)
            if dtype is not None:
                x, h0, c0 = (t.to(dtype) if _autocast_eligible(t) else t for t in (x, h0, c0))
        output, h_n, c_n = functional.lstm(
            x, h0, c0, self._layer_weights(dtype), self.num_layers, self.bidirectional,
            self.dropout, self.training, batch_sizes, self._reference, positions,
        )
        h_n, c_n = self.permute_hidden((h_n, c_n), unsorted_indices)
        if positions is not None:
            output = functional.padded_to_packed(output, positions)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, h_n, c_n


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
    if isinstance(hx, Tensor) or len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """Under autocast, the dtype to run in, as nn.LSTM does on cuDNN."""
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _autocast_eligible(t: Tensor) -> bool:
    """Autocast's own rule: floating-point tensors are cast, float64 ones are not."""
    return t.is_floating_point() and t.dtype != torch.float64


class ReferenceLSTM(FusedLSTM):
    """FusedLSTM's interface on the Python time-step loop (fused_lstm.reference): the
    slow baseline of the benchmark and the examples, with everything else equal."""

    _reference = True

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError("ReferenceLSTM runs the Python reference loop and cannot be "
                           "scripted; script a FusedLSTM")


# A whole saved model (torch.save(model)) loads with torch.load's default weights_only=True
# when the user trusts only their own classes, as it does with nn.LSTM inside. Registered
# under their qualified names: the (class, name) entries stay when a user's
# safe_globals([FusedLSTM, ...]) context removes the plain class on exit.
torch.serialization.add_safe_globals(
    [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in (FusedLSTM, ReferenceLSTM)]
)
