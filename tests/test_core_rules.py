"""Rule table: coverage list, index-map properties, per-family equivalence."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import prunec
from prunec.registry import Registry
from prunec.rules import RULES, OpRule, coupling_rule, covered_ops, no_sizes
from prunec.rules.shape import reshape_blocks
from tests.conftest import assert_verified

DATA = Path(__file__).parent / "data"


def test_covered_ops_match_checked_in_list() -> None:
    expected = (DATA / "covered_ops.txt").read_text().splitlines()
    assert covered_ops() == expected, "rule table changed: update tests/data/covered_ops.txt"


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.data())
def test_reshape_blocks_pair_equal_products(src: list[int], data: st.DataObject) -> None:
    """Each block pairs runs of dims with equal products; all non-1 dims are covered once."""
    total = int(np.prod(src))
    factors = data.draw(st.permutations(src))
    dst = list(factors)
    blocks = reshape_blocks(tuple(src), tuple(dst))
    assert blocks is not None or np.prod(dst) != total
    if blocks is not None:
        for a, b in blocks:
            assert np.prod([src[i] for i in a]) == np.prod([dst[j] for j in b])
        assert sorted(i for a, _ in blocks for i in a if src[i] > 1) == [i for i, s in enumerate(src) if s > 1]


@settings(max_examples=25, derandomize=True, deadline=None)
@given(st.sampled_from([(2, 3), (4, 2), (3, 4), (2, 8)]), st.integers(1, 3))
def test_split_carrier_is_where_arange_lands(factors: tuple[int, int], batch: int) -> None:
    """Fill with arange (each value its own index): a head unit owns exactly the indices
    that the reshape puts into that head."""
    heads, head_dim = factors

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, heads * head_dim)
            self.out = nn.Linear(heads * head_dim, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.proj(x).view(x.shape[0], heads, head_dim)
            return self.out(torch.relu(y).reshape(x.shape[0], heads * head_dim))

    coupling = prunec.analyze(Split(), torch.randn(batch, 4))
    group = next(g for g in coupling.groups if ("proj.weight", 0) in g.members)
    rows = group.members[("proj.weight", 0)]
    landed = torch.arange(heads * head_dim).view(heads, head_dim)
    assert group.kind == "head"
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, landed.tolist()))


class Families(nn.Module):
    """One model touching many rule families: depthwise, grouped conv, group norm, SE scale,
    cat/chunk/split, flatten → linear, permuted layer norm, hardswish, max/avg pool."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # depthwise, multiplier 2
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 32)
        self.se_reduce, self.se_expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.branch_a, self.branch_b = nn.Conv2d(32, 12, 1), nn.Conv2d(32, 20, 1)
        self.mix = nn.Conv2d(32, 24, 1)
        self.ln = nn.LayerNorm(24)
        self.pw = nn.Linear(24, 48)
        self.pw2 = nn.Linear(48, 24)
        self.head = nn.Linear(24 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = nn.functional.hardswish(self.dw(x))
        x = self.gn(self.grouped(x))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = x * s
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        a, b = x.split([16, 16], dim=1)
        x = self.mix(torch.cat([b, a], dim=1))
        x = nn.functional.max_pool2d(x, 2)
        y = x.permute(0, 2, 3, 1)
        y = y + self.pw2(nn.functional.gelu(self.pw(self.ln(y))))
        x = nn.functional.adaptive_avg_pool2d(y.permute(0, 3, 1, 2), 2)
        return self.head(torch.flatten(x, 1))


def test_families_exact_after_pruning() -> None:
    model = Families().eval()
    result = prunec.compile(model, torch.randn(2, 3, 8, 8), channels=0.5, round_to=1)
    assert_verified(result)
    kinds = {g["kind"] for g in result.report["groups"]}
    assert {"channel", "mlp", "hidden"} <= kinds
    # forward() splits with constants [16, 16]: the eager class can't follow, the program can
    assert not result.report["module_synced"] and "split" in result.report["module_note"]
    state = result.program.state_dict()
    assert state["head.weight"].shape[0] == 5  # model outputs are never pruned
    assert state["grouped.weight"].shape[0] < 32 and state["grouped.weight"].shape[1] == 8
    assert state["dw.weight"].shape[0] == 2 * state["stem.weight"].shape[0]  # multiplier kept
    # the LayerNorm-read residual group is approximate: not pruned by --channels
    hidden = [g for g in result.report["groups"] if g["kind"] == "hidden"]
    assert hidden and all(g["kept"] == g["size"] for g in hidden)
    assert "layer_norm" in hidden[0]["approximate"]


def test_hidden_pruning_is_flagged_approximate() -> None:
    model = Families().eval()
    result = prunec.compile(model, torch.randn(2, 3, 8, 8), hidden=0.25, round_to=1)
    v = result.report["verify"]
    assert v["passed"] and not v["exact"] and v["approximate_groups"]


def test_unknown_op_freezes_with_node_and_module() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.cumsum(self.a(x), dim=-1))  # cumsum has no rule

    coupling = prunec.analyze(Odd(), torch.randn(2, 8))
    assert "aten.cumsum.default" in coupling.unknown_ops
    assert not any(("a.weight", 0) in g.members for g in coupling.groups)
    why = coupling.frozen["a.weight@0"]
    assert "no coupling rule for aten.cumsum.default" in why and "cumsum" in why


def test_coupling_graph_is_networkx() -> None:
    model = Families().eval()
    graph = prunec.analyze(model, torch.randn(2, 3, 8, 8)).to_networkx()
    assert graph.number_of_edges() > 10
    assert any("group" in data for _, data in graph.nodes(data=True))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9])
def test_ratios_never_empty_groups(ratio: float) -> None:
    result = prunec.compile(Families().eval(), torch.randn(2, 3, 8, 8), channels=ratio, round_to=1)
    assert all(g["kept"] >= 1 for g in result.report["groups"])
    assert_verified(result)


class StdConv(nn.Conv2d):
    """Weight standardisation (timm ScaledStdConv2d): batch statistics over in-channels × kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                     training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return nn.functional.conv2d(x, w, self.bias, padding=1)


def test_weight_standardisation_makes_input_channels_approximate() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), StdConv(16, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    result = prunec.compile(model, torch.randn(1, 3, 6, 6), channels=0.5, round_to=1)
    assert_verified(result)
    groups = {g["name"]: g for g in result.report["groups"]}
    assert groups["0.weight@0"]["kind"] == "hidden" and "batch statistics" in groups["0.weight@0"]["approximate"]
    assert groups["2.weight@0"]["kept"] == 4  # its output channels are still exact to prune


def test_a_dim_split_between_groups_gets_unique_names() -> None:
    class Mixed(nn.Module):  # MixNet: one conv's channels split to convs of different kernels
        def __init__(self) -> None:
            super().__init__()
            self.pw = nn.Conv2d(3, 16, 1)
            self.k3, self.k5 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 5, padding=2, groups=8)
            self.out = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.split(self.pw(x), [8, 8], dim=1)
            return self.out(torch.cat([self.k3(a), self.k5(b)], dim=1))

    result = prunec.compile(Mixed().eval(), torch.randn(1, 3, 8, 8), channels=0.5, round_to=1)
    names = [g["name"] for g in result.report["groups"]]
    assert len(names) == len(set(names)) and "pw.weight@0#1" in names
    assert_verified(result)


# -- the rule table: every op's coupling rule comes with its shape fixer -------------------------

# argument names that hold sizes of (possibly pruned) dims: an op taking one needs a real fixer
SIZE_ARGS = {"size", "sizes", "shape", "split_size", "split_sizes", "sections", "indices", "chunks",
             "normalized_shape", "groups", "num_groups", "end", "output_size", "hidden_size"}
# ops whose size arguments only describe dims their rule freezes (spatial dims of pools/upsampling)
SIZES_OF_FROZEN_DIMS = {"output_size"}


def _sized_args(op: object) -> set[str]:
    schema = getattr(op, "_schema", None)
    if schema is None:
        return set()
    return {a.name for a in schema.arguments[1:] if "int" in str(a.type).lower()} & SIZE_ARGS


@pytest.mark.parametrize("op", sorted(RULES, key=str), ids=str)
def test_every_rule_has_a_fixer(op: object) -> None:
    """One table: each entry couples dims and fixes sizes; `no_sizes` only where no arg is a size."""
    entry = RULES[op]
    assert isinstance(entry, OpRule) and callable(entry.couple) and callable(entry.fix)
    sized = _sized_args(op)
    if entry.fix is no_sizes:
        frozen_ok = sized <= SIZES_OF_FROZEN_DIMS and ("pool" in str(op) or "upsample" in str(op))
        assert not sized or frozen_ok, f"{op} takes size arguments {sized} but declares fix=no_sizes"


def test_rule_without_fixer_cannot_be_registered() -> None:
    with pytest.raises(TypeError):
        coupling_rule(torch.ops.aten.cumsum.default)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="duplicate"):
        coupling_rule(torch.ops.aten.linear.default, fix=no_sizes)(lambda node, g: None)
    assert torch.ops.aten.cumsum.default not in RULES


def test_registry_rejects_duplicates() -> None:
    table: Registry[int] = Registry("thing")
    table.register("a", "b")(1)
    assert table["a"] == 1 and "b" in table and len(table) == 2
    with pytest.raises(ValueError, match="duplicate thing for a"):
        table.add("a", 2)


@pytest.mark.parametrize("how", ["sections", "indices"])
def test_tensor_split_is_fixed_and_verified(how: str) -> None:
    """tensor_split had a rule but no fixer: pruning across its parts must rewrite the sizes."""
    class TensorSplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            p, q = torch.tensor_split(h, 2, dim=1) if how == "sections" else torch.tensor_split(h, [8], dim=1)
            return self.b(p) + self.c(q)

    result = prunec.compile(TensorSplit().eval(), torch.randn(4, 6), channels=0.5, round_to=1)
    assert_verified(result)
    assert result.program.state_dict()["a.weight"].shape[0] < 16
    assert result.program.state_dict()["b.weight"].shape[1] < 8
