"""The one-line swap: a small training script written for nn.LSTM, run as written and
with FusedLSTM in its place; then the fused model saved whole, loaded back with
torch.load's default weights_only=True, and exported to ONNX for onnxruntime.

    python examples/dropin.py            # ONNX step needs: pip install onnx onnxscript onnxruntime
"""
import importlib.util
import os
import tempfile

import torch
from torch import nn

from fused_lstm import FusedLSTM


class FrequencyClassifier(nn.Module):
    """Is a noisy sine wave slow or fast? The LSTM reads it, a linear layer decides."""

    def __init__(self, lstm_class=nn.LSTM):
        super().__init__()
        # The one line a user changes: nn.LSTM(...) -> FusedLSTM(...).
        self.lstm = lstm_class(input_size=1, hidden_size=32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        output, _ = self.lstm(x)
        return self.head(output[:, -1])


def batch(size, steps=30, generator=None):
    labels = torch.randint(0, 2, (size,), generator=generator)
    frequency = 0.15 + 0.25 * labels.float()
    phase = 6.3 * torch.rand(size, 1, generator=generator)
    t = torch.arange(steps).float()
    x = torch.sin(frequency[:, None] * t + phase)
    x = x + 0.3 * torch.randn(size, steps, generator=generator)
    return x.unsqueeze(-1), labels


def train(lstm_class, steps=300):
    torch.manual_seed(0)
    model = FrequencyClassifier(lstm_class)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = batch(64, generator=data)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    x, y = batch(1000, generator=data)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    final = sum(losses[-20:]) / 20  # one minibatch's loss is noisy; the last 20 are not
    print(f"{lstm_class.__name__:>9}: loss {losses[0]:.4f} -> {final:.4f} (last 20 steps), "
          f"test accuracy {accuracy:.3f}")
    return model, losses


def main():
    _, reference_losses = train(nn.LSTM)
    model, losses = train(FusedLSTM)
    # The same seed gives the same initial weights, so both runs start alike; float32
    # rounding then drifts apart over training, as nn.LSTM's own runs do between thread
    # counts.
    print("largest loss difference over the first 10 steps: "
          f"{max(abs(a - b) for a, b in zip(losses[:10], reference_losses)):.1e}")

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.pt")
        torch.save(model, path)
        # weights_only=True (the default): the script trusts its own classes, as it would
        # with nn.LSTM inside; FusedLSTM registered itself as safe when imported.
        with torch.serialization.safe_globals([FrequencyClassifier, nn.Linear]):
            loaded = torch.load(path)
        x, _ = batch(8)
        with torch.no_grad():
            same = torch.equal(loaded(x), model(x))
        print(f"reloaded {type(loaded.lstm).__name__} from {os.path.basename(path)}: "
              f"outputs bitwise equal: {same}")

        if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
            print("ONNX export skipped: pip install onnx onnxscript onnxruntime")
            return
        import onnx
        import onnxruntime

        onnx_path = os.path.join(directory, "model.onnx")
        torch.onnx.export(loaded.eval(), (x,), onnx_path, dynamic_shapes=({0: "batch"},),
                          verbose=False)
        operators = sorted({node.op_type for node in onnx.load(onnx_path).graph.node})
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        x, _ = batch(100)
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            error = (torch.from_numpy(logits) - loaded(x)).abs().max().item()
        print(f"ONNX operators {operators}; onnxruntime vs PyTorch on 100 new sequences: "
              f"max abs difference {error:.1e}")


if __name__ == "__main__":
    main()
