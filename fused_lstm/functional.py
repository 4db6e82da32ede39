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

# (w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; biases and w_hr may be None.
LayerWeights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


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
    if not torch.jit.is_scripting():
        exported = _onnx_export(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
        if exported is not None:
            return exported
    bias = _combined_bias(b_ih, b_hh)
    if torch.jit.is_scripting():
        output, h_n, c_n, _, _ = torch.ops.fused_lstm.forward(
            input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)
        return output, h_n, c_n
    return _ops.run_forward(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)


@torch.jit.unused
def _onnx_export(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
    b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool,
) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """The layer under torch.onnx.export: ONNX's LSTM operator, or the reference loop where
    that operator cannot express it. None outside an export, and under the TorchScript
    exporter (tracing), which records the op and maps it by its registered symbolic."""
    if not torch.onnx.is_in_onnx_export():
        return None
    if not _onnx.expressible(input, w_hr, batch_sizes):
        return lstm_layer_reference(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    if torch.jit.is_tracing():
        return None
    return _onnx.onnx_lstm_node(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)


@torch.jit.unused
def lstm_layer_reference(
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
    """The reference loop (fused_lstm.reference) with :func:`lstm_layer`'s signature."""
    from . import reference

    bias = _combined_bias(b_ih, b_hh)
    return reference.lstm_layer(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse)


def _combined_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def lstm(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: List[LayerWeights],
    num_layers: int,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: Optional[Tensor] = None,
    reference: bool = False,
    positions: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """A stack of LSTM layers over a time-major ``[T, B, I]`` input.

    ``h0``/``c0`` are ``[num_layers * D, B, *]`` and ``weights`` holds one
    :data:`LayerWeights` per layer and direction, in nn.LSTM's order (layer-major,
    forward before reverse). Dropout applies to the outputs of every layer but the last,
    in training, drawn as nn.LSTM draws it (on the packed data with batch_sizes). Returns
    ``output [T, B, D * P]``, ``h_n``, ``c_n``. With ``reference``, each layer runs
    :func:`lstm_layer_reference` (eager only) in place of :func:`lstm_layer`.
    ``positions``: :func:`packed_positions` of batch_sizes, if the caller has them already.
    """
    directions = 2 if bidirectional else 1
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    if positions is None and batch_sizes is not None and dropout > 0 and training:
        positions = packed_positions(batch_sizes).to(input.device)
    x = input
    for layer_index in range(num_layers):
        outputs: List[Tensor] = []
        for direction in range(directions):
            k = layer_index * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            reverse = direction == 1
            if reference:
                out, h, c = lstm_layer_reference(x, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr,
                                            batch_sizes, reverse)
            else:
                out, h, c = lstm_layer(x, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr,
                                       batch_sizes, reverse)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        if dropout > 0 and training and layer_index < num_layers - 1:
            x = _dropout(x, dropout, batch_sizes, positions)
    return x, torch.stack(h_n), torch.stack(c_n)


def _dropout(
    x: Tensor, p: float, batch_sizes: Optional[Tensor], positions: Optional[Tensor]
) -> Tensor:
    """Inter-layer dropout as nn.LSTM draws it: on the ``[T, B, F]`` tensor, or with
    batch_sizes on the packed data ``[N, F]`` (aten/src/ATen/native/RNN.cpp drops out the
    packed outputs), so that the same seed zeroes the same values and leaves the random
    state where nn.LSTM leaves it."""
    if batch_sizes is None or positions is None:
        return F.dropout(x, p, training=True)
    data = F.dropout(padded_to_packed(x, positions), p, training=True)
    return packed_to_padded(data, batch_sizes, positions)


def packed_positions(batch_sizes: Tensor) -> Tensor:
    """Where each row of a PackedSequence's data sits in the flattened ``[T * B]`` grid
    of its padded, time-major form (B = batch_sizes[0], sorted order)."""
    seq_len, batch = batch_sizes.numel(), int(batch_sizes[0])
    live = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)
    return torch.arange(seq_len * batch).view(seq_len, batch)[live]


def packed_to_padded(data: Tensor, batch_sizes: Tensor, positions: Tensor) -> Tensor:
    """``[N, F]`` packed data to ``[T, B, F]``, zeros where a row is not live."""
    seq_len, batch = batch_sizes.numel(), int(batch_sizes[0])
    padded = data.new_zeros(seq_len * batch, data.shape[-1])
    return padded.index_copy(0, positions, data).view(seq_len, batch, data.shape[-1])


def padded_to_packed(padded: Tensor, positions: Tensor) -> Tensor:
    """The inverse of :func:`packed_to_padded`."""
    return padded.reshape(-1, padded.shape[-1]).index_select(0, positions)
