"""The ONNX translation of one fused layer: ONNX's own LSTM operator, one node a layer and
direction, so that a plain ``torch.onnx.export(model, args, path)`` needs no translation
table from the user: under the default exporter (torch.export) through
``torch.onnx.ops.symbolic_multi_out`` in :func:`lstm_layer`; under the TorchScript exporter
(``dynamo=False``, deprecated) through the symbolic of ``fused_lstm::forward`` registered on
import. What ONNX's LSTM cannot express (the projection of ``proj_size`` models, bfloat16)
is exported as the reference loop of basic operators, unrolled over the steps: such a file
has a fixed sequence length (its batch may still be dynamic).

ONNX's gate order is i, o, f, c where nn.LSTM's is i, f, g, o; its bias is
``[Wb | Rb]`` (b_ih then b_hh); its states carry a leading directions axis.
"""
from __future__ import annotations

import torch
from torch import Tensor

def _to_iofc(weight: Tensor) -> Tensor:
    """nn.LSTM's gate blocks [i | f | g | o] (rows) in ONNX's order [i | o | f | c], with
    the leading directions axis of ONNX's W, R and B. Slices, not chunk: the exporter's
    optimizer folds slices of constant weights away, not the multi-output split."""
    hidden_size = weight.shape[0] // 4
    blocks = [weight[k * hidden_size:(k + 1) * hidden_size] for k in (0, 3, 1, 2)]
    return torch.cat(blocks).unsqueeze(0)


def expressible(input: Tensor, w_hr: Tensor | None, batch_sizes: Tensor | None) -> bool:
    """Whether ONNX's LSTM operator computes this layer. Packed input is left to the
    reference loop: neither exporter gets a PackedSequence this far (data-dependent
    shapes under torch.export; pack/pad pairs only around aten::lstm under TorchScript)."""
    onnx_dtypes = (torch.float32, torch.float64, torch.float16)  # those ONNX's LSTM is defined for
    return w_hr is None and batch_sizes is None and input.dtype in onnx_dtypes


def onnx_lstm_node(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                   b_ih: Tensor | None, b_hh: Tensor | None, reverse: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_lstm.functional.lstm_layer` as one ONNX LSTM node (see
    :func:`expressible` for when it can be)."""
    seq_len, batch = input.shape[0], input.shape[1]
    hidden_size = w_hh.shape[1]
    bias = None
    if b_ih is not None or b_hh is not None:
        zeros = w_hh.new_zeros(w_hh.shape[0])
        bias = torch.cat([_to_iofc(zeros if b is None else b) for b in (b_ih, b_hh)], 1)
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        (input, _to_iofc(w_ih), _to_iofc(w_hh), bias, None, h0.unsqueeze(0), c0.unsqueeze(0)),
        dict(hidden_size=hidden_size, direction="reverse" if reverse else "forward"),
        dtypes=(input.dtype,) * 3,
        shapes=([seq_len, 1, batch, hidden_size], [1, batch, hidden_size], [1, batch, hidden_size]),
    )
    return y.squeeze(1), y_h.squeeze(0), y_c.squeeze(0)


def _torchscript_symbolic(g, input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes, reverse,
                          save_for_backward=True):
    """fused_lstm::forward for the TorchScript exporter: functional.lstm_layer sends only
    what :func:`expressible` accepts here (no w_hr, no batch_sizes). gates and cells, the
    op's state saved for backward, have no ONNX counterpart: an exported graph never uses
    them."""
    from torch.onnx.symbolic_helper import _squeeze_helper, _unsqueeze_helper
    from torch.onnx.symbolic_opset9 import unused

    hidden_size = w_hh.type().sizes()[1]
    order = [torch.arange(k * hidden_size, (k + 1) * hidden_size) for k in (0, 3, 1, 2)]
    order = g.op("Constant", value_t=torch.cat(order))

    def to_iofc(weight):
        return _unsqueeze_helper(g, g.op("Gather", weight, order, axis_i=0), [0])

    onnx_bias = unused(g)
    if not bias.node().mustBeNone():
        wb = to_iofc(bias)
        zero = torch.zeros(1, dtype=bias.type().dtype())
        onnx_bias = g.op("Concat", wb, g.op("ConstantOfShape", g.op("Shape", wb), value_t=zero),
                         axis_i=1)
    y, y_h, y_c = g.op(
        "LSTM", input, to_iofc(w_ih), to_iofc(w_hh), onnx_bias, unused(g),
        _unsqueeze_helper(g, h0, [0]), _unsqueeze_helper(g, c0, [0]),
        hidden_size_i=hidden_size, direction_s="reverse" if reverse else "forward", outputs=3,
    )
    return (_squeeze_helper(g, y, [1]), _squeeze_helper(g, y_h, [0]),
            _squeeze_helper(g, y_c, [0]), None, None)


if hasattr(torch.onnx, "register_custom_op_symbolic"):  # where the TorchScript exporter is
    from torch.onnx.symbolic_helper import parse_args

    torch.onnx.register_custom_op_symbolic(
        "fused_lstm::forward", parse_args(*"vvvvvvvvbb")(_torchscript_symbolic), 7)
