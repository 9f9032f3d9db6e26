"""Whose fault is a poor result: the model's own non-finite output (the user's), or what held
pruning back (ops without rules, model outputs, approximate dims not asked for). Computes; never
prints (cli.py does)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from prunec.coupling import Coupling
from prunec.errors import InputError

FLAGS = {"channel": "--channels", "mlp": "--mlp", "head": "--heads", "hidden": "--hidden"}
KERNEL = "convolution kernel dim"


def check_finite(model: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
    """Refuse a model whose own output on the example is NaN/Inf: no pruned result could be checked."""
    try:
        with torch.no_grad():
            out = model(*inputs, **(kwargs or {}))
    except Exception:  # noqa: BLE001 - a model that does not run is trace's to report, with its frame
        return
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = [i for i, t in enumerate(leaves) if not bool(torch.isfinite(t).all())]
    if bad:
        raise InputError(f"the original model's output {bad[0]} on the example input is not finite (NaN or Inf) "
                         "before any pruning",
                         "check the weights (uninitialised parameters such as torch.Tensor(n), NaN/Inf values) "
                         "and the example input; prunec can only verify a model whose output is finite")


@dataclass
class Reason:
    """One reason parameters keep their size, with the share of parameter elements it holds back."""

    reason: str
    share: float       # of all parameter elements
    example: str       # one tensor dim and its full reason
    hint: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _hint(reason: str) -> str:
    if reason.startswith("no coupling rule for"):
        return ("prunec has no rule for that op yet, so the dims it touches keep their size: "
                "report the op, or write that part of the model with supported ops")
    if reason in ("model output", "model input"):
        return "a model's inputs and outputs keep their size; the layers between them are what prunes"
    for kind, flag in FLAGS.items():
        if reason == f"{kind} groups not asked for":
            extra = " (approximate: a norm or softmax reads these dims)" if kind == "hidden" else ""
            return f"pass {flag} R to prune them{extra}"
    if reason == "only one unit":
        return "a group of one unit cannot shrink"
    return "run 'prunec inspect MODEL' to see every frozen tensor dim and why"


def held_back(coupling: Coupling, kinds: set[str] | None = None) -> list[Reason]:
    """Why parameters stay whole, ranked by the parameter elements each reason holds back. A tensor
    counts as prunable when one of its dims is in a group of a kind in ``kinds`` (None: any)."""
    program = coupling.program
    params = {fqn: program.tensor(fqn) for fqn in program.param_fqns()}
    total = sum(t.numel() for t in params.values()) or 1
    kind_of: dict[tuple[str, int], str] = {}
    for group in coupling.groups:
        for member in group.members:
            kind_of.setdefault(member, group.kind)
    held: dict[str, list[Any]] = {}
    for fqn, tensor in sorted(params.items(), key=lambda kv: (-kv[1].numel(), kv[0])):  # biggest first
        dims = range(tensor.dim())
        grouped = [kind_of[(fqn, d)] for d in dims if (fqn, d) in kind_of]
        if grouped and (kinds is None or any(k in kinds for k in grouped)):
            continue
        if grouped:
            reason, example = f"{grouped[0]} groups not asked for", f"{fqn}@{dims[0]}"
        else:
            why = [(d, coupling.frozen.get(f"{fqn}@{d}", "")) for d in dims]
            d, full = next(((d, w) for d, w in why if w and not w.startswith(KERNEL)), (0, "frozen"))
            reason, example = full.split(" (at ")[0], f"{fqn}@{d}: {full}"
        entry = held.setdefault(reason, [0, example])
        entry[0] += tensor.numel()
    ranked = sorted(held.items(), key=lambda kv: -kv[1][0])
    return [Reason(r, n / total, ex, _hint(r)) for r, (n, ex) in ranked]


def shortfall(coupling: Coupling, asked: dict[str, float], dropped_units: int, dropped_layers: int,
              macs_before: int, macs_after: int) -> dict[str, Any] | None:
    """None when the compile cut at least half the MACs share asked for (the largest ratio asked);
    otherwise what happened ("nothing"/"little"), the top reasons and how to proceed."""
    want = max(asked.values(), default=0.0)
    if want <= 0:
        return None
    cut = 1 - macs_after / macs_before if macs_before else 0.0
    if dropped_units or dropped_layers:
        if cut >= want / 2:
            return None
        status = "little"
    else:
        status = "nothing"
    kinds = {k for k, v in asked.items() if v and k in FLAGS}
    if "channel" in kinds:
        kinds.add("mlp")  # --channels covers MLP groups unless --mlp is given
    reasons = [r for r in held_back(coupling, kinds or None) if r.share >= 0.005][:3]
    if status == "nothing" and any(g.kind in kinds for g in coupling.groups):
        reasons.insert(0, Reason("the ratios round to zero units in every group", 0.0, "",
                                 "raise the ratio or lower --round-to (default 8)"))
    flags = ", ".join(f"{FLAGS.get(k, '--' + k)} {v:g}" for k, v in asked.items() if v)
    return {"status": status, "asked": flags, "macs_cut": round(cut, 4),
            "reasons": [r.to_json() for r in reasons],
            "hint": reasons[0].hint if reasons else "run 'prunec inspect MODEL' to see why"}


def describe_shortfall(s: dict[str, Any]) -> str:
    """The one line the CLI prints for a shortfall."""
    what = "nothing was pruned" if s["status"] == "nothing" else "much less was pruned than asked"
    why = "; ".join(r["reason"] + (f" ({100 * r['share']:.0f}% of parameters)" if r["share"] else "")
                    for r in s["reasons"]) or "unknown"
    return (f"{what} ({s['asked']}: {100 * s['macs_cut']:.1f}% of MACs cut). "
            f"Top reasons: {why}. To proceed: {s['hint']}.")


def inspect_summary(coupling: Coupling) -> dict[str, Any]:
    """What `prunec inspect` leads with: the share of parameters in some group, and what holds the
    rest back."""
    reasons = [r for r in held_back(coupling) if r.share > 0]
    prunable = 1 - sum(r.share for r in reasons)
    return {"prunable_share": round(prunable, 4), "groups": len(coupling.groups),
            "reasons": [r.to_json() for r in reasons[:3]],
            "hint": reasons[0].hint if reasons else ""}


def describe_inspect(s: dict[str, Any]) -> str:
    """The one line `prunec inspect` leads with."""
    head = ("nothing is prunable" if not s["groups"] else
            f"{100 * s['prunable_share']:.0f}% of parameters are in {s['groups']} prunable groups")
    if not s["reasons"]:
        return head
    why = "; ".join(f"{r['reason']} ({100 * r['share']:.0f}%)" for r in s["reasons"])
    return f"{head}; held back: {why}. {s['hint'][:1].upper()}{s['hint'][1:]}."
