"""The textbook LSTM: the seed's Python time-step loop, on nn.LSTM's weight layout.

This is the oracle the fused kernels are tested against, the slow baseline of the
benchmark, and the differentiable formula used when a backward must itself be
differentiated (double backward). It is plain torch code, so it runs on any device and
dtype and autograd differentiates it to any order.
"""
from __future__ import annotations

import torch
from torch import Tensor


def lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor | None = None,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer in one direction, with the semantics of the fused op.

    Args:
        input: ``[T, B, I]``, time-major.
        h0: ``[B, P]``; c0: ``[B, H]``.
        w_ih: ``[4H, I]``; w_hh: ``[4H, P]``, rows in nn.LSTM's gate order i, f, g, o.
        bias: ``[4H]`` (``b_ih + b_hh``) or None.
        w_hr: ``[P, H]``, the projection of ``proj_size`` models, or None (then P = H).
        batch_sizes: ``[T]`` int64, a PackedSequence's: row b is live at step t only
            while ``b < batch_sizes[t]``; a row that is not live keeps its state and
            outputs zeros.
        reverse: run from the last step to the first.

    Returns:
        ``output [T, B, P]``, ``h_n [B, P]``, ``c_n [B, H]``.
    """
    seq_len, batch = input.shape[0], input.shape[1]
    h, c = h0, c0
    outputs: list[Tensor | None] = [None] * seq_len
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    rows = torch.arange(batch, device=input.device).unsqueeze(1)
    for t in steps:
        gates = input[t] @ w_ih.T + h @ w_hh.T
        if bias is not None:
            gates = gates + bias
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.T
        if batch_sizes is None:
            h, c = h_new, c_new
            outputs[t] = h_new
        else:
            live = rows < int(batch_sizes[t])
            h = torch.where(live, h_new, h)
            c = torch.where(live, c_new, c)
            outputs[t] = torch.where(live, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, c  # type: ignore[arg-type]
