"""Layers outside the classic CNN/transformer families: each one pruned, verified and synced.

Every case is a tiny `producer → layer → consumer` model: the layer's dims that a rule ties to the
producer must shrink, the compile's verifier must pass exactly, and the user's module class must
follow (attributes updated, output equal to the pruned program, also at another batch size).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import prunec
from prunec.rules.contraction import parse_einsum
from tests.conftest import assert_verified


class Sandwich(nn.Module):
    """conv/linear → layer → conv/linear, so the layer's channels are prunable."""

    def __init__(self, first: nn.Module, layer: nn.Module | Callable, last: nn.Module) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.layer = layer if isinstance(layer, nn.Module) else None
        self.fn = None if isinstance(layer, nn.Module) else layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = self.layer(h) if self.layer is not None else self.fn(h)
        return self.last(h)


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.RNNBase, out_features: int) -> None:
        super().__init__()
        self.embed, self.rnn = nn.Linear(5, rnn.input_size), rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(torch.tanh(self.embed(x)))
        return self.head(y)


class CellLoop(nn.Module):
    """nn.LSTMCell / GRUCell / RNNCell stepped over time in Python (unrolled by torch.export)."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.embed, self.cell, self.head = nn.Linear(5, cell.input_size), cell, nn.Linear(cell.hidden_size, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            step = torch.tanh(self.embed(x[:, t]))
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(step, (h, c))
            else:
                h = self.cell(step, h)
        return self.head(h)


class EinsumAttention(nn.Module):
    """Attention written with einsum, heads split by view (as in many research codebases)."""

    def __init__(self, dim: int = 16, head_dim: int = 4) -> None:
        super().__init__()
        self.head_dim = head_dim  # the number of heads follows q's rows, so the class can be pruned
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim) for p in (self.q, self.k, self.v))
        a = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        y = x + self.o(torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, -1))
        w = self.up.weight  # an einsum contraction with a weight: exact, like linear
        return y + self.down(torch.relu(torch.einsum("bnd,hd->bnh", y, w) + self.up.bias))


class Baddbmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(1, 8, 10))
        self.bias = nn.Parameter(torch.randn(10))
        self.out = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w.expand(x.shape[0], -1, -1)
        return self.out(torch.relu(torch.baddbmm(self.bias, self.a(x), w)))


class Lookups(nn.Module):
    """index_select / gather along the token dim while the feature dim is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("order", torch.tensor([3, 1, 0, 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))                      # (n, t, 16)
        h = torch.index_select(h, 1, self.order)
        idx = torch.argsort(x[..., :1], dim=1).expand_as(h)  # token order from the input
        return self.b(torch.gather(h, 1, idx) + h)


class Factories(nn.Module):
    """Tensors built from a pruned dim's size: zeros, full, new_zeros, ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        z = torch.zeros(h.shape[0], h.shape[1]) + torch.full((h.shape[1],), 0.5)
        return self.b(torch.relu(h + z + h.new_zeros(h.shape) + torch.ones_like(h)))


def upsample(**kw: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: F.interpolate(h, **kw)


def conv_t(dims: int, c_in: int, c_out: int, **kw: Any) -> nn.Module:
    return getattr(nn, f"ConvTranspose{dims}d")(c_in, c_out, 3, **kw)


def conv(dims: int, c_in: int, c_out: int, k: int = 1) -> nn.Module:
    return getattr(nn, f"Conv{dims}d")(c_in, c_out, k)


def old_weight_norm(m: nn.Module) -> nn.Module:
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(m)


@dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    shape: tuple[int, ...]
    shrinks: list[tuple[str, int]]                    # (state fqn, dim) that must get smaller
    synced: Callable[[nn.Module], bool] = lambda m: True  # module attributes follow the tensors
    options: dict[str, Any] = field(default_factory=lambda: {"channels": 0.5})


CASES = [
    Case("conv_transpose1d", lambda: Sandwich(conv(1, 3, 8), conv_t(1, 8, 6), conv(1, 6, 4)), (2, 3, 9),
         [("layer.weight", 0), ("layer.weight", 1)],
         lambda m: m.layer.in_channels == m.layer.weight.shape[0] < 8 and m.layer.out_channels < 6),
    Case("conv_transpose2d_groups_output_padding",
         lambda: Sandwich(conv(2, 3, 8), conv_t(2, 8, 12, stride=2, output_padding=1, groups=4), conv(2, 12, 4)),
         (2, 3, 6, 6), [("layer.weight", 0), ("layer.bias", 0)],
         lambda m: m.layer.groups < 4 and m.layer.out_channels == 3 * m.layer.groups),
    Case("conv_transpose3d_depthwise", lambda: Sandwich(conv(3, 3, 8), conv_t(3, 8, 16, groups=8), conv(3, 16, 4)),
         (1, 3, 4, 4, 4), [("layer.weight", 0)], lambda m: m.layer.groups == m.layer.in_channels < 8),
    Case("prelu_per_channel", lambda: Sandwich(conv(2, 3, 8), nn.PReLU(8), conv(2, 8, 4)), (2, 3, 5, 5),
         [("layer.weight", 0), ("first.weight", 0)], lambda m: m.layer.num_parameters < 8),
    Case("prelu_single", lambda: Sandwich(conv(2, 3, 8), nn.PReLU(), conv(2, 8, 4)), (2, 3, 5, 5),
         [("first.weight", 0)], lambda m: m.layer.num_parameters == 1),
    Case("pixel_shuffle", lambda: Sandwich(conv(2, 3, 32), nn.PixelShuffle(2), conv(2, 8, 4)), (2, 3, 4, 4),
         [("first.weight", 0), ("last.weight", 1)]),
    Case("pixel_unshuffle", lambda: Sandwich(conv(2, 3, 8), nn.PixelUnshuffle(2), conv(2, 32, 4)), (2, 3, 4, 4),
         [("first.weight", 0), ("last.weight", 1)]),
    Case("lstm_stacked_bidirectional",
         lambda: Recurrent(nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True), 3), (2, 4, 5),
         [("rnn.weight_ih_l0", 0), ("rnn.weight_hh_l1_reverse", 1), ("rnn.weight_ih_l1", 1),
          ("rnn.weight_ih_l0", 1), ("head.weight", 1)],
         lambda m: m.rnn.hidden_size < 16 and m.rnn.input_size < 8),
    Case("gru", lambda: Recurrent(nn.GRU(8, 16), 3), (4, 2, 5), [("rnn.weight_hh_l0", 0), ("rnn.bias_hh_l0", 0)],
         lambda m: m.rnn.hidden_size < 16),
    Case("rnn_tanh", lambda: Recurrent(nn.RNN(8, 16, num_layers=2), 3), (4, 2, 5), [("rnn.weight_hh_l1", 1)],
         lambda m: m.rnn.hidden_size < 16),
    Case("rnn_relu", lambda: Recurrent(nn.RNN(8, 16, nonlinearity="relu", bidirectional=True), 3), (4, 2, 5),
         [("rnn.weight_hh_l0_reverse", 1)], lambda m: m.rnn.hidden_size < 16),
    Case("lstm_cell", lambda: CellLoop(nn.LSTMCell(8, 16)), (2, 3, 5),
         [("cell.weight_ih", 0), ("cell.weight_hh", 1), ("cell.weight_ih", 1)],
         lambda m: m.cell.hidden_size < 16 and m.cell.input_size < 8),
    Case("gru_cell", lambda: CellLoop(nn.GRUCell(8, 16)), (2, 3, 5), [("cell.weight_hh", 0)],
         lambda m: m.cell.hidden_size < 16),
    Case("rnn_cell", lambda: CellLoop(nn.RNNCell(8, 16)), (2, 3, 5), [("cell.bias_hh", 0)],
         lambda m: m.cell.hidden_size < 16),
    Case("einsum_heads", EinsumAttention, (2, 5, 16), [("q.weight", 0), ("v.weight", 0), ("o.weight", 1)],
         options={"heads": 0.5}),
    Case("einsum_weight", EinsumAttention, (2, 5, 16), [("up.weight", 0), ("down.weight", 1)]),
    Case("baddbmm", Baddbmm, (3, 4, 6), [("a.weight", 0), ("w", 1), ("w", 2), ("bias", 0)]),
    Case("index_select_gather", Lookups, (2, 4, 6), [("a.weight", 0), ("b.weight", 1)]),
    Case("factories", Factories, (3, 6), [("a.weight", 0), ("b.weight", 1)]),
    Case("upsample_nearest1d", lambda: Sandwich(conv(1, 3, 8), upsample(scale_factor=2), conv(1, 8, 4)), (2, 3, 5),
         [("first.weight", 0)]),
    Case("upsample_linear1d_size", lambda: Sandwich(conv(1, 3, 8), upsample(size=7, mode="linear"), conv(1, 8, 4)),
         (2, 3, 5), [("first.weight", 0)]),
    Case("upsample_bicubic2d", lambda: Sandwich(conv(2, 3, 8), upsample(scale_factor=2, mode="bicubic"), conv(2, 8, 4)),
         (2, 3, 4, 4), [("first.weight", 0)]),
    Case("upsample_nearest_exact2d",
         lambda: Sandwich(conv(2, 3, 8), upsample(scale_factor=1.5, mode="nearest-exact"), conv(2, 8, 4)),
         (2, 3, 4, 4), [("first.weight", 0)]),
    Case("upsample_bilinear2d_aa",
         lambda: Sandwich(conv(2, 3, 8), upsample(size=(3, 3), mode="bilinear", antialias=True), conv(2, 8, 4)),
         (2, 3, 6, 6), [("first.weight", 0)]),
    Case("upsample_trilinear3d",
         lambda: Sandwich(conv(3, 3, 8), upsample(scale_factor=2, mode="trilinear"), conv(3, 8, 4)),
         (1, 3, 3, 3, 3), [("first.weight", 0)]),
    Case("upsample_nearest3d", lambda: Sandwich(conv(3, 3, 8), upsample(size=(4, 5, 6)), conv(3, 8, 4)),
         (1, 3, 3, 3, 3), [("first.weight", 0)]),
    Case("weight_norm_parametrization",
         lambda: Sandwich(conv(1, 3, 8), parametrizations.weight_norm(conv(1, 8, 8, 3)), conv(1, 8, 4)), (2, 3, 9),
         [("layer.parametrizations.weight.original1", 0), ("layer.parametrizations.weight.original1", 1),
          ("layer.parametrizations.weight.original0", 0)],
         lambda m: m.layer.out_channels < 8 and m.layer.in_channels < 8),
    Case("weight_norm_hook", lambda: Sandwich(conv(1, 3, 8), old_weight_norm(conv(1, 8, 8, 3)), conv(1, 8, 4)),
         (2, 3, 9), [("layer.weight_v", 0), ("layer.weight_v", 1), ("layer.weight_g", 0)],
         lambda m: m.layer.out_channels < 8 and m.layer.in_channels < 8),
    Case("spectral_norm_parametrization",
         lambda: Sandwich(nn.Linear(6, 16), parametrizations.spectral_norm(nn.Linear(16, 12)), nn.Linear(12, 3)),
         (4, 6), [("layer.parametrizations.weight.original", 0), ("layer.parametrizations.weight.original", 1),
                  ("layer.parametrizations.weight.0._u", 0), ("layer.parametrizations.weight.0._v", 0)],
         lambda m: m.layer.out_features < 12 and m.layer.in_features < 16),
    Case("spectral_norm_hook",
         lambda: Sandwich(nn.Linear(6, 16), torch.nn.utils.spectral_norm(nn.Linear(16, 12)), nn.Linear(12, 3)),
         (4, 6), [("layer.weight_orig", 0), ("layer.weight_orig", 1), ("layer.weight_u", 0)],
         lambda m: m.layer.out_features < 12 and m.layer.in_features < 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_layer_is_pruned_verified_and_synced(case: Case) -> None:
    model = case.model().eval()
    x = torch.randn(*case.shape)
    result = prunec.compile(model, x, round_to=1, **case.options)
    report = result.report
    assert report["unknown_ops"] == {}, report["unknown_ops"]
    assert_verified(result)
    before = dict(model.state_dict())
    after = result.program.state_dict()
    for fqn, dim in case.shrinks:
        assert after[fqn].shape[dim] < before[fqn].shape[dim], (fqn, dim, after[fqn].shape)
    assert report["macs_after"] < report["macs_before"]
    assert report["module_synced"], report["module_note"]
    synced = result.model
    assert case.synced(synced)
    other = torch.randn(case.shape[0] + 1, *case.shape[1:]) if case.name not in ("gru", "rnn_tanh", "rnn_relu") \
        else torch.randn(case.shape[0], case.shape[1] + 1, *case.shape[2:])  # (T, N, F): another batch size
    with torch.no_grad():
        torch.testing.assert_close(synced(x), result.program(x), rtol=1e-4, atol=1e-5)
        y, want = synced(other), model(other)  # the synced class is a real module: any batch size
    assert y.shape == want.shape and bool(torch.isfinite(y).all())


# -- index maps, checked by filling tensors with arange (each value is its own index) ------------

@settings(max_examples=12, derandomize=True, deadline=None)
@given(st.integers(2, 3), st.integers(1, 3), st.booleans())
def test_pixel_shuffle_units_are_where_arange_lands(c: int, r: int, unshuffle: bool) -> None:
    """Each unit of the coupling owns exactly the r² shuffled channels that one merged channel's
    values land in (found by shuffling an arange)."""
    shape = (1, c, 2 * r, 2 * r) if unshuffle else (1, c * r * r, 2, 2)
    x = torch.arange(float(torch.Size(shape).numel())).view(shape)
    y = F.pixel_unshuffle(x, r) if unshuffle else F.pixel_shuffle(x, r)
    shuffled, merged = (y, x) if unshuffle else (x, y)
    channel_of = {float(v): ch for ch in range(shuffled.shape[1]) for v in shuffled[0, ch].flatten()}
    landed = sorted(tuple(sorted({channel_of[float(v)] for v in merged[0, k].flatten()}))
                    for k in range(merged.shape[1]))
    layer = nn.PixelUnshuffle(r) if unshuffle else nn.PixelShuffle(r)
    model = Sandwich(conv(2, 3, shape[1]), layer, conv(2, y.shape[1], 4)).eval()
    coupling = prunec.analyze(model, torch.randn(*shape[:1], 3, *shape[2:]))
    side = ("last.weight", 1) if unshuffle else ("first.weight", 0)  # the shuffled side's weight dim
    group = next(g for g in coupling.groups if side in g.members)
    assert sorted(tuple(sorted(u)) for u in group.members[side].tolist()) == landed


@pytest.mark.parametrize("equation, shapes", [
    ("bqhd,bkhd->bhqk", [(2, 3, 4, 5), (2, 6, 4, 5)]),
    ("ij,jk", [(2, 3), (3, 4)]),
    ("...ij,...jk->...ik", [(5, 2, 3), (5, 3, 4)]),
    ("b...d,d->b...", [(2, 3, 4, 6), (6,)]),
    ("ii->i", [(3, 3)]),
])
def test_parse_einsum_gives_the_output_labels_torch_uses(equation: str, shapes: list[tuple[int, ...]]) -> None:
    """The labelled output dims have the sizes torch.einsum produces."""
    ops = [torch.randn(*s) for s in shapes]
    parsed = parse_einsum(equation, [len(s) for s in shapes])
    assert parsed is not None
    inputs, out = parsed
    size = {lab: s[d] for labels, s in zip(inputs, shapes) for d, lab in enumerate(labels)}
    assert tuple(size[lab] for lab in out) == tuple(torch.einsum(equation, *ops).shape)
