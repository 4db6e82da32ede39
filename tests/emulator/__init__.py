"""The CUDA kernels emulated on the host (emulator.cpp), for the tests of a machine without
a GPU: a test-only extension, never part of the user's fused_lstm._C. `load()` builds it on
first use (one translation unit; about a minute on 2 cores) under build/emulator/, once per
torch version, and returns its ops, torch.ops.fused_lstm_emulated."""
import os
import sys

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def load():
    """Builds (if its sources changed) and loads the emulator. FUSED_LSTM_EMULATOR_SOURCE
    and FUSED_LSTM_EMULATOR_BUILD let the mutation check (mutations.py) build a mutant
    elsewhere."""
    if not hasattr(torch.ops.fused_lstm_emulated, "forward"):
        source = os.environ.get("FUSED_LSTM_EMULATOR_SOURCE", os.path.join(HERE, "emulator.cpp"))
        build_directory = os.environ.get("FUSED_LSTM_EMULATOR_BUILD") or os.path.join(
            ROOT, "build", "emulator", f"torch-{torch.__version__}")
        os.makedirs(build_directory, exist_ok=True)
        # ninja from the virtual environment, whether or not it is activated.
        os.environ["PATH"] = os.pathsep.join(
            [os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        cpp_extension.load(
            name="fused_lstm_emulator", sources=[source], build_directory=build_directory,
            extra_cflags=["-O2", "-fvisibility=hidden"], is_python_module=False,
            verbose=os.environ.get("FUSED_LSTM_EMULATOR_VERBOSE") == "1")
    return torch.ops.fused_lstm_emulated
