"""The textbook LSTM: the seed's Python time-step loop (d2l's `lstm`, one matrix product
per gate and operand), on nn.LSTM's weight layout: the oracle of the tests, the slow
baseline of the benchmark, and the formula higher derivatives are taken through (plain
torch: any device and dtype, differentiable to any order).
"""
from __future__ import annotations

import torch
from torch import Tensor


def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               bias: Tensor | None = None, w_hr: Tensor | None = None,
               batch_sizes: Tensor | None = None, reverse: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
    """One layer in one direction, with the fused op's semantics: the arguments and results
    of :func:`fused_lstm.functional.lstm_layer`, with one ``bias`` (``b_ih + b_hh``) or None."""
    seq_len, batch = input.shape[0], input.shape[1]
    params = gate_parameters(w_ih, w_hh, bias)
    H, C = h0, c0
    outputs: list[Tensor | None] = [None] * seq_len
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    rows = torch.arange(batch, device=input.device).unsqueeze(1)
    for t in steps:
        H_new, C_new = step(input[t], H, C, params)
        if w_hr is not None:
            H_new = H_new @ w_hr.T
        if batch_sizes is None:
            H, C = H_new, C_new
            outputs[t] = H_new
        else:
            live = rows < int(batch_sizes[t])
            H = torch.where(live, H_new, H)
            C = torch.where(live, C_new, C)
            outputs[t] = torch.where(live, H_new, torch.zeros_like(H_new))
    return torch.stack(outputs), H, C  # type: ignore[arg-type]


GateParameters = tuple[tuple[Tensor, Tensor, "Tensor | int"], ...]


def gate_parameters(w_ih: Tensor, w_hh: Tensor, bias: Tensor | None = None) -> GateParameters:
    """The seed's parameters from nn.LSTM's, gate by gate in the seed's order (input, forget,
    output, candidate): ``(W_x*, W_h*, b_*)`` with W_x* = w_ih's rows of that gate,
    transposed, W_h* the same of w_hh, b_* = bias's slice (nn.LSTM's rows are i, f, g, o)."""
    W_xi, W_xf, W_xc, W_xo = (w.T for w in w_ih.chunk(4, 0))
    W_hi, W_hf, W_hc, W_ho = (w.T for w in w_hh.chunk(4, 0))
    if bias is None:
        b_i = b_f = b_c = b_o = 0
    else:
        b_i, b_f, b_c, b_o = bias.chunk(4)
    return (W_xi, W_hi, b_i), (W_xf, W_hf, b_f), (W_xo, W_ho, b_o), (W_xc, W_hc, b_c)


def step(X: Tensor, H: Tensor, C: Tensor, params: GateParameters) -> tuple[Tensor, Tensor]:
    """One step of the seed's loop (d2l's ``lstm``): the new ``(H, C)``."""
    (W_xi, W_hi, b_i), (W_xf, W_hf, b_f), (W_xo, W_ho, b_o), (W_xc, W_hc, b_c) = params
    I = torch.sigmoid((X @ W_xi) + (H @ W_hi) + b_i)
    F = torch.sigmoid((X @ W_xf) + (H @ W_hf) + b_f)
    O = torch.sigmoid((X @ W_xo) + (H @ W_ho) + b_o)
    C_tilda = torch.tanh((X @ W_xc) + (H @ W_hc) + b_c)
    C = F * C + I * C_tilda
    H = O * torch.tanh(C)
    return H, C
