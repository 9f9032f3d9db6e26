"""torch.export → Program: an ATen fx graph plus the FQN of every lifted parameter/buffer."""
from __future__ import annotations

import contextlib
import io
import operator
import re
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from prunec.errors import TraceError, first_line

STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass
class Program:
    """An exported model: graph, state tensors by FQN, and which placeholder is which."""

    ep: ExportedProgram
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    # the traced module (calibration batches shaped unlike the example are run through a re-trace of it)
    model: Any = field(default=None, repr=False, compare=False)
    # input-shape signature → a Program traced at those shapes (filled by prunec.calib.collect)
    reshaped: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def graph(self) -> fx.Graph:
        return self.ep.graph

    def placeholder_fqns(self) -> dict[str, str]:
        """Placeholder name → FQN of the parameter/buffer/constant it holds."""
        return {spec.arg.name: spec.target for spec in self.ep.graph_signature.input_specs
                if spec.kind in STATE_KINDS}

    def tensor(self, fqn: str) -> torch.Tensor:
        """One lifted parameter/buffer/constant (non-persistent buffers live in ``constants``)."""
        return self.ep.state_dict[fqn] if fqn in self.ep.state_dict else self.ep.constants[fqn]

    def state(self) -> dict[str, torch.Tensor]:
        """FQN → tensor for every lifted parameter, buffer and tensor constant."""
        return {fqn: self.tensor(fqn) for fqn in self.placeholder_fqns().values()}

    def user_input_names(self) -> list[str]:
        return [spec.arg.name for spec in self.ep.graph_signature.input_specs
                if spec.kind == InputKind.USER_INPUT]

    def user_inputs(self) -> list[fx.Node]:
        """The user-input placeholders, in the order of the pytree leaves of (args, kwargs)."""
        names = set(self.user_input_names())
        return [n for n in self.graph.nodes if n.op == "placeholder" and n.name in names]

    def user_outputs(self) -> list[Any]:
        """What the graph returns for each user output leaf, in pytree order (an fx node, or a constant)."""
        outs = list(next(n for n in self.graph.nodes if n.op == "output").args[0])
        return [o for o, spec in zip(outs, self.ep.graph_signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]

    def param_fqns(self) -> set[str]:
        return {spec.target for spec in self.ep.graph_signature.input_specs
                if spec.kind == InputKind.PARAMETER}


def eval_mode(model: torch.nn.Module) -> torch.nn.Module:
    """``model.eval()``, except for modules that refuse it (an unlifted ExportedProgram)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def module_path(node: fx.Node) -> str:
    """The module path (FQN) an fx node came from, or '<top>'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    return path or "<top>"


def trace(model: torch.nn.Module, example_inputs: tuple[Any, ...],
          example_kwargs: dict[str, Any] | None = None,
          dynamic_shapes: Any = None) -> Program:
    """Export ``model`` to an ATen graph with torch.export (non-strict)."""
    kwargs = dict(example_kwargs or {})
    model = eval_mode(model)
    errors = []
    for strict in (False, True):  # non-strict first; TorchDynamo (strict) as the fallback
        try:
            with torch.no_grad(), keep_attributes(model), _no_partial_graph():
                ep = torch.export.export(model, tuple(example_inputs), kwargs or None,
                                         dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as err:  # export raises many types; keep the first for the message
            errors.append(err)
            if _is_input_mismatch(err):
                break
            continue
        where = _data_dependent_size(ep)
        if where is not None:  # nonzero / top-k by a count read from the data: sizes the rewrite can't know
            raise TraceError(f"torch.export traced {type(model).__name__} only with data-dependent tensor sizes "
                             f"({where})", "prune what traces (compile's default parts=True) prunes the "
                             "submodules that export with fixed sizes")
        return Program(ep, tuple(example_inputs), kwargs, model=model)
    err = errors[0]
    raise TraceError(f"torch.export could not trace {type(model).__name__}{_user_frame(err)}: "
                     f"{first_line(err, 300)}",
                     "make the forward traceable (no data-dependent Python control flow), "
                     "or check --input-shape matches what the model expects") from err


@contextmanager
def _no_partial_graph() -> Iterator[None]:
    """torch.export prints the partial graph of a data-dependent failure (hundreds of lines) to stderr;
    the TraceError names the failure: pass everything else written to stderr through, drop that graph."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except Exception as err:
        graph = getattr(err, "partial_fx_graph", None)
        sys.stderr.write(buffer.getvalue().replace(f"{graph}\n", "") if graph is not None else buffer.getvalue())
        raise
    sys.stderr.write(buffer.getvalue())


def _data_dependent_size(ep: ExportedProgram) -> str | None:
    """'node (module)' of the first value whose shape depends on the data (an unbacked symbol), else None."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and any(free_unbacked_symbols(s) for s in val.shape):
            op = node.args[0] if node.target is operator.getitem else node  # a multi-output op's result
            return f"{op.name} in {module_path(node)}"
    return None


@contextmanager
def keep_attributes(model: torch.nn.Module) -> Iterator[None]:
    """Undo plain attributes a forward sets while tracing (ultralytics' ``Detect`` caches
    ``anchors``/``shape``): left behind, they are fake tensors that break the user's model."""
    saved = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in model.modules()]
    try:
        yield
    finally:
        for mod, attrs in saved:
            for k in [k for k in vars(mod) if not k.startswith("_") and k not in attrs]:
                delattr(mod, k)
            vars(mod).update(attrs)


def _user_frame(err: Exception) -> str:
    """' at FILE:LINE in FN' for the last frame of user code the export error mentions."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(err))
    frames += [(f.filename, str(f.lineno), f.name) for f in traceback.extract_tb(err.__traceback__)]
    user = [f for f in frames if "site-packages" not in f[0] and "/torch/" not in f[0] and not f[0].startswith("<")
            and "prunec" not in f[0]]
    return f" (at {user[-1][0]}:{user[-1][1]} in {user[-1][2]})" if user else ""


def _is_input_mismatch(err: Exception) -> bool:
    """Shape/dtype errors from the model itself: a second (strict) trace would fail the same way."""
    return isinstance(err, (RuntimeError, ValueError, TypeError)) and any(
        s in str(err) for s in ("size mismatch", "shape", "expected input", "Expected"))
