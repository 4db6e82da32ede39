"""examples/char_lm.py, the seed's language model: data, training and its command line."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"
_spec = importlib.util.spec_from_file_location("char_lm", SCRIPT)
char_lm = importlib.util.module_from_spec(_spec)
sys.modules["char_lm"] = char_lm  # dataclasses look their module up while the class is made
_spec.loader.exec_module(char_lm)


def _fresh_seed() -> str:
    return str(int(torch.randint(2**31, ())))  # the per-test seed of conftest.py


@pytest.fixture
def small_text(tmp_path):
    """20,000 characters of Python's help texts (17 minibatches of 32 x 35), with the case,
    digits, punctuation and non-ASCII letters of a real text."""
    from pydoc_data.topics import topics

    path = tmp_path / "small.txt"
    path.write_text(f"Déjà vu, {''.join(topics.values())[:20_000]}\n", encoding="utf-8")
    return path


def test_preprocess_and_vocabulary():
    assert char_lm.preprocess("  Déjà VU -- 42 times!\n\tThe END.\n") == "d j vu times the end"
    assert len(char_lm.TOKENS) == 28  # the seed's: 26 letters, space and unknown
    ids = char_lm.encode("time traveller")
    assert char_lm.decode(ids.tolist()) == "time traveller"
    assert char_lm.encode("a1").tolist() == [char_lm.TOKEN_INDEX["a"], char_lm.UNKNOWN]


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_minibatches_stay_in_the_corpus_without_overlap(sampling):
    num_tokens, batch_size, seq_len = 1000, 4, 7
    generator = torch.Generator().manual_seed(int(torch.randint(1000, ())))
    starts = char_lm.minibatch_starts(num_tokens, batch_size, seq_len, sampling, generator)
    assert starts.dim() == 2 and starts.size(1) == batch_size
    assert starts.min() >= 0 and starts.max() + seq_len < num_tokens  # the targets fit too
    assert len(set(starts.flatten().tolist())) == starts.numel()
    if sampling == "sequential":
        # Row b of minibatch k + 1 continues row b of minibatch k.
        assert torch.equal(starts[1:] - starts[:-1], torch.full_like(starts[1:], seq_len))
        assert starts.size(0) >= (num_tokens - seq_len - 1) // batch_size // seq_len
    else:
        # Subsequences cut at multiples of seq_len from one random offset, as many
        # minibatches as there are whole ones.
        (offset,) = set((starts.flatten() % seq_len).tolist())
        assert starts.size(0) == (num_tokens - offset - 1) // seq_len // batch_size


def test_random_sampling_shuffles_each_epoch():
    generator = torch.Generator().manual_seed(0)
    first, second = (char_lm.minibatch_starts(10_000, 8, 35, "random", generator) for _ in range(2))
    assert not torch.equal(first[: len(second)], second[: len(first)])


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_loss_falls(small_text, sampling):
    (run,) = char_lm.main(["--model", "fused", "--text", str(small_text), "--epochs", "2",
                           "--steps", "10", "--hidden", "64", "--sampling", sampling,
                           "--seed", _fresh_seed()])
    assert len(run.losses) == 20 and len(run.perplexities) == 2
    # From log(28) = 3.33 (uniform) to below 3.0 in 20 steps of learning rate 1.
    assert run.losses[0] > 3.2
    assert sum(run.losses[-4:]) / 4 < 3.0
    assert run.perplexities[1] < run.perplexities[0]
    assert run.text.startswith("time traveller") and len(run.text) == len("time traveller") + 50


# The same float32 arithmetic in another order: the layers' outputs differ by a few units
# in the last place, the loss (a mean over the 32 x 35 targets) by fewer still, and k SGD
# steps move the weights apart by about k rounding errors of the gradient. Measured: 0 to 2
# ulp of the loss (2.4e-7 at 3.3) over the first 12 steps; 16 ulp leaves room for other
# CPUs' kernels, while a real fault (a gate out of order, a bias or a state dropped) moves
# the loss by 1e-3 or more.
LOSS_ULPS = 16


@pytest.mark.parametrize("options", [
    [],
    ["--embedding", "16", "--num-layers", "2", "--hidden", "64", "--sampling", "random"],
], ids=["seed", "embedding-2-layers-random"])
def test_fused_nn_and_loop_give_the_same_losses(small_text, options):
    runs = char_lm.main(["--model", "fused", "nn", "loop", "--text", str(small_text),
                         "--epochs", "2", "--steps", "3", "--predict", "5",
                         "--seed", _fresh_seed(), *options])
    fused, *others = runs
    for other in others:
        for step, (ours, theirs) in enumerate(zip(fused.losses, other.losses)):
            tolerance = LOSS_ULPS * torch.finfo(torch.float32).eps * abs(theirs)
            assert abs(ours - theirs) <= tolerance, (other.model, step, ours, theirs)
        assert len(other.losses) == len(fused.losses) == 6


def test_summary_and_plot(small_text, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "perplexity.png"
    char_lm.main(["--model", "fused", "nn", "--text", str(small_text), "--epochs", "2",
                  "--steps", "2", "--hidden", "32", "--predict", "5", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "fused  epoch 2/2  2 steps  perplexity" in out
    header, fused, nn = out.strip().splitlines()[-4:-1]
    assert header.split() == ["model", "final", "perplexity", "tokens/s", "ppl", "vs", "first"]
    assert fused.startswith("fused") and fused.endswith("+0.00%")
    assert nn.startswith("nn") and nn.endswith("%")
    assert plot.stat().st_size > 0


def test_legend_says_which_curves_coincide():
    def run(model, losses):
        return char_lm.Run(model, losses=losses)

    fused, nn, loop = run("fused", [3.3, 3.1]), run("nn", [3.3001, 3.1]), run("loop", [3.3, 2.9])
    assert char_lm.legend_labels([fused, nn, loop]) == [
        "fused: FusedLSTM", "nn: LSTM (on fused's curve)", "loop: ReferenceLSTM"]
    assert char_lm.legend_labels([loop, fused, nn]) == [
        "loop: ReferenceLSTM", "fused: FusedLSTM", "nn: LSTM (on fused's curve)"]


def _error(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        char_lm.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_or_empty_text_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert "error: --text" in _error(["--text", str(missing)], capsys)
    assert "No such file" in _error(["--text", str(missing)], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "the corpus" in _error(["--text", str(empty)], capsys)
    assert "is empty" in _error(["--text", str(empty)], capsys)
    no_letters = tmp_path / "digits.txt"
    no_letters.write_text("1234 5678\n" * 10)
    assert "has 0 characters once cleaned" in _error(["--text", str(no_letters)], capsys)
    short = tmp_path / "short.txt"
    short.write_text("a b " * 100)
    assert "needs at least 1156" in _error(["--text", str(short)], capsys)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("déjà vu ".encode("latin-1") * 200)
    assert "utf-8" in _error(["--text", str(latin1)], capsys)


def test_other_bad_arguments_are_clear_errors(monkeypatch, capsys):
    assert "--steps: must be a positive integer, got 0" in _error(["--steps", "0"], capsys)
    assert "invalid choice" in _error(["--model", "gru"], capsys)
    assert "--device nonsense" in _error(["--device", "nonsense"], capsys)
    if importlib.util.find_spec("matplotlib") is not None:
        assert "no such directory" in _error(["--plot", "/nonexistent/curves.png"], capsys)
        assert "must end in one of" in _error(["--plot", "curves.txt"], capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert "--plot needs matplotlib" in _error(["--plot", "curves.png"], capsys)


def test_script_runs_as_a_command(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--text", str(tmp_path / "none.txt")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: char_lm.py")
