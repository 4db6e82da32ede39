"""Functional LSTM: one fused layer, and layers x directions composed around it.

Only one layer in one direction is native (torch.ops.fused_lstm.forward); layers,
directions, inter-layer dropout and packed sequences are composed here in plain torch,
the same for every device.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _onnx, _ops
from .reference import lstm_layer as _reference_layer


def lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction, fused.

    Args:
        input: ``[T, B, I]``, time-major.
        h0: ``[B, P]`` and c0: ``[B, H]``, the initial state.
        w_ih ``[4H, I]``, w_hh ``[4H, P]``, b_ih and b_hh ``[4H]`` (or None), w_hr
            ``[P, H]`` (or None, then P = H): nn.LSTM's parameters of one layer and
            direction, gate order i, f, g, o.
        batch_sizes: ``[T]`` int64 on the CPU, non-increasing (a PackedSequence's), or
            None: row b is live at step t only while ``b < batch_sizes[t]``.
        reverse: run from the last step to the first (the backward direction).

    Returns:
        ``output [T, B, P]`` (zero where a row is not live), ``h_n [B, P]``,
        ``c_n [B, H]``: each row's state after its last live step.

    float32 and float64 everywhere; bfloat16 and float16 compute in float32.

    Under ``torch.onnx.export`` the layer is exported as ONNX's LSTM operator, or as the
    reference loop where that operator cannot express it (fused_lstm._onnx).
    """
    bias = _combined_bias(b_ih, b_hh)
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export():
            if not _onnx.expressible(input, w_hr, batch_sizes):
                return _reference_layer(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)
            if not torch.jit.is_tracing():  # the TorchScript exporter maps the op by its symbolic
                return _onnx.onnx_lstm_node(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
        return _ops.run_forward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)
    output, h_n, c_n, _, _ = torch.ops.fused_lstm.forward(
        input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)
    return output, h_n, c_n


def _combined_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def lstm(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: List[Tensor],
    num_layers: int,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: Optional[Tensor] = None,
    batch_first: bool = False,
    reference: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """A stack of LSTM layers: nn.LSTM's computation after its checks, on its
    ``_flat_weights`` (layer-major, forward before reverse; per layer w_ih, w_hh, then b_ih
    and b_hh with bias, then w_hr with proj_size). ``input`` is ``[T, B, I]`` (``[B, T, I]``
    with batch_first) or, with batch_sizes, a PackedSequence's data ``[N, I]``; ``h0``/``c0``
    are ``[num_layers * D, B, *]``. Returns ``output`` (``[*, D * P]``, in the input's
    layout), ``h_n`` and ``c_n``. Dropout is drawn as nn.LSTM draws it. With ``reference``,
    each layer runs the reference loop (eager only) in place of :func:`lstm_layer`.
    """
    positions: Optional[Tensor] = None
    if batch_sizes is not None:
        positions = packed_positions(batch_sizes).to(input.device)
        x = packed_to_padded(input, positions, batch_sizes.numel(), int(batch_sizes[0]))
    else:
        x = input.transpose(0, 1) if batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    directions = 2 if bidirectional else 1
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    per_layer = len(weights) // (num_layers * directions)  # 2 to 5: with bias 4, w_hr odd
    for layer_index in range(num_layers):
        outputs: List[Tensor] = []
        for k in range(layer_index * directions, (layer_index + 1) * directions):
            reverse = k % directions == 1
            w = weights[k * per_layer:(k + 1) * per_layer]
            b_ih: Optional[Tensor] = w[2] if per_layer >= 4 else None
            b_hh: Optional[Tensor] = w[3] if per_layer >= 4 else None
            w_hr: Optional[Tensor] = w[-1] if per_layer % 2 == 1 else None
            if torch.jit.is_scripting() or not reference:
                out, h, c = lstm_layer(x, h0[k], c0[k], w[0], w[1], b_ih, b_hh, w_hr,
                                       batch_sizes, reverse)
            else:
                out, h, c = _reference_layer(x, h0[k], c0[k], w[0], w[1],
                                             _combined_bias(b_ih, b_hh), w_hr, batch_sizes, reverse)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        if dropout > 0 and training and layer_index < num_layers - 1:
            if positions is None:
                x = F.dropout(x, dropout, training=True)
            else:  # nn.LSTM drops out the packed data (aten/src/ATen/native/RNN.cpp): same draws
                data = F.dropout(padded_to_packed(x, positions), dropout, training=True)
                x = packed_to_padded(data, positions, x.size(0), x.size(1))
    if positions is not None:
        x = padded_to_packed(x, positions)
    elif batch_first:
        x = x.transpose(0, 1)
    return x, torch.stack(h_n), torch.stack(c_n)


def packed_positions(batch_sizes: Tensor) -> Tensor:
    """Where each row of a PackedSequence's data sits in the flattened ``[T * B]`` grid
    of its padded, time-major form (B = batch_sizes[0], sorted order)."""
    seq_len, batch = batch_sizes.numel(), int(batch_sizes[0])
    live = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)
    return torch.arange(seq_len * batch).view(seq_len, batch)[live]


def packed_to_padded(data: Tensor, positions: Tensor, seq_len: int, batch: int) -> Tensor:
    """``[N, F]`` packed data to ``[T, B, F]``, zeros where a row is not live."""
    padded = data.new_zeros(seq_len * batch, data.shape[-1])
    return padded.index_copy(0, positions, data).view(seq_len, batch, data.shape[-1])


def padded_to_packed(padded: Tensor, positions: Tensor) -> Tensor:
    """The inverse of :func:`packed_to_padded`."""
    return padded.reshape(-1, padded.shape[-1]).index_select(0, positions)
