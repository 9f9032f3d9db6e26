"""Random architectures for fuzzing the compiler (tests/test_fuzz.py, bench/fuzz.py).

``random_spec(rng)`` draws a JSON-able recipe; ``build(spec)`` turns it into an ``nn.Module``.
A recipe is a conv trunk (residual adds, concat, split/chunk, grouped and depthwise convs,
BN/GN/LN, SE gates, pooling, a conv called twice, a conv shared by two branches, permutes to a
channels-last linear) and a head: flatten → linear, global pool → linear, or tokens → attention
blocks (nn.MultiheadAttention or a reshape-to-heads attention, tied linear weights).
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

Spec = dict[str, Any]
TRUNK = ("residual", "concat", "split", "chunk_gate", "grouped", "depthwise", "bn", "gn", "ln",
         "se", "pool", "twice", "shared", "permute_linear")
HEADS = ("flatten", "gap", "mha", "attention")
METHODS = ("l1", "l1", "l1", "l2", "bn", "taylor", "activation", "wanda", "thinet", "lasso")
DATA_METHODS = ("taylor", "activation", "wanda", "thinet", "lasso")  # get calib=[example]


def random_spec(rng: random.Random) -> Spec:
    """A random recipe: input size, trunk blocks, head, and compile flags."""
    c = rng.choice((4, 6, 8, 12, 16))
    blocks = [rng.choice(TRUNK) for _ in range(rng.randint(1, 5))]
    head = rng.choice(HEADS)
    flags: dict[str, Any] = {"method": rng.choice(METHODS), "round_to": rng.choice((1, 1, 1, 2, 8))}
    for kind in ("channels", "mlp", "heads", "hidden", "layers"):
        if rng.random() < 0.6:
            flags[kind] = rng.choice((0.1, 0.25, 0.5, 0.75) if kind != "layers" else (0.25, 0.5))
    return {"c": c, "hw": rng.choice((6, 8)), "batch": rng.choice((1, 2)), "blocks": blocks,
            "head": head, "tied": rng.random() < 0.5, "flags": flags,
            "widths": [rng.choice((4, 6, 8, 16)) for _ in blocks], "seed": rng.randrange(2**31)}


def _groups(a: int, b: int) -> int:
    """Largest of 4, 2, 1 dividing both."""
    return next(g for g in (4, 2, 1) if a % g == 0 and b % g == 0)


class Residual(nn.Module):
    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.Conv2d(w, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.bn(self.a(x))))


class Concat(nn.Module):
    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, w, 1), nn.Conv2d(c, c, 3, padding=1)
        self.out = w + c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)


class Split(nn.Module):
    """split into [c - k, k], transform the first part, concatenate back."""

    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.k = max(1, c // 4)
        self.a = nn.Conv2d(c - self.k, w, 3, padding=1)
        self.out = w + self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [x.shape[1] - self.k, self.k], dim=1)
        return torch.cat([torch.relu(self.a(a)), b], dim=1)


class ChunkGate(nn.Module):
    """GLU-style: conv to 2w, chunk, a * sigmoid(b)."""

    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, 2 * w, 1)
        self.out = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x).chunk(2, dim=1)
        return a * torch.sigmoid(b)


class SE(nn.Module):
    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, w, 1), nn.Conv2d(w, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class ChannelLN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Twice(nn.Module):
    """One conv module called twice in a row."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


class Shared(nn.Module):
    """One conv shared by two branches that are added."""

    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, w, 3, padding=1)
        self.out = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv(torch.relu(x))


class PermuteLinear(nn.Module):
    def __init__(self, c: int, w: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, w)
        self.out = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class Pool(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class HeadAttention(nn.Module):
    """q, k, v linears → view to heads → SDPA → merge → out linear (optionally tied to q)."""

    def __init__(self, d: int, heads: int, tied: bool) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        if tied:
            self.o.weight = self.q.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, seq, d = x.shape
        split = lambda t: t.view(n, seq, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(n, seq, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, d: int, kind: str, tied: bool) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        heads = 4 if d % 4 == 0 else 2 if d % 2 == 0 else 1
        self.mha = kind == "mha"
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True) if self.mha else HeadAttention(d, heads, tied)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.mha else self.attn(h))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.n2(x))))


class Fuzzed(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        c, hw = spec["c"], spec["hw"]
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        trunk: list[nn.Module] = []
        for kind, w in zip(spec["blocks"], spec["widths"]):
            block, c, hw = _trunk_block(kind, c, w, hw)
            trunk.append(block)
        self.trunk = nn.Sequential(*trunk)
        self.head_kind = spec["head"]
        if self.head_kind == "flatten":
            self.fc1, self.fc2 = nn.Linear(c * hw * hw, 16), nn.Linear(16, 5)
        elif self.head_kind == "gap":
            self.fc1, self.fc2 = nn.Linear(c, 12), nn.Linear(12, 5)
            if spec["tied"] and c == 12:
                self.fc2.weight = nn.Parameter(self.fc1.weight[:5].clone())
        else:
            d = 2 * c
            self.proj = nn.Linear(c, d)
            self.blocks = nn.Sequential(Block(d, self.head_kind, spec["tied"]),
                                        Block(d, self.head_kind, spec["tied"]))
            self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(torch.relu(self.stem(x)))
        if self.head_kind == "flatten":
            return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))
        if self.head_kind == "gap":
            return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return self.fc(self.norm(self.blocks(tokens)).mean(1))


def _trunk_block(kind: str, c: int, w: int, hw: int) -> tuple[nn.Module, int, int]:
    """One trunk block and the channels and spatial size after it."""
    if kind == "residual":
        return Residual(c, w), c, hw
    if kind in ("concat", "split", "chunk_gate", "shared", "permute_linear"):
        cls = {"concat": Concat, "split": Split, "chunk_gate": ChunkGate, "shared": Shared,
               "permute_linear": PermuteLinear}[kind]
        block = cls(c, w)
        return block, block.out, hw
    if kind == "grouped":
        g = _groups(c, w)
        return nn.Sequential(nn.Conv2d(c, w, 3, padding=1, groups=g), nn.ReLU()), w, hw
    if kind == "depthwise":
        return nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), nn.BatchNorm2d(2 * c)), 2 * c, hw
    if kind == "bn":
        return nn.BatchNorm2d(c), c, hw
    if kind == "gn":
        return nn.GroupNorm(_groups(c, c), c), c, hw
    if kind == "ln":
        return ChannelLN(c), c, hw
    if kind == "se":
        return SE(c, w), c, hw
    if kind == "pool":
        return (Pool("max" if hw % 4 == 0 else "avg"), c, hw // 2) if hw >= 4 else (nn.Identity(), c, hw)
    if kind == "twice":
        return Twice(c), c, hw
    raise ValueError(kind)


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor]:
    """The model (eval mode, BN statistics randomised) and an example input for ``spec``."""
    torch.manual_seed(spec["seed"])
    model = Fuzzed(spec).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d,)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
    return model, torch.randn(spec["batch"], 3, spec["hw"], spec["hw"])


def run_case(spec: Spec) -> str:
    """Compile one recipe and check the contract. Returns 'verified', 'verified-pinned' (the
    returned ProgramModule only runs at the example's batch: its trace is static and the
    batch-dynamic re-trace failed, with the reason in report["dynamic"]) or
    'error: <one line>' for a clean PrunecError; anything else propagates (a crash)."""
    import prunec
    from prunec.errors import PrunecError

    model, x = build(spec)
    flags = dict(spec["flags"])
    calib = [x] if flags["method"] in DATA_METHODS else None
    try:
        result = prunec.compile(model, x, calib=calib, **flags)
    except PrunecError as err:
        line = err.one_line()
        assert line and "\n" not in line, repr(line)
        return f"error: {line}"
    v = result.report["verify"]
    assert v["passed"] and v["rel_err"] <= v["tolerance"], v
    x2 = torch.cat([x, 0.5 * x[:1].flip(-1)])  # one more row: batch b + 1
    with torch.no_grad():
        y = result.model(x)
        try:
            y2 = result.model(x2)
        except Exception:
            pinned = any("only runs at batch" in n for n in v["notes"])
            dynamic = result.report.get("dynamic") or {}
            assert pinned and not result.report["module_synced"], (v, result.report["module_note"])
            assert dynamic.get("dynamic") is False and dynamic.get("reason"), dynamic  # says why
            return "verified-pinned"
    torch.testing.assert_close(y2[: x.shape[0]], y, rtol=1e-4, atol=1e-5)
    return "verified"
