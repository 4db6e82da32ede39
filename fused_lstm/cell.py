"""FusedLSTMCell: torch.nn.LSTMCell's interface and behaviour on the fused kernels.

A cell is one time step of the layer: it runs the layer's op (torch.ops.fused_lstm.forward)
on a sequence of length 1, so that FusedLSTM and FusedLSTMCell share one step, and with it
the op's backward, double backward, fakes (torch.compile, torch.export, the meta device),
vmap rule and ONNX translation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _C, functional
from .modules import _in_autocast_dtype, _native_call_allowed, _parameters_by_name


class FusedLSTMCell(nn.RNNCellBase):
    r"""A drop-in replacement for :class:`torch.nn.LSTMCell`.

    Same constructor, parameter names (``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh``), shapes, registration order and initialisation (the same seed gives the
    same weights), so one ``state_dict`` loads into either class; the same forward,
    ``h_1, c_1 = cell(input, (h_0, c_0))`` with a ``[B, I]`` or unbatched ``[I]`` input
    and an optional state (zeros). Bad input raises where nn.LSTMCell raises, with the same
    exception type.

    It subclasses nn.LSTMCell's own base, :class:`torch.nn.RNNCellBase`, whose constructor,
    ``reset_parameters`` and ``extra_repr`` are nn.LSTMCell's (dynamo traces it: it refuses
    only nn.RNN, nn.GRU and nn.LSTM). One call is one fused op: both products, the four
    activations and the cell update.

    Where it differs: a state whose dtype is not the input's is refused (nn.LSTMCell
    promotes ``c_0`` of another dtype), and under autocast it computes in autocast's dtype
    on every device, as FusedLSTM does (nn.LSTMCell does so on CUDA; on the CPU it returns
    float32).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    @classmethod
    def from_lstm_cell(cls, cell: nn.LSTMCell) -> FusedLSTMCell:
        """A FusedLSTMCell with the configuration, device, dtype, parameters and training
        mode of ``cell`` (copied, not shared)."""
        weight = cell.weight_ih
        fused = cls(cell.input_size, cell.hidden_size, cell.bias, device=weight.device,
                    dtype=weight.dtype)
        fused.load_state_dict(cell.state_dict())
        return fused.train(cell.training)

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tensor]:
        """nn.LSTMCell's forward: ``input [B, I]`` or ``[I]``, ``hx = (h_0, c_0)`` each
        ``[B, H]`` or ``[H]`` (zeros if None); returns ``(h_1, c_1)``."""
        if not torch.jit.is_scripting():
            if _native_call_allowed():
                result = _C.cell_forward(input, hx, self._parameters, self.input_size,
                                         self.hidden_size)
                if result is not None:
                    return result
        dim = input.dim()
        if dim != 2:
            if dim != 1:
                raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {dim}D instead")
            input = input.unsqueeze(0)
        if hx is None:
            # The op never writes its inputs: one tensor of zeros serves as both states.
            h_0 = c_0 = input.new_zeros(input.size(0), self.hidden_size)
        else:
            if not torch.jit.is_scripting():
                if isinstance(hx, Tensor) or len(hx) != 2:
                    _refuse_state(hx)
            h_0, c_0 = hx
            if h_0.dim() != 2 or c_0.dim() != 2:
                self._check_state_dims(h_0, c_0)
            if dim == 1:
                h_0, c_0 = h_0.unsqueeze(0), c_0.unsqueeze(0)
        batch, hidden_size = input.size(0), self.hidden_size
        if (input.size(1) != self.input_size or h_0.size(0) != batch
                or h_0.size(1) != hidden_size or c_0.size(0) != batch
                or c_0.size(1) != hidden_size):
            self._size_error(input, h_0, c_0)
        if torch.jit.is_scripting():
            w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        else:
            input, h_0, c_0, w_ih, w_hh, b_ih, b_hh = self._eager_operands(input, h_0, c_0)
        _, h_1, c_1 = functional.lstm_layer(input.unsqueeze(0), h_0, c_0, w_ih, w_hh, b_ih, b_hh)
        if dim == 1:
            return h_1.squeeze(0), c_1.squeeze(0)
        return h_1, c_1

    def _check_state_dims(self, h_0: Tensor, c_0: Tensor) -> None:
        for k, state in enumerate((h_0, c_0)):
            if state.dim() != 1 and state.dim() != 2:
                raise ValueError(f"LSTMCell: Expected hx[{k}] to be 1D or 2D, got "
                                 f"{state.dim()}D instead")

    def _size_error(self, input: Tensor, h_0: Tensor, c_0: Tensor) -> None:
        """Raises nn.LSTMCell's error for the first size that is wrong (its C++
        check_rnn_cell_forward_input and _hidden: same order, same messages)."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} "
                               f"expected {self.input_size}")
        batch = input.size(0)
        for k, state in enumerate((h_0, c_0)):
            if state.size(0) != batch:
                raise RuntimeError(f"Input batch size {batch} doesn't match hidden{k} batch "
                                   f"size {state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got "
                                   f"{state.size(1)}, expected {self.hidden_size}")

    @torch.jit.unused
    def _eager_operands(self, input: Tensor, h_0: Tensor, c_0: Tensor):
        """The step's operands in eager mode, under torch.compile and export: the weights,
        and under autocast everything in its dtype, as FusedLSTM."""
        w_ih, w_hh, b_ih, b_hh = _parameters_by_name(
            self, ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        # The op checks the dtypes and devices (RuntimeError, as nn.LSTMCell raises), but
        # for the meta device: a meta tensor sends it to its fake, which checks none.
        if input.is_meta or h_0.is_meta or c_0.is_meta or w_ih.is_meta:
            _check_devices(input, h_0, c_0, w_ih)
        return _in_autocast_dtype((input, h_0, c_0, w_ih, w_hh, b_ih, b_hh))


def _refuse_state(hx) -> None:
    """nn.LSTMCell's refusals of a state that is not two tensors: TypeError for a tensor,
    RuntimeError for another number of them."""
    if isinstance(hx, Tensor):
        raise TypeError("LSTMCell: hx must be a tuple of two Tensors (h_0, c_0), got a Tensor")
    raise RuntimeError("lstm_cell expects two hidden states")


def _check_devices(input: Tensor, h_0: Tensor, c_0: Tensor, weight: Tensor) -> None:
    device = input.device
    for what, t in (("weight", weight), ("hx[0]", h_0), ("hx[1]", c_0)):
        if t.device != device:
            raise RuntimeError(f"LSTMCell: input is on {device}, {what} on {t.device}")


# A whole saved model loads with torch.load's default weights_only=True (modules.py).
torch.serialization.add_safe_globals(
    [(FusedLSTMCell, f"{FusedLSTMCell.__module__}.{FusedLSTMCell.__qualname__}")]
)
