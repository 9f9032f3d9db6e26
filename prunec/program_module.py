"""ProgramModule: an exported graph plus its state, callable like the original model."""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind

from prunec.trace import Program

# ops whose behaviour depends on train/eval: the position of their ``training`` argument
TRAINING_ARG = {torch.ops.aten.batch_norm.default: 5, torch.ops.aten.dropout.default: 2}


def set_by_path(root: nn.Module, fqn: str, tensor: torch.Tensor, is_param: bool) -> None:
    """Register ``tensor`` at dotted path ``fqn``, creating empty parent modules."""
    *parents, leaf = fqn.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p) or not isinstance(getattr(mod, p), nn.Module):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if is_param:
        mod.register_parameter(leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    else:
        mod.register_buffer(leaf, tensor)


class ProgramModule(nn.Module):
    """Runs an ATen graph whose state placeholders are fed from registered params/buffers.
    State keeps the original FQNs, so ``state_dict()`` keys match the source model's."""

    def __init__(self, program: Program, graph: fx.Graph, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        sig = program.ep.graph_signature
        self._inputs: list[tuple[str, str | None]] = []
        params = program.param_fqns()
        present = {n.name for n in graph.nodes if n.op == "placeholder"}
        for spec in sig.input_specs:
            if spec.kind != InputKind.USER_INPUT and spec.arg.name not in present:
                continue  # state that only removed code read (e.g. a dropped block)
            if spec.kind == InputKind.USER_INPUT:
                self._inputs.append(("user", None))
            else:
                self._inputs.append(("state", spec.target))
                if spec.target is not None and not _has_path(self, spec.target):
                    set_by_path(self, spec.target, state[spec.target], spec.target in params)
        self._user_outputs = [i for i, s in enumerate(sig.output_specs)
                              if s.kind == OutputKind.USER_OUTPUT]
        self._out_spec = program.ep.call_spec.out_spec
        # the exported module as root carries submodules of higher-order ops (cond, autocast, …)
        object.__setattr__(self, "graph_module", fx.GraphModule(program.ep.graph_module, graph))

    def train(self, mode: bool = True) -> "ProgramModule":
        """Like ``nn.Module.train``, and switch the graph's BatchNorm and dropout ops to training
        behaviour (batch statistics, running stats updated in place; dropout on): the graph was
        exported in eval mode, so without this a recovering program would never see batch stats."""
        super().train(mode)
        self._set_training(TRAINING_ARG, mode)
        return self

    def batchnorm_training(self, mode: bool) -> int:
        """Switch only the graph's BatchNorm ops (``train`` switches dropout too); returns how many there are."""
        return self._set_training({op: i for op, i in TRAINING_ARG.items() if op is torch.ops.aten.batch_norm.default},
                                  mode)

    def _set_training(self, ops: dict[Any, int], mode: bool) -> int:
        """Set the ``training`` argument of every node calling one of ``ops`` (op → argument position)."""
        found, changed = 0, False
        for node in self.graph_module.graph.nodes:
            where = ops.get(node.target) if node.op == "call_function" else None
            if where is not None and len(node.args) > where:
                found += 1
                if node.args[where] != mode:
                    node.args = (*node.args[:where], mode, *node.args[where + 1:])
                    changed = True
        if changed:
            self.graph_module.recompile()
        return found

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves = iter(pytree.tree_leaves((args, kwargs)))
        flat = [next(leaves) if kind == "user" else _get_path(self, fqn)
                for kind, fqn in self._inputs]
        outs = self.graph_module(*flat)
        if not isinstance(outs, (tuple, list)):
            outs = (outs,)
        user = [outs[i] for i in self._user_outputs]
        return pytree.tree_unflatten(user, self._out_spec)


def _get_path(root: nn.Module, fqn: str) -> torch.Tensor:
    *parents, leaf = fqn.split(".")
    mod = root
    for p in parents:
        mod = getattr(mod, p)
    return getattr(mod, leaf)


def _has_path(root: nn.Module, fqn: str) -> bool:
    try:
        _get_path(root, fqn)
        return True
    except AttributeError:
        return False


def copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A deep copy of ``graph`` and the old → new node map."""
    new = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    return new, val_map
