"""fused_lstm: a drop-in replacement for torch.nn.LSTM on fused C++/CUDA kernels.

    from fused_lstm import FusedLSTM
    lstm = FusedLSTM(input_size, hidden_size, num_layers=2, batch_first=True)
    output, (h_n, c_n) = lstm(x)
"""
from . import reference
from ._version import __version__
from .cell import FusedLSTMCell
from .functional import lstm_layer
from .modules import FusedLSTM, ReferenceLSTM

__all__ = ["FusedLSTM", "FusedLSTMCell", "ReferenceLSTM", "lstm_layer", "reference", "__version__"]
