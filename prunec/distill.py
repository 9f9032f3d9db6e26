"""Distillation pieces the recovery loop is made of: batches, logits, losses, metrics, BatchNorm.

A batch is what calibration takes (``prunec.calib.call_args``): a tensor, a tuple of positional
inputs, or a dict of keyword inputs. Labels ride along as the last element of an ``(x, y)`` tuple
or as ``batch["labels"]`` (passed to the student, which computes ``output.loss``: HF models).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from prunec.calib import call_args
from prunec.errors import InputError
from prunec.program_module import ProgramModule

BN_OPS = (torch.ops.aten.batch_norm.default,)


@dataclass
class Step:
    """One batch, split into what the models are called with and the labels."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    labels: torch.Tensor | None = None      # (x, y) batches: CE computed here
    kw_labels: torch.Tensor | None = None   # batch["labels"]: the student computes output.loss


def split_batch(batch: Any, labeled: bool | None) -> Step:
    """Inputs and labels of one batch. ``labeled=None`` detects ``(x, y)`` with integer ``y`` of
    one label per sample; ``True`` forces the last tuple element to be labels; ``False`` never."""
    if isinstance(batch, dict) or (isinstance(batch, (tuple, list)) and len(batch) == 1
                                   and isinstance(batch[0], dict)):
        args, kwargs = call_args(batch)
        labels = kwargs.pop("labels", None) if labeled is not False else None
        return Step(args, kwargs, kw_labels=labels)
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if not items:
        raise InputError("a data batch is empty", "give a tensor, an (x, y) tuple or a dict of inputs")
    if labeled is None:
        y, x = items[-1], items[0]
        labeled = (len(items) == 2 and isinstance(y, torch.Tensor) and isinstance(x, torch.Tensor)
                   and not y.is_floating_point() and y.dim() == 1 and x.dim() > 1 and len(y) == len(x))
    if not labeled:
        return Step(items, {})
    if len(items) < 2:
        raise InputError("labeled data needs (x, y) batches, got one element", "yield (inputs, labels) tuples")
    y = items[-1]
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex():
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"labels must be an integer tensor of class indices, got {got}",
                         "yield (x, y) with y = torch.tensor([...], dtype=torch.long), or pass labeled=False")
    return Step(items[:-1], {}, labels=y)


def cycle(data: Iterable[Any]) -> Iterator[Any]:
    """Batches of ``data`` round and round; a clear error for empty or one-shot data."""
    seen_any = False
    while True:
        n = 0
        for batch in data:
            n += 1
            yield batch
        if n == 0:
            if seen_any:
                raise InputError("the data ran out after one pass (a generator?)",
                                 "pass a list or a DataLoader, which can be iterated again")
            raise InputError("recovery data is empty", "give at least one batch")
        seen_any = True


def shard(step: Step, rank: int, world: int) -> Step:
    """This rank's slice of the global batch (dim 0 of every tensor), for DDP."""
    if world == 1:
        return step

    def part(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.shape[0] % world:
            raise InputError(f"a batch of {t.shape[0]} can't be split evenly over {world} processes",
                             f"use a global batch size divisible by {world}")
        return t.tensor_split(world)[rank]
    return Step(*pytree.tree_map(part, (step.args, step.kwargs, step.labels, step.kw_labels)))


def logits_of(output: Any, who: str) -> torch.Tensor:
    """The logits of a model output: ``.logits`` (HF), the tensor itself, or its first float leaf."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise InputError(f"the {who} returned no floating-point tensor to distil",
                         "the model must return logits (a tensor, a tuple, or an object with .logits)")
    return leaves[0]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "kl") -> torch.Tensor:
    """KL(teacher ‖ student) of softened distributions over the last dim, × T² (Hinton et al., 2015),
    averaged over every position; ``kind="mse"`` compares raw outputs (regression heads)."""
    if student.shape != teacher.shape:
        raise InputError(f"teacher output {tuple(teacher.shape)} does not match the student's "
                         f"{tuple(student.shape)}", "use the original (unpruned) model as the teacher")
    s, t = student.float(), teacher.float().detach()
    if kind == "mse" or s.shape[-1] == 1:
        return F.mse_loss(s, t)
    s, t = s.flatten(0, -2) if s.dim() > 1 else s[None], t.flatten(0, -2) if t.dim() > 1 else t[None]
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, name: str) -> torch.Tensor:
    """MSE between matching hidden tensors, relative to the teacher's mean square (scale-free)."""
    if student.shape != teacher.shape:
        raise InputError(f"feature '{name}': student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}", "pair only tensors whose width was not cut")
    t = teacher.float().detach()
    return F.mse_loss(student.float(), t) / t.pow(2).mean().clamp_min(1e-12)


class Features:
    """Forward hooks that keep the output of named modules (student name, teacher name)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]) -> None:
        self.pairs, self.s, self.t = pairs, {}, {}
        self.handles = []
        for s_name, t_name in pairs:
            for model, name, store in ((student, s_name, self.s), (teacher, t_name, self.t)):
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise InputError(f"feature module '{name}' does not exist in the "
                                     f"{'student' if store is self.s else 'teacher'}",
                                     "name modules as in model.named_modules()") from None
                self.handles.append(module.register_forward_hook(self._hook(store, name)))

    @staticmethod
    def _hook(store: dict[str, torch.Tensor], name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            store[name] = out if isinstance(out, torch.Tensor) else logits_of(out, f"module {name}")
        return hook

    def loss(self) -> torch.Tensor:
        losses = [feature_loss(self.s[a], self.t[b], a) for a, b in self.pairs]
        return torch.stack(losses).mean()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm of ``model`` (modules, or a program's batch_norm ops) back in eval mode after
    ``model.train()``: it normalises by its running statistics and leaves them as they are. Returns how many."""
    layers = batchnorm_modules(model)
    for m in layers:
        m.eval()
    return len(layers) + sum(m.batchnorm_training(False) for m in model.modules() if isinstance(m, ProgramModule))


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, steps: list[Step]) -> int:
    """Recompute BatchNorm running statistics as the plain average over ``steps`` (momentum
    ``None``), each layer seeing batch-normalised inputs as in training. Returns layers updated."""
    if isinstance(model, ProgramModule):
        return _reestimate_program(model, steps)
    layers = batchnorm_modules(model)
    if not layers or not steps:
        return 0
    saved = [(m.momentum, m.training) for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for s in steps:
            model(*s.args, **s.kwargs)
    finally:
        for m, (momentum, training) in zip(layers, saved):
            m.momentum, m.training = momentum, training
        model.train(was_training)
    return len(layers)


def _reestimate_program(model: ProgramModule, steps: list[Step]) -> int:
    """The same for an exported graph: aten.batch_norm runs with training=True and a momentum of
    1/(k+1) on batch k (a running average), writing the registered buffers in place."""
    nodes = [n for n in model.graph_module.graph.nodes if n.target in BN_OPS]
    if not nodes or not steps:
        return 0
    placeholders = [n for n in model.graph_module.graph.nodes if n.op == "placeholder"]
    fqn = {p: f for p, (kind, f) in zip(placeholders, model._inputs) if kind == "state"}
    originals = [n.args for n in nodes]
    buffers = {fqn[n.args[i]]: i for n in nodes for i in (3, 4) if n.args[i] in fqn}
    state = dict(model.named_buffers())
    for name, i in buffers.items():
        state[name].fill_(0.0 if i == 3 else 1.0)
    try:
        for k, s in enumerate(steps):
            for n, args in zip(nodes, originals):
                n.args = (*args[:5], True, 1.0 / (k + 1), *args[7:])
            model.graph_module.recompile()
            model(*s.args, **s.kwargs)
    finally:
        for n, args in zip(nodes, originals):
            n.args = args
        model.graph_module.recompile()
    return len(nodes)


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, steps: list[Step], temperature: float,
             kind: str) -> dict[str, float]:
    """KD loss and top-1 agreement with the teacher (and accuracy when labels are given)."""
    was = student.training
    student.eval()
    loss = agree = correct = n = n_labeled = 0.0
    try:
        for s in steps:
            out_s = logits_of(student(*s.args, **s.kwargs), "student")
            out_t = logits_of(teacher(*s.args, **s.kwargs), "teacher")
            loss += float(kd_loss(out_s, out_t, temperature, kind))
            agree += float((out_s.argmax(-1) == out_t.argmax(-1)).float().mean())
            n += 1
            if s.labels is not None:
                correct += float((out_s.argmax(-1) == s.labels).float().mean())
                n_labeled += 1
    finally:
        student.train(was)
    result = {"kd_loss": loss / max(n, 1), "agreement": agree / max(n, 1)}
    if n_labeled:
        result["accuracy"] = correct / n_labeled
    return result
