#!/usr/bin/env python3
"""The seed's character-level language model, trained with FusedLSTM.

The model and training of d2l's "Long Short-Term Memory" chapter: characters (26 letters,
space and unknown: a vocabulary of 28) in minibatches of 32 sequences of 35 time steps,
one-hot input, an LSTM of 256 hidden units and a linear head, SGD with learning rate 1 and
gradients clipped to norm 1; perplexity per epoch, then text predicted greedily from the
prefix "time traveller".

    python examples/char_lm.py                       # FusedLSTM on Python's own help texts
    python examples/char_lm.py --model fused nn --epochs 5 --steps 60 --plot perplexity.png
    python examples/char_lm.py --text timemachine.txt --sampling random --epochs 500

--model picks the recurrent layer: fused (fused_lstm.FusedLSTM), nn (torch.nn.LSTM) or loop
(fused_lstm.ReferenceLSTM, the Python time-step loop). Several run one after the other with
everything else equal: the same seed gives each the same initial weights (the three classes
draw them alike) and the same minibatches.

With no --text, the corpus is the English help texts that ship with Python
(pydoc_data.topics), so nothing is downloaded. Any UTF-8 text works, e.g. a novel from
Project Gutenberg; it is cleaned as the seed cleans The Time Machine (every run of
non-letters becomes one space, then lowercase), except that line breaks count as
non-letters: d2l's loader glues the end of one line to the start of the next.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import string
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from fused_lstm import FusedLSTM, ReferenceLSTM

RECURRENT_LAYERS = {"fused": FusedLSTM, "nn": nn.LSTM, "loop": ReferenceLSTM}
TOKENS = ["<unk>", " ", *string.ascii_lowercase]
TOKEN_INDEX = {token: index for index, token in enumerate(TOKENS)}
UNKNOWN = TOKEN_INDEX["<unk>"]


def preprocess(text: str) -> str:
    return re.sub("[^A-Za-z]+", " ", text).strip().lower()


def encode(text: str) -> Tensor:
    return torch.tensor([TOKEN_INDEX.get(char, UNKNOWN) for char in text], dtype=torch.long)


def decode(ids: list[int]) -> str:
    return "".join(TOKENS[i] for i in ids)


def minibatch_starts(
    num_tokens: int, batch_size: int, seq_len: int, sampling: str, generator: torch.Generator
) -> Tensor:
    """``[num_batches, batch_size]``: where each row of each minibatch starts in a corpus
    of ``num_tokens`` (its target is the same slice one token on), after a random offset
    so that every epoch cuts the text differently (d2l's two schemes).

    sequential: the corpus is cut into ``batch_size`` streams read side by side, so row b
    of minibatch k + 1 continues row b of minibatch k and the hidden state can be carried.
    random: disjoint subsequences in random order, unrelated from one minibatch to the next.
    """
    if sampling == "sequential":
        offset = int(torch.randint(seq_len + 1, (1,), generator=generator))
        stream_len = (num_tokens - offset - 1) // batch_size
        streams = offset + stream_len * torch.arange(batch_size)
        return streams + seq_len * torch.arange(stream_len // seq_len)[:, None]
    offset = int(torch.randint(seq_len, (1,), generator=generator))
    num_subseqs = (num_tokens - offset - 1) // seq_len
    num_batches = num_subseqs // batch_size
    order = torch.randperm(num_subseqs, generator=generator)[: num_batches * batch_size]
    return (offset + seq_len * order).view(num_batches, batch_size)


class CharLM(nn.Module):
    """d2l's RNNModel: one-hot (or embedded) characters, a recurrent layer, a linear head."""

    def __init__(self, recurrent_layer: type[nn.Module], hidden_size: int, num_layers: int,
                 embedding_size: int = 0) -> None:
        super().__init__()
        vocab_size = len(TOKENS)
        self.embedding = nn.Embedding(vocab_size, embedding_size) if embedding_size else None
        self.rnn = recurrent_layer(embedding_size or vocab_size, hidden_size, num_layers)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None):
        """tokens ``[T, B]`` -> logits ``[T, B, vocab]``, ``(h_n, c_n)``."""
        if self.embedding is None:
            inputs = F.one_hot(tokens, len(TOKENS)).to(self.linear.weight.dtype)
        else:
            inputs = self.embedding(tokens)
        output, state = self.rnn(inputs, state)
        return self.linear(output), state


@torch.no_grad()
def predict(model: CharLM, prefix: str, num_chars: int) -> str:
    """d2l's predict_ch8: warm the state up on the prefix, then append the most likely
    next character, ``num_chars`` times."""
    inputs = encode(prefix.lower()).to(model.linear.weight.device)
    state, predicted = None, []
    for _ in range(num_chars):
        logits, state = model(inputs[:, None], state)
        inputs = logits[-1].argmax(-1)
        predicted.append(int(inputs))
    return prefix + decode(predicted)


@dataclass
class Run:
    model: str
    perplexities: list[float] = field(default_factory=list)  # one per epoch
    epoch_ends: list[int] = field(default_factory=list)  # steps done at the end of each epoch
    losses: list[float] = field(default_factory=list)  # one per step (minibatch)
    tokens: int = 0
    seconds: float = 0.0  # in training steps only
    text: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def train(name: str, corpus: Tensor, args: argparse.Namespace) -> Run:
    torch.manual_seed(args.seed)
    model = CharLM(RECURRENT_LAYERS[name], args.hidden, args.num_layers, args.embedding)
    model.to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # Its own generator, so that every model sees the same minibatches.
    generator = torch.Generator().manual_seed(args.seed)
    corpus = corpus.to(args.device)
    positions = torch.arange(args.seq_len)
    run = Run(name)
    for epoch in range(1, args.epochs + 1):
        starts = minibatch_starts(len(corpus), args.batch_size, args.seq_len, args.sampling,
                                  generator)[: args.steps]
        state, epoch_loss = None, 0.0
        begin = time.perf_counter()
        bar = tqdm(starts, desc=f"{name} epoch {epoch}/{args.epochs}", unit="step",
                   file=sys.stderr, leave=False, disable=None)
        for rows in bar:
            indices = (rows + positions[:, None]).to(args.device)
            inputs, targets = corpus[indices], corpus[indices + 1]
            if args.sampling == "random":
                state = None
            elif state is not None:
                # Carried on, but the gradient stops at the minibatch boundary.
                state = tuple(s.detach() for s in state)
            logits, state = model(inputs, state)
            loss = F.cross_entropy(logits.reshape(-1, len(TOKENS)), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            run.losses.append(loss.item())
            epoch_loss += run.losses[-1]
            bar.set_postfix(perplexity=f"{math.exp(run.losses[-1]):.2f}", refresh=False)
        seconds = time.perf_counter() - begin
        tokens = len(starts) * args.batch_size * args.seq_len
        run.tokens += tokens
        run.seconds += seconds
        run.perplexities.append(math.exp(epoch_loss / len(starts)))
        run.epoch_ends.append(len(run.losses))
        print(f"{name:<5}  epoch {epoch}/{args.epochs}  {len(starts)} steps  "
              f"perplexity {run.perplexities[-1]:.3f}  tokens/s {tokens / seconds:,.0f}",
              flush=True)
    model.eval()
    run.text = predict(model, args.prefix, args.predict)
    print(f"{name:<5}  {run.text!r}", flush=True)
    return run


def summary(runs: list[Run]) -> str:
    """A table of the runs; from two on, each final perplexity relative to the first run's
    ("ppl vs first": a difference of perplexity, not of speed)."""
    first = runs[0].perplexities[-1]
    compare = len(runs) > 1
    header = f"{'model':<6} {'final perplexity':>16} {'tokens/s':>10}"
    lines = [header + (f" {'ppl vs first':>12}" if compare else "")]
    for run in runs:
        final = run.perplexities[-1]
        line = f"{run.model:<6} {final:>16.3f} {run.tokens_per_second:>10,.0f}"
        lines.append(line + (f" {100 * (final / first - 1):>+11.2f}%" if compare else ""))
    return "\n".join(lines)


def coincide(run: Run, other: Run) -> bool:
    """Whether two runs' curves lie on each other at any scale a plot shows: every step's
    loss within 0.1% of the other's (their perplexities within about 0.3%)."""
    return len(run.losses) == len(other.losses) and all(
        abs(a - b) <= 1e-3 * abs(b) for a, b in zip(run.losses, other.losses))


def legend_labels(runs: list[Run]) -> list[str]:
    """Each run's model, and which earlier run's curve it hides under, if any."""
    labels = []
    for k, run in enumerate(runs):
        label = f"{run.model}: {RECURRENT_LAYERS[run.model].__name__}"
        under = next((other for other in runs[:k] if coincide(run, other)), None)
        labels.append(label + (f" (on {under.model}'s curve)" if under else ""))
    return labels


def plot(runs: list[Run], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Models that agree draw on top of each other: styles that stay visible when they do.
    styles = itertools.cycle([("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")])
    for run, label, (linestyle, marker) in zip(runs, legend_labels(runs), styles):
        (line,) = ax.plot(range(1, len(run.losses) + 1), [math.exp(x) for x in run.losses],
                          linestyle=linestyle, alpha=0.3, linewidth=0.8)
        ax.plot(run.epoch_ends, run.perplexities, linestyle=linestyle, marker=marker,
                fillstyle="none", color=line.get_color(), label=label)
    ax.set_xlabel("training step (minibatch)")
    ax.set_ylabel("perplexity (faint: per step; marks: per epoch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Tensor, str]:
    """The arguments, the encoded corpus and a line that describes it; every bad argument
    is an argparse error (usage, message, exit status 2) before any training."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", choices=list(RECURRENT_LAYERS), default=["fused"],
                        help="recurrent layer(s), trained one after the other (default: fused)")
    parser.add_argument("--text", metavar="FILE",
                        help="UTF-8 text to train on (default: Python's help texts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: %(default)s")
    parser.add_argument("--epochs", type=positive_int, default=10, help="default: %(default)s")
    parser.add_argument("--steps", type=positive_int,
                        help="training steps (minibatches) per epoch (default: as many as one "
                             "pass over the corpus gives)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and minibatch order (default: %(default)s)")
    parser.add_argument("--sampling", choices=["sequential", "random"], default="sequential",
                        help="sequential (the default): the hidden state is carried, detached, "
                             "from one minibatch to the next; random: a fresh state for each")
    parser.add_argument("--num-layers", type=positive_int, default=1, help="default: %(default)s")
    parser.add_argument("--hidden", type=positive_int, default=256,
                        help="hidden_size (default: %(default)s)")
    parser.add_argument("--embedding", type=int, default=0, metavar="SIZE",
                        help="a learned embedding of SIZE per character (default 0: one-hot)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="default: %(default)s")
    parser.add_argument("--seq-len", type=positive_int, default=35,
                        help="time steps per sequence, d2l's num_steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1.0,
                        help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="gradient norm clipped to (default: %(default)s)")
    parser.add_argument("--prefix", default="time traveller",
                        help="start of the predicted text (default: %(default)r)")
    parser.add_argument("--predict", type=int, default=50, metavar="N",
                        help="characters to predict after the prefix (default: %(default)s)")
    parser.add_argument("--plot", metavar="FILE",
                        help="save the perplexity curves of the runs (needs matplotlib)")
    args = parser.parse_args(argv)

    if args.embedding < 0:
        parser.error(f"--embedding must be 0 (one-hot) or positive, got {args.embedding}")
    if args.predict < 0:
        parser.error(f"--predict must be 0 or positive, got {args.predict}")
    if not args.prefix:
        parser.error("--prefix must not be empty")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {args.device}: {error}")
    if args.plot is not None:
        try:
            import matplotlib
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib")
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if args.plot.rpartition(".")[2].lower() not in formats:
            parser.error(f"--plot {args.plot}: the file name must end in one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
        if not os.path.isdir(os.path.dirname(args.plot) or "."):
            parser.error(f"--plot {args.plot}: no such directory")

    if args.text is None:
        from pydoc_data.topics import topics

        text, source = "\n".join(topics.values()), "Python's help texts (pydoc_data.topics)"
    else:
        try:
            with open(args.text, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--text {args.text}: {error}")
        source = args.text
    corpus = preprocess(text)
    needed = (args.batch_size + 1) * args.seq_len + 1
    if len(corpus) < needed:
        what = "is empty" if not text else f"has {len(corpus)} characters once cleaned"
        parser.error(f"the corpus ({source}) {what}; a minibatch of {args.batch_size} "
                     f"sequences of {args.seq_len} steps needs at least {needed}")
    return args, encode(corpus), f"{source}: {len(corpus):,} characters"


def main(argv: list[str] | None = None) -> list[Run]:
    args, corpus, description = parse_args(argv)
    print(f"corpus: {description}, vocabulary {len(TOKENS)}; minibatches of {args.batch_size} x "
          f"{args.seq_len}, {args.sampling} sampling; device {args.device}, "
          f"CPU threads {torch.get_num_threads()}", flush=True)
    runs = [train(name, corpus, args) for name in args.model]
    print(summary(runs))
    if args.plot is not None:
        plot(runs, args.plot)
        print(f"perplexity curves saved to {args.plot}")
    return runs


if __name__ == "__main__":
    main()
