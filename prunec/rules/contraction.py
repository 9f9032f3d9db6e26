"""Contractions written with labels or batched: einsum, baddbmm, mv, dot/vdot.

A summed (contracted) dim is *consumed* on a state operand (the verifier zeroes it there, so
dropping it is exact); when every operand is an activation it is approximate, as for matmul.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from prunec.coupling import CouplingBuilder, shape_of
from prunec.rules import arg, aten, consume, coupling_rule, ndim, no_sizes


def _labels(term: str, n: int) -> list[str] | None:
    """One label per dim; ellipsis dims are '…k', counted from the right (so they broadcast)."""
    if "..." not in term:
        return list(term) if len(term) == n else None
    head, tail = term.split("...")
    k = n - len(head) - len(tail)
    return list(head) + [f"…{k - j}" for j in range(k)] + list(tail) if k >= 0 else None


def parse_einsum(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """Labels of every operand dim and of every output dim (implicit output: ellipsis dims, then
    the labels used once, sorted), or None when the equation does not match the operands."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    inputs = [_labels(t, n) for t, n in zip(terms, ndims)]
    if any(labels is None for labels in inputs):
        return None
    ellipsis = max((int(lab[1:]) for labels in inputs for lab in labels if lab[0] == "…"), default=0)
    if arrow:
        out = _labels(rhs, len(rhs.replace("...", "")) + (ellipsis if "..." in rhs else 0))
    else:
        letters = [c for c in lhs if c.isalpha()]
        out = [f"…{ellipsis - j}" for j in range(ellipsis)] + sorted(
            c for c in set(letters) if letters.count(c) == 1)
    return inputs, out


@coupling_rule(aten.einsum.default, fix=no_sizes)
def einsum(node: fx.Node, g: CouplingBuilder) -> None:
    """y[out labels] = Σ_{other labels} Π_k x_k[labels_k]: dims sharing a label tie (size-1 dims
    broadcast); a label missing from the output is contracted (consumed on state operands)."""
    equation, operands = arg(node, 0), list(arg(node, 1))
    parsed = parse_einsum(equation, [ndim(x) for x in operands])
    if parsed is None or ndim(node) < 0:
        for v in (*operands, node):
            g.freeze_all(v, f"einsum '{equation}' could not be parsed")
        return
    inputs, out = parsed
    where: dict[str, list[tuple[Any, int]]] = {}
    for x, labels in zip(operands, inputs):
        for d, lab in enumerate(labels):
            if labels.count(lab) > 1:
                g.freeze(x, d, f"einsum '{equation}' takes a diagonal over this dim")
            else:
                where.setdefault(lab, []).append((x, d))
    for lab, dims in where.items():
        size = max(shape_of(x)[d] for x, d in dims)
        dims = [(x, d) for x, d in dims if shape_of(x)[d] == size]  # size-1 dims broadcast
        if lab in out:
            j = out.index(lab)
            if shape_of(node)[j] == size:
                dims.append((node, j))
            g.tie(*dims)
            continue
        g.tie(*dims)
        state = [consume(g, x, d) for x, d in dims]
        if not any(state):
            g.approx(dims[0][0], dims[0][1], f"einsum '{equation}' sums activations over this dim")


def _tie_broadcast(src: Any, node: fx.Node, g: CouplingBuilder) -> None:
    shape, out = shape_of(src), shape_of(node)
    if shape is None or out is None:
        return
    lead = len(out) - len(shape)
    for d, size in enumerate(shape):
        if lead + d >= 0 and size == out[lead + d] and size > 1:
            g.tie((src, d), (node, lead + d))


def _contract(a: Any, da: int, b: Any, db: int, g: CouplingBuilder, what: str) -> None:
    """Tie a summed pair of dims; consume it on a state operand, else it is approximate."""
    g.tie((a, da), (b, db))
    if not consume(g, b, db) and not consume(g, a, da):
        g.approx(a, da, f"{what} of two activations sums over this dim")


@coupling_rule(aten.baddbmm.default, fix=no_sizes)
def baddbmm(node: fx.Node, g: CouplingBuilder) -> None:
    """y[b, n, m] = β·c[b?, n?, m?] + α·Σ_k x[b, n, k] · w[b, k, m]"""
    c, a, b = arg(node, 0), arg(node, 1), arg(node, 2)
    g.tie((a, 0), (b, 0), (node, 0))
    g.tie((a, 1), (node, 1))
    g.tie((b, 2), (node, 2))
    _contract(a, 2, b, 1, g, "baddbmm")
    _tie_broadcast(c, node, g)


@coupling_rule(aten.mv.default, fix=no_sizes)
def mv(node: fx.Node, g: CouplingBuilder) -> None:
    """y[o] = Σ_i A[o, i] · v[i]  (spectral norm: σ = u · (W v))"""
    a, v = arg(node, 0), arg(node, 1)
    g.tie((a, 0), (node, 0))
    _contract(a, 1, v, 0, g, "mv")


@coupling_rule(aten.dot.default, aten.vdot.default, fix=no_sizes)
def dot(node: fx.Node, g: CouplingBuilder) -> None:
    """s = Σ_i a[i] · b[i]"""
    _contract(arg(node, 0), 0, arg(node, 1), 0, g, str(node.target))
