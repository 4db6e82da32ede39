"""TorchScript support: what ``torch.jit.script`` compiles in place of a FusedLSTM.

FusedLSTM's forward uses Python that TorchScript cannot compile (PackedSequence by
isinstance, autocast, ONNX and torch.func dispatch). ``FusedLSTM.__prepare_scriptable__``
hands TorchScript a :class:`ScriptableFusedLSTM` instead: the same parameters under the
same names (so ``state_dict`` keys stay nn.LSTM's) and the same forward on tensors,
written in TorchScript's subset and calling the same native op. Scripting replaces the
submodule in the scripted model (torch.jit's own behaviour for ``__prepare_scriptable__``);
in eager mode the stand-in calls the FusedLSTM it stands for, so such a model keeps
FusedLSTM's whole behaviour, PackedSequence included.

A scripted model takes tensor input (batched or not, ``batch_first`` or not) with or
without ``(h_0, c_0)``; PackedSequence input and autocast are not scripted.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import FusedLSTM


class ScriptableFusedLSTM(FusedLSTM):
    """The stand-in (see the module's docstring). It shares the FusedLSTM's parameters and
    reuses its checks (check_forward_args and the rest are TorchScript-compatible); only
    the forward is its own."""

    def __init__(self, lstm: FusedLSTM) -> None:
        nn.Module.__init__(self)
        for name in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size", "_flat_weights_names",
                     "_all_weights"):
            setattr(self, name, getattr(lstm, name))
        for name in lstm._flat_weights_names:
            self.register_parameter(name, getattr(lstm, name))
        # Parameters as TorchScript sees them: one list, in nn.LSTM's order.
        self._script_weights: List[Tensor] = [getattr(lstm, n) for n in lstm._flat_weights_names]
        self._weights_per_layer = len(lstm._all_weights[0])
        # In a tuple, so that neither nn.Module nor torch.jit takes it for a submodule.
        self._stands_for = (lstm,)
        self.train(lstm.training)

    def __prepare_scriptable__(self) -> nn.Module:
        return self

    @torch.jit.unused
    def _eager_forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]]):
        lstm = self._stands_for[0]
        lstm.train(self.training)
        return lstm(input, hx)

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if not torch.jit.is_scripting():
            return self._eager_forward(input, hx)
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            h0 = torch.zeros(self.get_expected_hidden_size(input, None), dtype=input.dtype,
                             device=input.device)
            c0 = torch.zeros(self.get_expected_cell_size(input, None), dtype=input.dtype,
                             device=input.device)
        else:
            h0, c0 = hx
            expected = 3 if batched else 2
            if h0.dim() != expected or c0.dim() != expected:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {expected}-D but got "
                    f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        self.check_forward_args(input, (h0, c0), None)
        x = input.transpose(0, 1) if self.batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        directions = 2 if self.bidirectional else 1
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            outputs: List[Tensor] = []
            for direction in range(directions):
                k = layer * directions + direction
                w = self._script_weights[k * self._weights_per_layer:(k + 1) * self._weights_per_layer]
                bias: Optional[Tensor] = None
                w_hr: Optional[Tensor] = None
                if self.bias:
                    bias = w[2] + w[3]
                if self.proj_size > 0:
                    w_hr = w[-1]
                out, h, c, _, _ = torch.ops.fused_lstm.forward(
                    x, h0[k], c0[k], w[0], w[1], bias, w_hr, None, direction == 1
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if directions == 1 else torch.cat(outputs, 2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        output = x.transpose(0, 1) if self.batch_first else x
        h_out, c_out = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            output = output.squeeze(batch_dim)
            h_out, c_out = h_out.squeeze(1), c_out.squeeze(1)
        return output, (h_out, c_out)
