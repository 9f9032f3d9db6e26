"""The pass manager: order checked from requires/provides, names or instances, the plan checked
after every pass, passes stateless between runs; and the package's import graph has no cycle."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import prunec
from prunec.errors import InputError, InternalError
from prunec.passes import L1, PASSES, Pass, PassResult, Select, State, TargetSearch
from prunec.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
# package name → source folder (pyproject's package-dir)
PACKAGES = {"prunec": ROOT / "prunec", "prunec.passes": ROOT / "passes",
            "prunec.backends": ROOT / "backends", "prunec.models_zoo": ROOT / "models_zoo"}


def _model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 4, 3)).eval(), torch.randn(2, 3, 12, 12)


def test_select_before_a_criterion_is_refused_before_anything_runs() -> None:
    model, x = _model()
    with pytest.raises(InputError, match="pass 'select' needs scores") as info:
        prunec.compile(model, x, passes=[Select({"channel": 0.5}), "l1"])
    assert "l1" in info.value.one_line()


def test_pipeline_of_names_equals_pipeline_of_instances() -> None:
    model, x = _model()
    by_name = prunec.compile(model, x, passes=["l1", Select({"channel": 0.5}, round_to=1)])
    by_instance = prunec.compile(model, x, passes=[L1(), Select({"channel": 0.5}, round_to=1)])
    assert by_name.plan.kept == by_instance.plan.kept and by_name.plan.kept


def test_a_pass_that_breaks_the_plan_is_an_internal_error() -> None:
    class Broken(Pass):
        name = "broken"
        provides = ("plan",)

        def run(self, state: State) -> PassResult:
            group = state.coupling.groups[0]
            state.plan.kept[group.name] = [group.size + 5]  # out of range
            state.plan.sizes[group.name] = group.size
            return PassResult(state, True)

    model, x = _model()
    with pytest.raises(InternalError, match="pass 'broken' left an invalid plan"):
        prunec.compile(model, x, passes=[Broken()])


def test_target_search_instance_is_stateless_between_runs() -> None:
    model, x = _model()
    search = TargetSearch(target_macs=0.5, round_to=1, steps=4)
    first = prunec.compile(model, x, passes=[search])
    second = prunec.compile(model, x, passes=[search])
    assert first.plan.meta["search"] == second.plan.meta["search"]
    assert first.plan.kept == second.plan.kept
    assert not any(isinstance(v, list) for v in vars(search).values())  # no trial log kept


def test_registries_refuse_duplicates() -> None:
    reg = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="duplicate thing"):
        reg.register("a")(2)
    with pytest.raises(ValueError, match="duplicate pass"):
        PASSES["l1"] = L1


def _module_name(path: Path) -> str:
    for pkg, folder in PACKAGES.items():
        if folder in path.parents or path.parent == folder:
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([pkg, *parts])
    raise AssertionError(path)


def import_graph() -> dict[str, set[str]]:
    """Module → prunec modules it imports (top-level and inside functions), from the AST.
    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``."""
    files = [f for folder in PACKAGES.values() for f in folder.rglob("*.py")]
    names = {_module_name(f): f for f in files}
    packages = {_module_name(f) for f in files if f.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for mod, f in names.items():
        if mod == "prunec":
            continue  # the facade (re-exports compile, Plan, errors); see the test's docstring
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            for t in targets:
                while t and t not in names:
                    t = t.rpartition(".")[0]
                registering = t in packages and mod.startswith(t + ".")  # plugin → its package's registry
                if t and t not in (mod, "prunec") and not registering:
                    deps.add(t)
        graph[mod] = deps
    return graph


def test_import_graph_has_no_cycles() -> None:
    """Every import (lazy ones included) counts. Not edges: a plugin importing its own package
    (``rules/conv.py`` → ``rules`` for ``coupling_rule``; the package ``__init__`` defines the
    registry, then imports its plugins to fill it — that edge is kept), and the
    top-level ``prunec/__init__.py`` facade (``import prunec`` in cli.py is an edge to nothing:
    the facade only re-exports compiler, errors and plan, which import no cli)."""
    import networkx as nx

    graph = nx.DiGraph([(a, b) for a, deps in import_graph().items() for b in deps])
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, sorted(cycles, key=len)[:5]


def test_passes_import_no_later_stage() -> None:
    later = {"prunec.rewrite", "prunec.compiler", "prunec.verify", "prunec.cost", "prunec.module_sync",
             "prunec.cli", "prunec.backends"}
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("prunec.passes"):
            assert not deps & later, (mod, deps & later)


def test_sources_stay_python_3_10_compatible() -> None:
    """pyproject says requires-python >= 3.10: no 3.11+ syntax, and no 3.11+ APIs we know of
    (``add_note`` only through ``prunec.errors.add_note``, which falls back on 3.10)."""
    newer = ("tomllib", "StrEnum", "ExceptionGroup", "datetime.UTC", "typing import Self",
             "asyncio.TaskGroup")
    for folder in PACKAGES.values():
        for f in folder.rglob("*.py"):
            text = f.read_text()
            ast.parse(text, feature_version=(3, 10))
            assert not any(n in text for n in newer), f
            if f.name != "errors.py":
                assert ".add_note(" not in text, f
