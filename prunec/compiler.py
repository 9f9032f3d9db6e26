"""The pipeline: trace → analyze → score/select (passes) → rewrite → sync → verify → cost (the last four in
``prunec.finish``)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from prunec.analyze import build_coupling
from prunec.cost import count_macs, count_params
from prunec.coupling import Coupling
from prunec.cut import Cut
from prunec.diagnose import check_finite, shortfall
from prunec.errors import InputError, TraceError
from prunec.finish import (CompileResult, Progress, Timer, deployed, finish_compile, make_dynamic,
                           original_program)
from prunec.module_sync import keep_whole
from prunec.passes import (PASSES, ConfigHeads, LatencySelect, LayerDrop, LeastSquaresSelection, NativeConfig, Pass,
                           Refit, Select, State, run_passes)
from prunec.passes.base import Services
from prunec.passes.native_config import native_rules
from prunec.passes.select import check_ratio
from prunec.plan import Plan
from prunec.rewrite import rewrite
from prunec.trace import Program, eval_mode, trace

METHODS = ("l1", "l2", "bn")
GQA_MODES = ("groups", "query")


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def analyze(model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None = None) -> Coupling:
    """Trace ``model`` and return its coupling (``.groups``, ``.frozen``, ``.to_networkx()``)."""
    return build_coupling(trace(model, _as_tuple(example_inputs), example_kwargs))


def methods() -> list[str]:
    """``--method`` names: registered passes that score units (or select and refit them)."""
    return sorted(n for n, cls in PASSES.items()
                  if ("scores" in cls.provides and "plan" not in cls.provides)
                  or {"refits", "plan"} <= set(cls.provides))


def criterion(method: str, ratio: float = 0.5, round_to: int = 8) -> Pass:
    """The scoring (or selecting) pass for a ``--method`` name."""
    if method not in methods():
        raise InputError(f"unknown pruning method '{method}'", f"use one of {methods()}")
    cls = PASSES[method]
    if issubclass(cls, LeastSquaresSelection):  # ThiNet / LASSO select channels themselves
        return cls(ratio=ratio, round_to=round_to)
    return cls()


def services(coupling: Coupling, model: nn.Module | None = None) -> Services:
    """The rewriter and cost model as services for passes that try plans."""
    program = coupling.program
    return Services(prune=lambda plan: rewrite(Cut.of(coupling, plan))[0],
                    original=lambda: original_program(coupling),
                    macs=lambda m: count_macs(m, program.example_inputs, program.example_kwargs),
                    params=count_params,
                    deployed=(lambda plan, updates=None, sync=True: deployed(model, coupling, plan, updates, sync))
                    if model is not None else None)


def compile(model: nn.Module, example_inputs: Any, *, channels: float = 0.0, mlp: float = 0.0,
            heads: float = 0.0, hidden: float = 0.0, layers: float = 0.0, method: str = "l1", round_to: int = 8,
            global_rank: bool = False, passes: Sequence[Pass | str] | None = None,
            plan: Plan | None = None, calib: Iterable[Any] | None = None,
            check: bool = True, example_kwargs: dict[str, Any] | None = None,
            progress: Progress | None = None, static: bool = False, layer_method: str = "angular",
            dynamic_shapes: Any = None, parts: bool = True, schedule: Any = None,
            recover: dict[str, Any] | None = None, runtime: str | None = None,
            target_latency: float | str | None = None, batch: int = 1, threads: int | None = None,
            inplace: bool = False, refit: str | None = None, sequential: bool = True, gqa: str = "groups",
            native_config: bool | None = None) -> Any:
    """Prune ``model`` and return a CompileResult.

    ``channels`` applies to conv/linear channel groups (and MLP groups unless ``mlp`` is
    given); ``heads``/``hidden`` to attention heads and the residual stream; ``layers`` is the
    fraction of residual blocks to drop (``layer_method``: angular distance on the example and calibration
    inputs, alias block-influence; or position). Give ``passes``
    to compose your own pipeline, or ``plan`` to replay a saved plan. The result accepts any batch
    size (and sequence length for token inputs) unless ``static``; ``dynamic_shapes`` (torch.export
    format) names other dynamic dims, e.g. the ones a loaded ``.pt2`` recorded. If the whole model
    can't be traced and ``parts`` is on, the submodules that trace are pruned instead (a ``PartsResult``).
    ``schedule`` (a ``prunec.schedule.Gradual``) prunes step by step, distilling with ``recover``
    options between steps. ``runtime`` (onnxruntime, executorch, torch, tensorrt) picks widths from a latency
    table measured on that runtime at ``batch``/``threads`` (``passes.LatencySelect``); with
    ``target_latency`` (a fraction of the dense latency, or e.g. "12ms") a knapsack over groups meets
    it, and the report's ``latency`` entry has the predicted and the measured latency. ``inplace``: the
    result shares the tensors pruning leaves whole with ``model`` instead of copying them (memory: one
    copy of the weights, not two); training or editing the result then edits ``model`` too. ``refit`` ('ls' or 'bias', see
    ``prunec.passes.Refit``; needs ``calib``) refits the Linear and conv layers that read pruned units after selection;
    default: 'bias' for ``method='flap'`` (FLAP's bias compensation), none otherwise; 'none' turns it off.
    ``sequential``: the refit calibrates each block of an LLM on the pruned, refit blocks before it.
    ``gqa`` (attention with fewer kv heads than query heads): 'groups' prunes whole kv groups (a kv head
    with its query heads), 'query' prunes query heads inside every group, the same in-group slots in
    each, kv heads kept (a replayed plan keeps the mode it was made with).
    ``native_config`` (models whose framework has rules: diffusers UNets/VAE) keeps widths the model's own
    config expresses (``passes.NativeConfig``), so ``save_pretrained`` output reloads with the framework's
    ``from_pretrained``: None (default) when some expressible width fits the groups, else the free plan
    with a note naming why; True: only such widths (nothing pruned if none fits); False: the free plan.
    """
    if gqa not in GQA_MODES:
        raise InputError(f"gqa '{gqa}' is unknown", f"use one of {GQA_MODES}")
    gqa = plan.meta.get("gqa", "groups") if plan is not None else gqa
    if native_config and native_rules(model) is None:
        raise InputError(f"native_config=True, but prunec has no config rules for {type(model).__name__}",
                         "drop it (rules: diffusers UNet2DModel, UNet2DConditionModel, AutoencoderKL)")
    if schedule is not None:
        from prunec.schedule import compile_gradual
        return compile_gradual(model, example_inputs, schedule, recover, compile_once=compile, criterion=criterion,
                               analyze=analyze, method=method, round_to=round_to,
                               calib=calib, check=check, example_kwargs=example_kwargs, progress=progress,
                               static=static, dynamic_shapes=dynamic_shapes)
    timer = Timer(progress)
    inputs, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    model = eval_mode(model)
    check_finite(model, inputs, kwargs)  # a NaN/Inf output is the model's, not prunec's
    try:
        with timer.stage("trace"):
            program = trace(model, inputs, kwargs)  # (after: tracing may leave fake tensors in module caches)
    except TraceError as err:
        if not parts or plan is not None or passes is not None:
            raise
        from prunec.partial import PartStages, compile_parts  # prune what traces
        return compile_parts(model, inputs, kwargs, PartStages(trace, plan_part, finish_part), err,
                             channels=channels, mlp=mlp, heads=heads, hidden=hidden, layers=layers, method=method,
                             round_to=round_to, global_rank=global_rank, calib=calib, check=check,
                             layer_method=layer_method)
    with timer.stage("analyze"):
        coupling = build_coupling(program, gqa_query=gqa == "query")
        keep_whole(model, coupling)  # groups the user's classes can't express pruned
    ratios = {"channel": channels, "mlp": mlp or channels, "head": heads, "hidden": hidden}
    asked = ({"channel": channels, "mlp": mlp, "head": heads, "hidden": hidden, "layers": layers}
             if plan is None else {})  # what the user asked for (a replayed plan asks nothing)
    with timer.stage("plan"):
        if plan is None:
            refit = refit_mode(refit, method)
            latency = _latency_pass(runtime, target_latency, ratios, batch, threads, refit) if passes is None else None
            pipeline = list(passes) if passes is not None else _default_pipeline(
                method, ratios, round_to, global_rank, layers, layer_method,
                hf_heads=hasattr(getattr(model, "config", None), "num_attention_heads"), latency=latency,
                refit=refit, sequential=sequential,
                native=None if native_config is False or native_rules(model) is None else bool(native_config))
            kinds = ({k for k, v in ratios.items() if v} | set(latency.kinds if latency else ())) \
                if passes is None else None
            state = run_passes(pipeline, State(model, program, coupling, calib=calib, kinds=kinds,
                                               services=services(coupling, model)))
            plan, notes, updates, passes_ran = state.plan, state.notes, state.updates, True
            if gqa == "query":
                plan.meta["gqa"] = gqa   # replays (dynamic shapes, --plan) rebuild this coupling
        else:
            notes, updates, passes_ran = [], {}, False
        plan.check(coupling)
    result = finish_compile(model, program, coupling, plan, timer, notes, check, updates,
                            state.calib if passes_ran else calib, share=inplace)
    result.report["passes"] = state.results if passes_ran else {}
    r = result.report
    if passes_ran and state.results.get("latency_select", {}).get("measure"):
        from prunec.latency import measured_report
        with timer.stage("latency"):
            dense = model if r["module_synced"] else original_program(coupling)  # exported alike
            r["latency"] = measured_report(state.results["latency_select"], dense, result.model, inputs,
                                           kwargs=kwargs)
    r["shortfall"] = shortfall(coupling, asked, plan.n_dropped(), len(plan.meta.get("dropped_layers") or []),
                               r["macs_before"], r["macs_after"])
    if not static:
        with timer.stage("dynamic"):
            make_dynamic(result, model, dynamic_shapes)
        result.report["time_s"] = {**timer.times, "total": round(sum(timer.times.values()), 4)}
    result.prerefit = {}
    return result


def plan_part(model: nn.Module, program: Program, open_inputs: frozenset[tuple[int, int]],
              open_outputs: frozenset[tuple[int, int]], *,
              channels: float = 0.0, mlp: float = 0.0, heads: float = 0.0, hidden: float = 0.0, layers: float = 0.0,
              method: str = "l1", round_to: int = 8, global_rank: bool = False, calib: Iterable[Any] | None = None,
              layer_method: str = "angular", check: bool = True) -> State:
    """Analyze one traced part (its open (leaf, dim) inputs/outputs tied to other parts, see prunec.ties) and run
    the default passes: the State with its scores and plan, before the rewrite."""
    coupling = build_coupling(program, open_inputs=open_inputs, open_outputs=open_outputs)
    keep_whole(model, coupling)
    ratios = {"channel": channels, "mlp": mlp or channels, "head": heads, "hidden": hidden}
    pipeline = _default_pipeline(method, ratios, round_to, global_rank, layers, layer_method,
                                 hf_heads=hasattr(getattr(model, "config", None), "num_attention_heads"))
    return run_passes(pipeline, State(model, program, coupling, calib=calib, kinds={k for k, v in ratios.items() if v},
                                      services=services(coupling, model)))


def finish_part(state: State, plan: Plan, check: bool = True) -> CompileResult:
    """Rewrite, sync, verify and cost one part with ``plan`` (its tied groups chosen across parts)."""
    notes = [*state.notes, *(["refit not applied: parts are pruned without it"] if state.updates else [])]
    result = finish_compile(state.model, state.program, state.coupling, plan, Timer(None), notes, check,
                            calib=state.calib)
    result.report["passes"] = state.results
    return result


def refit_mode(refit: str | None, method: str) -> str:
    """The refit a compile runs: the one asked for, else FLAP's bias compensation for ``--method flap``, else none."""
    return refit or ("bias" if method == "flap" else "none")


def _latency_pass(runtime: str | None, target: float | str | None, ratios: dict[str, float],
                  batch: int, threads: int | None, refit: str = "none") -> Pass | None:
    """The LatencySelect pass for ``runtime``/``target_latency`` (None without either); its probes refit as
    ``refit`` will."""
    if runtime is None and target is None:
        return None
    if ratios.get("head") or ratios.get("hidden"):
        raise InputError("latency tables cover conv/linear channels, not heads or the hidden width",
                         "drop --heads/--hidden, or prune them without --runtime/--target-latency")
    if target is not None and any(ratios.values()):
        raise InputError("a latency target and channel ratios both given",
                         "the target sets the widths: drop --channels/--mlp/--heads/--hidden")
    return LatencySelect(runtime or "onnxruntime", target, None if target is not None else ratios,
                         batch=batch, threads=threads, refit=refit)


def _default_pipeline(method: str, ratios: dict[str, float], round_to: int, global_rank: bool,
                      layers: float, layer_method: str = "angular", hf_heads: bool = False,
                      latency: Pass | None = None, refit: str | None = None,
                      sequential: bool = True, native: bool | None = None) -> list[Pass]:
    """``criterion → select [→ config_heads] [→ native_config] [→ layer_drop] [→ refit]`` (a selecting
    criterion such as ThiNet needs no select; ``config_heads``: HF models get head counts their config can
    express; ``native_config``: models with framework rules get widths their config expresses)."""
    crit = criterion(method, ratios["channel"], round_to)
    pipeline = [crit]
    if latency is not None and "scores" not in crit.provides:
        raise InputError(f"--method {method} selects channels itself: it can't use a latency table",
                         "use a scoring method (l1, taylor, …) with --runtime/--target-latency")
    if latency is not None:
        pipeline.append(latency)
    elif "scores" in crit.provides:
        pipeline.append(Select(ratios, round_to=round_to, global_rank=global_rank))
    elif ratios["head"] or ratios["hidden"]:
        raise InputError(f"--method {method} selects conv/linear channels itself: it can't prune heads "
                         "or the hidden width", "use a scoring method (l1, taylor, …) for --heads/--hidden")
    if ratios["head"] and hf_heads:
        pipeline.append(ConfigHeads())
    if native is not None:  # None: no rules or turned off; True: strict (see NativeConfig)
        pipeline.append(NativeConfig(strict=native))
    if layers:
        pipeline.append(LayerDrop(check_ratio("layers", layers), by=layer_method))
    refit = refit_mode(refit, method)
    if refit != "none":
        if "refits" in crit.provides:
            raise InputError(f"--method {method} refits its consumers itself", "drop --refit")
        pipeline.append(Refit(refit, sequential=sequential))
    return pipeline


def sensitivity(model: nn.Module, example_inputs: Any, analysis: Pass, *, calib: Iterable[Any] | None = None,
                example_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run an analysis pass (e.g. ``Sensitivity``) on ``model`` without pruning; returns what it
    found (``state.results[analysis.name]``: passes keep no state)."""
    program = trace(eval_mode(model), _as_tuple(example_inputs), dict(example_kwargs or {}))
    coupling = build_coupling(program)
    state = run_passes([analysis], State(model, program, coupling, calib=calib, services=services(coupling)))
    return state.results.get(analysis.name, {})


def apply_plan(model: nn.Module, example_inputs: Any, plan: Plan | str, *, check: bool = True,
               example_kwargs: dict[str, Any] | None = None) -> CompileResult:
    """Replay a saved plan (a Plan or a path to its JSON) on ``model``."""
    plan = Plan.load(plan) if isinstance(plan, str) else plan
    return compile(model, example_inputs, plan=plan, check=check, example_kwargs=example_kwargs)
