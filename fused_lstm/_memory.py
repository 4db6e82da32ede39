"""Refusing, before allocating, what cannot fit in a device's memory at all."""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from . import _ops


def check_forward(input: Tensor, batch_sizes: Tensor | None, batch_first: bool, h0: Tensor,
                  hidden_size: int) -> None:
    """The outputs and the state kept for backward of a forward over ``input`` (with
    batch_sizes, a PackedSequence's data) from ``h0 [layers * directions, B, P]``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    steps = input.size(int(batch_first)) if batch_sizes is None else batch_sizes.size(0)
    layers, batch, out_size = h0.shape
    acc = _ops.accumulate_dtype(input.dtype).itemsize
    # Per layer and direction: output [T, B, P]; gates [T, B, 4H] and cells [T, B, H]
    # in the accumulate dtype.
    needed = layers * steps * batch * (out_size * input.element_size() + 5 * hidden_size * acc)
    check_fits(needed, input.device, "the outputs and the state kept for backward of "
               f"{steps} steps x {batch} sequences")


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """Refuses, before allocating anything, what cannot fit in the device's memory at all:
    nn.LSTM fails there only in the allocator (after copying its input), and where memory
    is overcommitted a process can be killed before any error."""
    limit = _device_memory(device)
    if limit is not None and needed > limit:
        raise torch.OutOfMemoryError(
            f"FusedLSTM: {what} need {needed / 2**30:.1f} GiB, more than the "
            f"{limit / 2**30:.1f} GiB of memory of {device}"
        )


def _device_memory(device: torch.device) -> int | None:
    """The memory of a device in bytes (RAM and swap for the CPU), None where unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return _host_memory()
    return None


@functools.cache
def _host_memory() -> int | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            total += sum(int(line.split()[1]) * 1024 for line in meminfo
                         if line.startswith("SwapTotal:"))
    except OSError:
        pass
    return total
