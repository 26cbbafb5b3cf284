"""A zoo of recurrent (and not recurrent) model styles, written the way public code writes them.

Each :class:`ZooCase` holds a factory, example inputs (tiny, T=3 steps) and the ground truth
of the dataflow pass: the set of ``(name, kind, (row start, row stop), (col start, col stop),
gates)`` it must return, nothing more. Sizes are odd on purpose (I=3, H=5) so that a slice
off by one or taken on the wrong axis shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

I, H, O, T, B = 3, 5, 4, 3, 2  # input, hidden, output sizes, time steps, batch
ALL = (None, None)


def sequence(batch: int = B, steps: int = T, features: int = I) -> torch.Tensor:
    return torch.randn(batch, steps, features)


# ------------------------------------------------------------------ cat([x, h]) cells


class TutorialCharRNN(nn.Module):
    """PyTorch char-RNN tutorial: i2h and i2o read ``cat((input, hidden), 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.i2h = nn.Linear(I + H, H)
        self.i2o = nn.Linear(I + H, O)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, line: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros(line.shape[0], H)
        for t in range(line.shape[1]):
            combined = torch.cat((line[:, t], hidden), 1)
            hidden = self.i2h(combined)
            output = self.softmax(self.i2o(combined))
        return output


class ThreeWayCatRNN(nn.Module):
    """Input, a static context vector and the hidden state in one cat."""

    def __init__(self, context: int = 2) -> None:
        super().__init__()
        self.cell = nn.Linear(I + context + H, H)
        self.head = nn.Linear(H, O)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], context, h], dim=-1)))
        return self.head(h)


class HiddenFirstCatRNN(nn.Module):
    """``cat([h, x])``: the hidden slice comes first."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn_cell = nn.Linear(H + I, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        outputs = []
        for x_t in x.unbind(1):
            h = torch.relu(self.rnn_cell(torch.cat([h, x_t], 1)))
            outputs.append(h)
        return torch.stack(outputs, 1)


class ManualLSTM(nn.Module):
    """One Linear on ``cat([x, h])`` producing the four gates, split with chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.Linear(I + H, 4 * H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            i, f, g, o = self.gates(torch.cat([x[:, t], h], 1)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h


# ------------------------------------------------------------------ two-matrix cells


class ElmanRNN(nn.Module):
    """``h = tanh(W_in x + W_hh h)`` with two nn.Linear, plus a read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Linear(I, H)
        self.hidden_layer = nn.Linear(H, H)
        self.readout = nn.Linear(H, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_layer(x[:, t]) + self.hidden_layer(h))
        return self.readout(h)


class LeakyCTRNN(nn.Module):
    """Neuroscience-style continuous-time RNN with private noise (time-major input)."""

    def __init__(self, dt: float = 20.0, tau: float = 100.0, noise: float = 0.05) -> None:
        super().__init__()
        self.alpha, self.noise = dt / tau, noise
        self.W_in = nn.Linear(I, H)
        self.W_rec = nn.Linear(H, H, bias=False)
        self.fc = nn.Linear(H, O)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(inputs.shape[1], H)
        rates = []
        for step in range(inputs.shape[0]):
            h = h + self.alpha * (-h + torch.relu(self.W_rec(h) + self.W_in(inputs[step])))
            h = h + self.noise * torch.randn_like(h)
            rates.append(h)
        return self.fc(torch.stack(rates))


class StackedElman(nn.Module):
    """Two Elman layers; layer 2's input matrix reads layer 1's state (not recurrent)."""

    def __init__(self) -> None:
        super().__init__()
        self.in1, self.rec1 = nn.Linear(I, H), nn.Linear(H, H)
        self.in2, self.rec2 = nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = h2 = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h1 = torch.tanh(self.in1(x[:, t]) + self.rec1(h1))
            h2 = torch.tanh(self.in2(h1) + self.rec2(h2))
        return h2


# ------------------------------------------------------------------ raw nn.Parameter cells


class RawParameterRNN(nn.Module):
    """Row-vector convention with raw parameters: ``h @ W_hh`` (W as (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.W_ih = nn.Parameter(torch.randn(I, H) * 0.3)
        self.W_hh = nn.Parameter(torch.randn(H, H) * 0.3)
        self.b = nn.Parameter(torch.zeros(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ self.W_ih + h @ self.W_hh + self.b)
        return h


class RawCatMatmulRNN(nn.Module):
    """``cat([x, h]) @ W`` with W of shape (I + H, H): the recurrent block is a row slice."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(I + H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(torch.matmul(torch.cat([x[:, t], h], -1), self.W))
        return h


class FunctionalLinearRNN(nn.Module):
    """``F.linear`` with raw (out, in) parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(H, I) * 0.3)
        self.weight_hh = nn.Parameter(torch.randn(H, H) * 0.3)
        self.bias = nn.Parameter(torch.zeros(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(F.linear(x[:, t], self.weight_ih) + F.linear(h, self.weight_hh, self.bias))
        return h


class ColumnVectorRNN(nn.Module):
    """Column-vector convention ``h = tanh(W @ cat([x; h]))`` with states of shape (n, batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(H, I + H) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(H, x.shape[0])
        for t in range(x.shape[1]):
            h = torch.tanh(self.W @ torch.cat([x[:, t].T, h], 0))
        return h.T


class EinsumRNN(nn.Module):
    """``einsum("bi,io->bo", cat([x, h]), W)``: the contracted index picks the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(I + H, H) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(torch.einsum("bi,io->bo", torch.cat([x[:, t], h], -1), self.W))
        return h


class OrthogonalRNN(nn.Module):
    """W_hh kept orthogonal by ``torch.nn.utils.parametrizations.orthogonal``."""

    def __init__(self) -> None:
        super().__init__()
        self.input_map = nn.Linear(I, H)
        self.recurrent = orthogonal(nn.Linear(H, H, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(self.input_map(x[:, t]) + self.recurrent(h))
        return h


class MaskedRNN(nn.Module):
    """Fixed connectivity: ``F.linear(h, weight_hh * mask)`` with the mask a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_in = nn.Parameter(torch.randn(H, I) * 0.3)
        self.weight_hh = nn.Parameter(torch.randn(H, H) * 0.3)
        self.register_buffer("mask", (torch.rand(H, H) > 0.5).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(F.linear(x[:, t], self.weight_in) + F.linear(h, self.weight_hh * self.mask))
        return h


# ------------------------------------------------------------------ PyTorch cells and layers


class CellLoop(nn.Module):
    """An RNNCell / GRUCell / LSTMCell called in a Python loop."""

    def __init__(self, cell: type) -> None:
        super().__init__()
        self.cell = cell(I, H)
        self.head = nn.Linear(H, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        state = (h, h) if isinstance(self.cell, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


class FusedRNN(nn.Module):
    """nn.RNN / GRU / LSTM module with a linear head on the last step."""

    def __init__(self, layer: type, **options) -> None:
        super().__init__()
        self.rnn = layer(I, H, batch_first=True, **options)
        width = options.get("proj_size", 0) or H
        self.head = nn.Linear(width * (2 if options.get("bidirectional") else 1), O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TiedLSTMLanguageModel(nn.Module):
    """word_language_model style: embedding tied to the decoder, 2-layer LSTM (ninp == nhid)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, H)
        self.rnn = nn.LSTM(H, H, 2, dropout=0.1)
        self.decoder = nn.Linear(H, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.encoder(tokens))
        return self.decoder(output)


class GreedyDecoder(nn.Module):
    """Autoregressive decoding with tied weights: the token fed back is an argmax (integer)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, H)
        self.cell = nn.GRUCell(H, H)
        self.out = nn.Linear(H, vocab)
        self.out.weight = self.embedding.weight

    def forward(self, start: torch.Tensor) -> torch.Tensor:
        token, h = start, torch.zeros(start.shape[0], H)
        logits = []
        for _ in range(T):
            h = self.cell(self.embedding(token), h)
            logits.append(self.out(h))
            token = logits[-1].argmax(-1)
        return torch.stack(logits, 1)


class ConvLSTMCell(nn.Module):
    """ConvLSTM (Shi et al. 2015), as in the widely copied ndrplz implementation."""

    def __init__(self, channels: int = 2, hidden: int = 3) -> None:
        super().__init__()
        self.hidden_dim = hidden
        self.conv = nn.Conv2d(channels + hidden, 4 * hidden, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _, height, width = x.shape
        h = c = x.new_zeros(batch, self.hidden_dim, height, width)
        for t in range(steps):
            combined_conv = self.conv(torch.cat([x[:, t], h], dim=1))
            cc_i, cc_f, cc_o, cc_g = torch.split(combined_conv, self.hidden_dim, dim=1)
            c = torch.sigmoid(cc_f) * c + torch.sigmoid(cc_i) * torch.tanh(cc_g)
            h = torch.sigmoid(cc_o) * torch.tanh(c)
        return h


class IndRNN(nn.Module):
    """``h = relu(W x + u * h)`` with a 1-D recurrent vector (Li et al. 2018)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_weights = nn.Linear(I, H)
        self.recurrent_weight = nn.Parameter(torch.rand(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.relu(self.input_weights(x[:, t]) + self.recurrent_weight * h)
        return h


# ------------------------------------------------------------------ negatives


class MinGRU(nn.Module):
    """minGRU (Feng et al. 2024): gates read only x, so no weight sits inside the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_z = nn.Linear(I, H)
        self.linear_h = nn.Linear(I, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            z = torch.sigmoid(self.linear_z(x[:, t]))
            h = (1 - z) * h + z * self.linear_h(x[:, t])
        return h


class TinyTransformer(nn.Module):
    """Two-layer Transformer encoder: out_proj and friends are square but feed-forward."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(I, width)
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


# ------------------------------------------------------------------ other methods, control flow


class StepModel(nn.Module):
    """``forward`` is one step (tutorial style); training unrolls with ``rollout``."""

    def __init__(self) -> None:
        super().__init__()
        self.x2h = nn.Linear(I, H)
        self.h2h = nn.Linear(H, H)
        self.h2o = nn.Linear(H, O)

    def forward(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.x2h(x_t) + self.h2h(h))

    def rollout(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = self(x[:, t], h)
        return self.h2o(h)


class DataDependentRNN(nn.Module):
    """Stops early when the state saturates: a Python ``if`` on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(I, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            if h.abs().max() > 0.999:
                break
        return h


# ------------------------------------------------------------------ styles of well-known repos


class WeightDropLSTM(nn.Module):
    """AWD-LSTM style: W_hh lives as ``weight_hh_l0_raw``; each forward drops out a copy
    and sets it back on the LSTM as a plain tensor (the optimizer updates the raw one)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(I, H, batch_first=True)
        raw = self.rnn.weight_hh_l0
        del self.rnn._parameters["weight_hh_l0"]
        self.rnn.register_parameter("weight_hh_l0_raw", nn.Parameter(raw.data))
        self.decoder = nn.Linear(H, O)

    def forward(self, x):
        setattr(self.rnn, "weight_hh_l0", F.dropout(self.rnn.weight_hh_l0_raw, 0.3, self.training))
        return self.decoder(self.rnn(x)[0])


class HandWrittenGRU(nn.Module):
    """GRU written out: z and r from one Linear on cat([x, h]) (nonlinearity before the
    split), the candidate from a second Linear on cat([x, r * h])."""

    def __init__(self):
        super().__init__()
        self.gates = nn.Linear(I + H, 2 * H)
        self.candidate = nn.Linear(I + H, H)
        self.out = nn.Linear(H, O)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            z, r = torch.sigmoid(self.gates(torch.cat([x[:, t], h], 1))).chunk(2, 1)
            n = torch.tanh(self.candidate(torch.cat([x[:, t], r * h], 1)))
            h = (1 - z) * n + z * h
        return self.out(h)


class ScriptStyleLSTM(nn.Module):
    """pytorch/benchmarks fastrnns style: raw parameters, ``addmm`` + ``mm`` then chunk."""

    def __init__(self):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(4 * H, I) * 0.3)
        self.weight_hh = nn.Parameter(torch.randn(4 * H, H) * 0.3)
        self.bias = nn.Parameter(torch.zeros(4 * H))

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            gates = torch.addmm(self.bias, x[:, t], self.weight_ih.t()) + torch.mm(h, self.weight_hh.t())
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h


class WeightNormRNN(nn.Module):
    """Recurrent Linear under ``parametrizations.weight_norm``: v is the matrix; g is a
    per-neuron scale (elementwise, not regularized)."""

    def __init__(self):
        super().__init__()
        self.i2h = nn.Linear(I, H)
        self.h2h = nn.utils.parametrizations.weight_norm(nn.Linear(H, H))

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(self.i2h(x[:, t]) + self.h2h(h))
        return h


class GridCellRNN(nn.Module):
    """Sorscher et al. style: velocities in, initial state encoded from the start place-cell
    code, bias-free ReLU nn.RNN, linear decoder to place cells."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(O, H, bias=False)
        self.rnn = nn.RNN(2, H, nonlinearity="relu", bias=False, batch_first=True)
        self.decoder = nn.Linear(H, O, bias=False)

    def forward(self, velocity, start_code):
        return self.decoder(self.rnn(velocity, self.encoder(start_code)[None])[0])


class AttentionSeq2Seq(nn.Module):
    """Encoder GRU + GRUCell decoder with Bahdanau-style attention, fed its own argmax.

    By the pass's rule (a use that reads the output of an earlier use of the same weight)
    the decoder's W_hh, the context columns of its W_ih and the attention matrix applied to
    the decoder state are all in the loop; the token-embedding columns are not (argmax
    breaks the dataflow). Only W_hh gets its own output back through no other weight, so
    only it is a hidden -> hidden ("recurrent") matrix; the other two close the loop only
    through W_hh and each other, and their input and output neurons differ (decoder state
    -> query dims; encoder features -> decoder gates): kind "linear", embedded separately."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(11, I)
        self.encoder = nn.GRU(I, H, batch_first=True)
        self.decoder = nn.GRUCell(I + H, H)
        self.attention = nn.Linear(H, H, bias=False)
        self.out = nn.Linear(H, 11)

    def forward(self, source):
        memory, h = self.encoder(self.embedding(source))
        h, token, outputs = h[0], source[:, 0], []
        for _ in range(T):
            scores = torch.bmm(memory, self.attention(h).unsqueeze(2)).squeeze(2)
            context = (F.softmax(scores, 1).unsqueeze(2) * memory).sum(1)
            h = self.decoder(torch.cat([self.embedding(token), context], 1), h)
            outputs.append(self.out(h))
            token = outputs[-1].argmax(1)
        return torch.stack(outputs, 1)


class QuasiRNN(nn.Module):
    """QRNN style: gates from the inputs only, elementwise recurrence c = f c + (1 - f) z."""

    def __init__(self):
        super().__init__()
        self.gates = nn.Linear(I, 3 * H)

    def forward(self, x):
        z, f, o = self.gates(x).chunk(3, -1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c, outputs = x.new_zeros(x.shape[0], H), []
        for t in range(x.shape[1]):
            c = f[:, t] * c + (1 - f[:, t]) * z[:, t]
            outputs.append(o[:, t] * c)
        return torch.stack(outputs, 1)


class LayerNormLSTM(nn.Module):
    """pytorch/benchmarks fastrnns LayerNormLSTMCell: ``mm`` per side, LayerNorm on each
    side's gates before the sum and the chunk, LayerNorm on the cell."""

    def __init__(self):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(4 * H, I) * 0.3)
        self.weight_hh = nn.Parameter(torch.randn(4 * H, H) * 0.3)
        self.layernorm_i, self.layernorm_h = nn.LayerNorm(4 * H), nn.LayerNorm(4 * H)
        self.layernorm_c = nn.LayerNorm(H)

    def forward(self, x):
        hx = cx = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            igates = self.layernorm_i(torch.mm(x[:, t], self.weight_ih.t()))
            hgates = self.layernorm_h(torch.mm(hx, self.weight_hh.t()))
            ingate, forgetgate, cellgate, outgate = (igates + hgates).chunk(4, 1)
            cx = self.layernorm_c(torch.sigmoid(forgetgate) * cx
                                  + torch.sigmoid(ingate) * torch.tanh(cellgate))
            hx = torch.sigmoid(outgate) * torch.tanh(cx)
        return hx


class TupleStateLSTM(nn.Module):
    """fastrnns LSTMCell + LSTMLayer: time-major input, the ``(hx, cx)`` state passed in as a
    tuple argument and returned, ``mm + b_ih + mm + b_hh`` then chunk."""

    def __init__(self):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(4 * H, I) * 0.3)
        self.weight_hh = nn.Parameter(torch.randn(4 * H, H) * 0.3)
        self.bias_ih = nn.Parameter(torch.zeros(4 * H))
        self.bias_hh = nn.Parameter(torch.zeros(4 * H))

    def cell(self, input, state):
        hx, cx = state
        gates = (torch.mm(input, self.weight_ih.t()) + self.bias_ih
                 + torch.mm(hx, self.weight_hh.t()) + self.bias_hh)
        ingate, forgetgate, cellgate, outgate = gates.chunk(4, 1)
        cy = torch.sigmoid(forgetgate) * cx + torch.sigmoid(ingate) * torch.tanh(cellgate)
        hy = torch.sigmoid(outgate) * torch.tanh(cy)
        return hy, (hy, cy)

    def forward(self, input, state):
        outputs = []
        for step in input.unbind(0):
            out, state = self.cell(step, state)
            outputs += [out]
        return torch.stack(outputs), state


class BlockAssembledRNN(nn.Module):
    """E/I network (Dale's law) whose recurrent matrix is assembled in place from four
    sign-constrained blocks, ``W[:E, :E] = |w_ee|`` ..., then applied with ``F.linear``."""

    def __init__(self, excitatory: int = 3):
        super().__init__()
        self.e, inhibitory = excitatory, H - excitatory
        self.input = nn.Linear(I, H)
        self.w_ee = nn.Parameter(torch.rand(excitatory, excitatory))
        self.w_ei = nn.Parameter(torch.rand(excitatory, inhibitory))
        self.w_ie = nn.Parameter(torch.rand(inhibitory, excitatory))
        self.w_ii = nn.Parameter(torch.rand(inhibitory, inhibitory))

    def recurrent_weight(self):
        e, W = self.e, self.w_ee.new_zeros(H, H)
        W[:e, :e], W[:e, e:] = self.w_ee.abs(), -self.w_ei.abs()
        W[e:, :e], W[e:, e:] = self.w_ie.abs(), -self.w_ii.abs()
        return W

    def forward(self, x):
        W, h = self.recurrent_weight(), x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.relu(self.input(x[:, t]) + F.linear(h, W))
        return h


class BatchedWeightRNN(nn.Module):
    """Weights expanded over the batch and applied with ``bmm`` / ``baddbmm``."""

    def __init__(self):
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(I, H) * 0.3)
        self.W_rec = nn.Parameter(torch.randn(H, H) * 0.3)
        self.bias = nn.Parameter(torch.zeros(1, 1, H))

    def forward(self, x):
        batch = x.shape[0]
        h = x.new_zeros(batch, 1, H)
        w_in, w_rec = self.W_in.expand(batch, I, H), self.W_rec.expand(batch, H, H)
        for t in range(x.shape[1]):
            recurrent = torch.baddbmm(self.bias.expand(batch, 1, H), h, w_rec)
            h = torch.tanh(torch.bmm(x[:, t:t + 1], w_in) + recurrent)
        return h.squeeze(1)


class ContinuousTimeRNN(nn.Module):
    """Euler-discretized rate network, column vectors: ``h += dt (-h + W tanh(h) + U x)``."""

    def __init__(self, dt: float = 0.1):
        super().__init__()
        self.dt = dt
        self.W = nn.Parameter(torch.randn(H, H) / H ** 0.5)
        self.U = nn.Parameter(torch.randn(H, I) * 0.3)
        self.b = nn.Parameter(torch.zeros(H, 1))

    def forward(self, x):
        h = x.new_zeros(H, x.shape[0])
        for t in range(x.shape[1]):
            h = h + self.dt * (-h + self.W @ torch.tanh(h) + self.U @ x[:, t].T + self.b)
        return h.T


class SimpleRecurrentUnit(nn.Module):
    """SRU (Lei et al. 2018): one matrix on the inputs only; the state enters the forget
    gate through an elementwise vector ``v_f * c`` (listed as elementwise, no matrix)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Linear(I, 3 * H)
        self.v_f = nn.Parameter(torch.zeros(H))
        self.b_f = nn.Parameter(torch.zeros(H))

    def forward(self, x):
        z, f, r = self.W(x).chunk(3, -1)
        c, outputs = x.new_zeros(x.shape[0], H), []
        for t in range(x.shape[1]):
            forget = torch.sigmoid(f[:, t] + self.v_f * c + self.b_f)
            c = forget * c + (1 - forget) * z[:, t]
            outputs.append(torch.sigmoid(r[:, t]) * torch.tanh(c))
        return torch.stack(outputs, 1)


class MogrifierLSTM(nn.Module):
    """Mogrifier LSTM (Melis et al. 2020): before each LSTMCell step, x and h gate each other
    for five rounds, ``x *= 2 sigmoid(Q h)`` then ``h *= 2 sigmoid(R x)``, alternating.

    Every weight is in the loop by the pass's rule (Q reads h; R, and the cell's W_ih,
    read an x already gated by h). Only the cell's W_hh gets its own output back through
    no other weight: the hidden -> hidden matrix. Q (H -> I), R (I -> H) and W_ih close
    the loop only through other weights; their input and output neurons differ, so they
    are kind "linear" (embedded separately)."""

    def __init__(self, rounds: int = 5):
        super().__init__()
        self.rounds = rounds
        self.cell = nn.LSTMCell(I, H)
        self.mogrifier_list = nn.ModuleList(
            [nn.Linear(H, I) if i % 2 == 0 else nn.Linear(I, H) for i in range(rounds)])

    def mogrify(self, x, h):
        for i, layer in enumerate(self.mogrifier_list):
            if i % 2 == 0:
                x = 2 * torch.sigmoid(layer(h)) * x
            else:
                h = 2 * torch.sigmoid(layer(x)) * h
        return x, h

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            x_t, h = self.mogrify(x[:, t], h)
            h, c = self.cell(x_t, (h, c))
        return h


class TwoPopulationRNN(nn.Module):
    """Excitatory and inhibitory populations with one Linear per block. E->E and I->I get
    their own output back directly (recurrent); E->I and I->E only through each other,
    mapping one population onto the other (kind "linear", embedded separately)."""

    def __init__(self, excitatory: int = 4, inhibitory: int = 2):
        super().__init__()
        self.sizes = (excitatory, inhibitory)
        self.input = nn.Linear(I, excitatory)
        self.ee = nn.Linear(excitatory, excitatory, bias=False)
        self.ei = nn.Linear(inhibitory, excitatory, bias=False)
        self.ie = nn.Linear(excitatory, inhibitory, bias=False)
        self.ii = nn.Linear(inhibitory, inhibitory, bias=False)

    def forward(self, x):
        e, i = x.new_zeros(x.shape[0], self.sizes[0]), x.new_zeros(x.shape[0], self.sizes[1])
        for t in range(x.shape[1]):
            e, i = (torch.relu(self.input(x[:, t]) + self.ee(e) - self.ei(i)),
                    torch.relu(self.ie(e) - self.ii(i)))
        return e


class StatefulGRU(nn.Module):
    """The hidden state carried across forward calls as an attribute (``self.hidden =
    h.detach()``, truncated BPTT over consecutive batches); tracing must not leave a
    traced tensor behind in it."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(I, H, batch_first=True)
        self.fc = nn.Linear(H, O)
        self.hidden = None

    def forward(self, x):
        out, h = self.gru(x, self.hidden)
        self.hidden = h.detach()
        return self.fc(out)


class PackedSequenceLSTM(nn.Module):
    """Variable-length batches: ``pack_padded_sequence`` -> nn.LSTM -> last hidden state.
    The packed batch sizes are data, so torch.export cannot capture it (see NOT_CAPTURED)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H, batch_first=True)
        self.fc = nn.Linear(H, O)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.fc(h[-1])


class BurnInRNN(nn.Module):
    """R2D2-style burn-in: the first steps only warm the state up under ``torch.no_grad()``
    (a region op with its own subgraph in the captured program), the rest train."""

    def __init__(self, burn_in: int = 2):
        super().__init__()
        self.burn_in = burn_in
        self.x2h, self.h2h = nn.Linear(I, H), nn.Linear(H, H)

    def step(self, x_t, h):
        return torch.tanh(self.x2h(x_t) + self.h2h(h))

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        with torch.no_grad():
            for t in range(self.burn_in):
                h = self.step(x[:, t], h)
        for t in range(self.burn_in, x.shape[1]):
            h = self.step(x[:, t], h)
        return h


class AutocastRNN(nn.Module):
    """Mixed precision chosen inside forward: the loop runs under ``torch.autocast``."""

    def __init__(self):
        super().__init__()
        self.x2h, self.h2h = nn.Linear(I, H), nn.Linear(H, H)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for t in range(x.shape[1]):
                h = torch.tanh(self.x2h(x[:, t]) + self.h2h(h))
        return h.float()


class SlicedGatesLSTM(nn.Module):
    """Gates by slicing the pre-activation (a sigmoid on the first three blocks, a tanh on
    the last, then slices again), time-major with a leading length-1 dim."""

    def __init__(self):
        super().__init__()
        self.i2h, self.h2h = nn.Linear(I, 4 * H), nn.Linear(H, 4 * H)

    def forward(self, x):
        h = c = x.new_zeros(1, x.shape[1], H)
        for t in range(x.shape[0]):
            preact = self.i2h(x[t:t + 1]) + self.h2h(h)
            gates, g_t = preact[:, :, :3 * H].sigmoid(), preact[:, :, 3 * H:].tanh()
            i_t, f_t, o_t = gates[:, :, :H], gates[:, :, H:2 * H], gates[:, :, -H:]
            c = torch.mul(c, f_t) + torch.mul(i_t, g_t)
            h = torch.mul(o_t, c.tanh())
        return h[0]


class ViewGatesLSTM(nn.Module):
    """Gates as ``pre.view(B, 4, H).unbind(1)``."""

    def __init__(self):
        super().__init__()
        self.x2h, self.h2h = nn.Linear(I, 4 * H), nn.Linear(H, 4 * H)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            i, f, g, o = (self.x2h(x[:, t]) + self.h2h(h)).view(-1, 4, H).unbind(1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return h


class InOutGatesLSTM(nn.Module):
    """"LSTM by hand" tutorial style: ``x @ W + h @ U + bias`` with U stored (in, out) =
    (H, 4H) and gates sliced from the columns: 4 gates, the block read transposed."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(I, 4 * H) * 0.3)
        self.U = nn.Parameter(torch.randn(H, 4 * H) * 0.3)
        self.bias = nn.Parameter(torch.zeros(4 * H))

    def forward(self, x):
        h_t = c_t = torch.zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            gates = x[:, t, :] @ self.W + h_t @ self.U + self.bias
            i_t, f_t = torch.sigmoid(gates[:, :H]), torch.sigmoid(gates[:, H:2 * H])
            g_t, o_t = torch.tanh(gates[:, 2 * H:3 * H]), torch.sigmoid(gates[:, 3 * H:])
            c_t = f_t * c_t + i_t * g_t
            h_t = o_t * torch.tanh(c_t)
        return h_t


class CDEVectorField(nn.Module):
    """torchcde-style vector field f(t, z): an MLP whose output is viewed as an (H, I) matrix."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(H, width), nn.Linear(width, I * H)

    def forward(self, t, z):
        return self.linear2(self.linear1(z).relu()).tanh().view(z.shape[0], H, I)


class NeuralCDE(nn.Module):
    """Neural CDE (Kidger et al. 2020) with Euler steps: ``z += f(z) @ dX``. Both MLP layers
    are in the loop, each only through the other (the state goes H -> width -> H x I): kind
    "linear"; viewing the output as a matrix is no gate split."""

    def __init__(self):
        super().__init__()
        self.initial, self.func, self.readout = nn.Linear(I, H), CDEVectorField(), nn.Linear(H, O)

    def forward(self, x):
        z = self.initial(x[:, 0])
        for t in range(1, x.shape[1]):
            dX = x[:, t] - x[:, t - 1]
            z = z + (self.func(t, z) @ dX.unsqueeze(-1)).squeeze(-1)
        return self.readout(z)


class StepCharRNN(nn.Module):
    """Char-RNN whose training script steps it: ``output, hidden = model(x_t, hidden)``;
    the recurrence closes outside the model, so the pass needs :func:`char_rnn_loop`."""

    def __init__(self) -> None:
        super().__init__()
        self.i2h = nn.Linear(I + H, H)
        self.i2o = nn.Linear(I + H, O)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor):
        combined = torch.cat((x, hidden), 1)
        return self.i2o(combined), torch.tanh(self.i2h(combined))


def char_rnn_loop(model: nn.Module, line: torch.Tensor) -> torch.Tensor:
    """The training script's loop over the characters of a line (the driver)."""
    hidden = torch.zeros(line.shape[0], H)
    for t in range(line.shape[1]):
        output, hidden = model(line[:, t], hidden)
    return output


class CausalTransformer(nn.Module):
    """nn.TransformerEncoder given a causal mask: PyTorch's own ``is_causal`` detection
    compares mask values, which torch.export refuses; no weight is in a loop."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=4, nhead=1, dim_feedforward=8, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.embed = nn.Linear(I, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.encoder(self.embed(x), mask=mask)


class ClampedIndRNN(nn.Module):
    """IndRNN whose forward clamps the recurrent weights through ``.data`` (as the IndRNN
    reference code does to keep |u| bounded); torch.export lifts the clamped tensor as a
    constant, the recording sees it as the parameter updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.input_weight = nn.Linear(I, H)
        self.weight_hh = nn.Parameter(torch.rand(H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight_hh.data = self.weight_hh.data.clamp(-1.0, 1.0)
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.relu(self.input_weight(x[:, t]) + self.weight_hh * h)
        return h


class LowRankRNN(nn.Module):
    """Low-rank RNN (Mastrogiuseppe & Ostojic 2018): ``J = m n^T / H`` applied as
    ``h @ n @ m.T``; each factor is in the loop only through the other: kind "linear"."""

    def __init__(self, rank: int = 2) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.randn(H, rank))
        self.n = nn.Parameter(torch.randn(H, rank))
        self.input = nn.Linear(I, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = h + 0.5 * (-h + torch.tanh(h) @ self.n @ self.m.T / H + self.input(x[:, t]))
        return h


class InPlaceCatRNN(nn.Module):
    """The cat written in place into a preallocated buffer: ``z[:, :I] = x; z[:, I:] = h``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(I + H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            z = x.new_empty(x.shape[0], I + H)
            z[:, :I] = x[:, t]
            z[:, I:] = h
            h = torch.tanh(self.cell(z))
        return h


@dataclass
class ZooCase:
    """One model style with its example inputs and the targets the pass must find."""

    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    expected: set = field(default_factory=set)
    method: str = "forward"
    targets: object = "recurrent"  # for EXPORT_REFUSES: the way out the ground truth is for
    driver: Callable | None = None  # the training script's step loop, when forward is one step


LSTM_HH, GRU_HH = (4 * H, H), (3 * H, H)

ZOO = [
    ZooCase("tutorial_char_rnn", TutorialCharRNN, lambda: (sequence(),),
            {("i2h.weight", "recurrent", ALL, (I, I + H), 1)}),
    ZooCase("three_way_cat", ThreeWayCatRNN, lambda: (sequence(), torch.randn(B, 2)),
            {("cell.weight", "recurrent", ALL, (I + 2, I + 2 + H), 1)}),
    ZooCase("hidden_first_cat", HiddenFirstCatRNN, lambda: (sequence(),),
            {("rnn_cell.weight", "recurrent", ALL, (0, H), 1)}),
    ZooCase("manual_lstm_chunk", ManualLSTM, lambda: (sequence(),),
            {("gates.weight", "recurrent", ALL, (I, I + H), 4)}),
    ZooCase("elman_two_linear", ElmanRNN, lambda: (sequence(),),
            {("hidden_layer.weight", "recurrent", ALL, ALL, 1)}),
    ZooCase("leaky_ctrnn_noise", LeakyCTRNN, lambda: (torch.randn(T, B, I),),
            {("W_rec.weight", "recurrent", ALL, ALL, 1)}),
    ZooCase("stacked_elman", StackedElman, lambda: (sequence(),),
            {("rec1.weight", "recurrent", ALL, ALL, 1), ("rec2.weight", "recurrent", ALL, ALL, 1)}),
    ZooCase("raw_h_at_W", RawParameterRNN, lambda: (sequence(),),
            {("W_hh", "recurrent", ALL, ALL, 1)}),
    ZooCase("raw_cat_at_W", RawCatMatmulRNN, lambda: (sequence(),),
            {("W", "recurrent", (I, I + H), ALL, 1)}),
    ZooCase("functional_linear", FunctionalLinearRNN, lambda: (sequence(),),
            {("weight_hh", "recurrent", ALL, ALL, 1)}),
    ZooCase("column_vector_W_at_h", ColumnVectorRNN, lambda: (sequence(),),
            {("W", "recurrent", ALL, (I, I + H), 1)}),
    ZooCase("einsum_cat", EinsumRNN, lambda: (sequence(),),
            {("W", "recurrent", (I, I + H), ALL, 1)}),
    ZooCase("orthogonal_parametrized", OrthogonalRNN, lambda: (sequence(),),
            {("recurrent.parametrizations.weight.original", "recurrent", ALL, ALL, 1)}),
    ZooCase("masked_weight", MaskedRNN, lambda: (sequence(),),
            {("weight_hh", "recurrent", ALL, ALL, 1)}),
    ZooCase("rnn_cell_loop", lambda: CellLoop(nn.RNNCell), lambda: (sequence(),),
            {("cell.weight_hh", "recurrent", ALL, ALL, 1)}),
    ZooCase("gru_cell_loop", lambda: CellLoop(nn.GRUCell), lambda: (sequence(),),
            {("cell.weight_hh", "recurrent", ALL, ALL, 3)}),
    ZooCase("lstm_cell_loop", lambda: CellLoop(nn.LSTMCell), lambda: (sequence(),),
            {("cell.weight_hh", "recurrent", ALL, ALL, 4)}),
    ZooCase("lstm_2layer_bidirectional",
            lambda: FusedRNN(nn.LSTM, num_layers=2, bidirectional=True), lambda: (sequence(),),
            {(f"rnn.weight_hh_l{k}{s}", "recurrent", ALL, ALL, 4) for k in (0, 1) for s in ("", "_reverse")}),
    ZooCase("lstm_proj_size", lambda: FusedRNN(nn.LSTM, proj_size=2), lambda: (sequence(),),
            {("rnn.weight_hh_l0", "recurrent", ALL, ALL, 4), ("rnn.weight_hr_l0", "recurrent", ALL, ALL, 1)}),
    ZooCase("gru_module", lambda: FusedRNN(nn.GRU, num_layers=2), lambda: (sequence(),),
            {("rnn.weight_hh_l0", "recurrent", ALL, ALL, 3), ("rnn.weight_hh_l1", "recurrent", ALL, ALL, 3)}),
    ZooCase("tied_lstm_lm", TiedLSTMLanguageModel, lambda: (torch.randint(0, 11, (T, B)),),
            {("rnn.weight_hh_l0", "recurrent", ALL, ALL, 4), ("rnn.weight_hh_l1", "recurrent", ALL, ALL, 4)}),
    ZooCase("greedy_decoder_tied", GreedyDecoder, lambda: (torch.zeros(B, dtype=torch.long),),
            {("cell.weight_hh", "recurrent", ALL, ALL, 3)}),
    ZooCase("conv_lstm", ConvLSTMCell, lambda: (torch.randn(1, T, 2, 4, 4),),
            {("conv.weight", "conv", ALL, (2, 5), 4)}),
    ZooCase("indrnn", IndRNN, lambda: (sequence(),),
            {("recurrent_weight", "elementwise", ALL, ALL, 1)}),
    ZooCase("min_gru", MinGRU, lambda: (sequence(),), set()),
    ZooCase("transformer_encoder", TinyTransformer, lambda: (sequence(),), set()),
    ZooCase("step_method", StepModel, lambda: (sequence(),),
            {("h2h.weight", "recurrent", ALL, ALL, 1)}, method="rollout"),
    ZooCase("awd_weight_drop", WeightDropLSTM, lambda: (sequence(),),
            {("rnn.weight_hh_l0_raw", "recurrent", ALL, ALL, 4)}),
    ZooCase("hand_written_gru", HandWrittenGRU, lambda: (sequence(),),
            {("gates.weight", "recurrent", ALL, (I, I + H), 2),
             ("candidate.weight", "recurrent", ALL, (I, I + H), 1)}),
    ZooCase("script_style_lstm", ScriptStyleLSTM, lambda: (sequence(),),
            {("weight_hh", "recurrent", ALL, ALL, 4)}),
    ZooCase("weight_norm", WeightNormRNN, lambda: (sequence(),),
            {("h2h.parametrizations.weight.original0", "elementwise", ALL, ALL, 1),
             ("h2h.parametrizations.weight.original1", "recurrent", ALL, ALL, 1)}),
    ZooCase("grid_cell_rnn", GridCellRNN, lambda: (torch.randn(B, T, 2), torch.randn(B, O)),
            {("rnn.weight_hh_l0", "recurrent", ALL, ALL, 1)}),
    ZooCase("attention_seq2seq", AttentionSeq2Seq, lambda: (torch.randint(0, 11, (B, 4)),),
            {("encoder.weight_hh_l0", "recurrent", ALL, ALL, 3),
             ("decoder.weight_hh", "recurrent", ALL, ALL, 3),
             ("decoder.weight_ih", "linear", ALL, (I, I + H), 3),
             ("attention.weight", "linear", ALL, ALL, 1)}),
    ZooCase("quasi_rnn", QuasiRNN, lambda: (sequence(),), set()),
    ZooCase("layernorm_lstm", LayerNormLSTM, lambda: (sequence(),),
            {("weight_hh", "recurrent", ALL, ALL, 4)}),
    ZooCase("tuple_state_lstm", TupleStateLSTM,
            lambda: (torch.randn(T, B, I), (torch.zeros(B, H), torch.zeros(B, H))),
            {("weight_hh", "recurrent", ALL, ALL, 4)}),
    ZooCase("block_assembled_dale", BlockAssembledRNN, lambda: (sequence(),),
            {(f"w_{block}", "recurrent", ALL, ALL, 1) for block in ("ee", "ei", "ie", "ii")}),
    ZooCase("bmm_expanded_weights", BatchedWeightRNN, lambda: (sequence(),),
            {("W_rec", "recurrent", ALL, ALL, 1)}),
    ZooCase("ct_rnn_column", ContinuousTimeRNN, lambda: (sequence(),),
            {("W", "recurrent", ALL, ALL, 1)}),
    ZooCase("sru", SimpleRecurrentUnit, lambda: (sequence(),),
            {("v_f", "elementwise", ALL, ALL, 1)}),
    ZooCase("mogrifier_lstm", MogrifierLSTM, lambda: (sequence(),),
            {("cell.weight_hh", "recurrent", ALL, ALL, 4), ("cell.weight_ih", "linear", ALL, ALL, 4)}
            | {(f"mogrifier_list.{i}.weight", "linear", ALL, ALL, 1) for i in range(5)}),
    ZooCase("two_populations", TwoPopulationRNN, lambda: (sequence(),),
            {("ee.weight", "recurrent", ALL, ALL, 1), ("ii.weight", "recurrent", ALL, ALL, 1),
             ("ei.weight", "linear", ALL, ALL, 1), ("ie.weight", "linear", ALL, ALL, 1)}),
    ZooCase("stateful_hidden", StatefulGRU, lambda: (sequence(),),
            {("gru.weight_hh_l0", "recurrent", ALL, ALL, 3)}),
    ZooCase("no_grad_burn_in", BurnInRNN, lambda: (sequence(),),
            {("h2h.weight", "recurrent", ALL, ALL, 1)}),
    ZooCase("autocast_inside", AutocastRNN, lambda: (sequence(),),
            {("h2h.weight", "recurrent", ALL, ALL, 1)}),
    ZooCase("sliced_gates_lstm", SlicedGatesLSTM, lambda: (torch.randn(T, B, I),),
            {("h2h.weight", "recurrent", ALL, ALL, 4)}),
    ZooCase("view_gates_lstm", ViewGatesLSTM, lambda: (sequence(),),
            {("h2h.weight", "recurrent", ALL, ALL, 4)}),
    ZooCase("in_out_gates_lstm", InOutGatesLSTM, lambda: (sequence(),),
            {("U", "recurrent", ALL, ALL, 4)}),
    ZooCase("neural_cde", NeuralCDE, lambda: (sequence(steps=T + 1),),
            {("func.linear1.weight", "linear", ALL, ALL, 1), ("func.linear2.weight", "linear", ALL, ALL, 1)}),
]

ZOO += [
    ZooCase("char_rnn_script_loop", StepCharRNN, lambda: (sequence(),),
            {("i2h.weight", "recurrent", ALL, (I, I + H), 1)}, driver=char_rnn_loop),
    ZooCase("in_place_cat", InPlaceCatRNN, lambda: (sequence(),),
            {("cell.weight", "recurrent", ALL, (I, I + H), 1)}),
    ZooCase("low_rank_rnn", LowRankRNN, lambda: (sequence(),),
            {("m", "linear", ALL, ALL, 1), ("n", "linear", ALL, ALL, 1)}),
]

# Models torch.export refuses; the recording on the real values captures them. The way out
# in ``targets`` (no tracing) must give ``expected`` too. They are part of ZOO.
EXPORT_REFUSES = [
    ZooCase("packed_sequence", PackedSequenceLSTM, lambda: (sequence(), torch.tensor([T, T - 1])),
            {("lstm.weight_hh_l0", "recurrent", ALL, ALL, 4)}, targets="types"),
    ZooCase("data_dependent_exit", DataDependentRNN, lambda: (sequence(),),
            {("cell.weight_hh", "recurrent", ALL, ALL, 1)}, targets="types"),
    ZooCase("transformer_is_causal", CausalTransformer, lambda: (sequence(),), set(), targets="types"),
    ZooCase("indrnn_data_clamp", ClampedIndRNN, lambda: (sequence(),),
            {("weight_hh", "elementwise", ALL, ALL, 1)}, targets=["weight_hh"]),
]
ZOO += EXPORT_REFUSES
