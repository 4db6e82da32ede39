"""benchmarks/run.py on a tiny shape: its outputs, and that its correctness check stops a
FusedLSTM that is wrong."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fused_lstm import FusedLSTM

RUN_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
spec = importlib.util.spec_from_file_location("benchmark_run", RUN_PY)
run = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = run  # dataclasses look their module up there
spec.loader.exec_module(run)

# One thread: a tiny shape gains nothing from more, and a loaded machine slows them down.
TINY = ["--device", "cpu", "--quick", "--threads", "1", "--shapes", "7,3,4,5"]


@pytest.fixture(autouse=True)
def _keep_threads():
    # main() sets torch's threads for the whole process: give the other tests theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_writes_table_json_csv_and_plot(tmp_path, capsys):
    rows = run.main(TINY + ["--dtype", "float32", "bfloat16", "--out", str(tmp_path)])

    table = capsys.readouterr().out
    assert "torch" in table and "| shape | T, B, I, H | dtype | mode |" in table
    assert table.count("| 7,3,4,5 | 7, 3, 4, 5 |") == 4

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == rows
    assert saved["machine"]["device"] == "cpu" and saved["options"]["shapes"] == ["7,3,4,5"]
    assert [(r["dtype"], r["mode"]) for r in rows] == [
        ("float32", "fwd"), ("float32", "fwdbwd"), ("bfloat16", "fwd"), ("bfloat16", "fwdbwd")]
    for row in rows:
        assert (row["T"], row["B"], row["I"], row["H"]) == (7, 3, 4, 5)
        assert 0 < row["fused_max_error"] <= row["allowed_error"]
        for key in (run.LOOP, run.NN_LSTM, run.FUSED):
            assert row[f"{key}_ms"] > 0 and len(row[f"{key}_rounds_ms"]) == 3
        # Speed-ups are medians of per-round ratios, so they lie within the rounds' range.
        ratios = [n / f for n, f in zip(row["nn_lstm_rounds_ms"], row["fused_rounds_ms"])]
        assert min(ratios) <= row["speedup_vs_nn_lstm"] <= max(ratios)

    with open(tmp_path / "results.csv", newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == len(rows)
    for saved_row, row in zip(table_rows, rows):
        assert saved_row["mode"] == row["mode"]
        assert float(saved_row["fused_ms"]) == pytest.approx(row["fused_ms"])
        assert "fused_rounds_ms" not in saved_row

    pytest.importorskip("matplotlib")
    assert (tmp_path / "speedups.png").read_bytes().startswith(b"\x89PNG")


def wrong_forward(layer):
    """Right up to a relative 1e-4 on every output."""
    def wrong(*args, **kwargs):
        output, h_n, c_n = layer(*args, **kwargs)
        return output * (1 + 1e-4), h_n, c_n
    return wrong


def wrong_backward(layer):
    """The right forward, to the bit; the gradient of w_hh off by 1e-3 x sum(grad_output)."""
    def wrong(input, h0, c0, w_ih, w_hh, *args, **kwargs):
        output, h_n, c_n = layer(input, h0, c0, w_ih, w_hh, *args, **kwargs)
        return output + 1e-3 * (w_hh - w_hh.detach()).sum(), h_n, c_n
    return wrong


@pytest.mark.parametrize("mode, breaks, wrong_tensor", [
    ("fwd", wrong_forward, "output"),
    ("fwdbwd", wrong_backward, "grad of weight_hh_l0"),
])
def test_wrong_fused_lstm_stops_the_benchmark(monkeypatch, tmp_path, mode, breaks, wrong_tensor):
    monkeypatch.setattr(FusedLSTM, "_layer", staticmethod(breaks(FusedLSTM._layer)))
    stopped = f"FusedLSTM is wrong: .*{wrong_tensor}: FusedLSTM's error"
    with pytest.raises(SystemExit, match=stopped):
        run.main(TINY + ["--mode", mode, "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("shape", ["1,2,3", "0,1,1,1", "seeds", "a,b,c,d"])
def test_bad_shape_is_refused(shape):
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", "--shapes", shape])
