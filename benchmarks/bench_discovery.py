"""Time the dataflow pass (moduli_transform.graph.find_recurrent_targets).

Two models: the word_language_model LSTM LM at its "medium" size (3 layers, 650 units,
vocabulary 10000, embedding 650), whose LSTM stays one fused aten.lstm op, and a custom
Elman cell (two nn.Linear, hidden 256) unrolled for 50 steps in a Python loop, the worst
case for export since every step is traced. Prints the median of 3 runs.

    python benchmarks/bench_discovery.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from moduli_transform.graph import find_recurrent_targets


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 10000, width: int = 650, layers: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, layers, dropout=0.5)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.encoder(tokens))
        return self.decoder(output)


class ElmanCell(nn.Module):
    def __init__(self, inputs: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_map = nn.Linear(inputs, hidden)
        self.recurrent = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.recurrent(h))
        return h


def median_seconds(model: nn.Module, inputs: tuple, repeats: int = 3) -> tuple[float, int]:
    times, found = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        found = len(find_recurrent_targets(model, inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), found


def main() -> None:
    torch.manual_seed(0)
    cases = [
        ("LSTM LM 3x650, vocab 10000 (T=3)", LSTMLanguageModel(), (torch.randint(0, 10000, (3, 2)),)),
        ("Elman cell h=256, 50 steps", ElmanCell(), (torch.randn(2, 50, 16),)),
        ("Elman cell h=256, 3 steps", ElmanCell(), (torch.randn(2, 3, 16),)),
    ]
    print(f"{'model':36s} {'median s':>9s} {'targets':>8s}")
    for name, model, inputs in cases:
        seconds, found = median_seconds(model, inputs)
        print(f"{name:36s} {seconds:9.3f} {found:8d}")


if __name__ == "__main__":
    main()
