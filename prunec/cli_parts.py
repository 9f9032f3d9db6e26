"""Command line, prune what traces: when MODEL does not export as one program (detectors: data-dependent
NMS), `prunec MODEL --channels R` prunes the submodules that export (prunec.partial) and writes what can
carry such a model (backends/parts.py); everything that needs one exported program is refused up front."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunec.errors import InputError, TraceError

# option → why it needs one exported program (checked only when the whole model does not export)
PARTS_REFUSED = {"plan": "a saved plan replays one exported program's groups",
                 "save_plan": "each part has its own plan (the --report lists each part's kept MACs)",
                 "target_macs": "the target search runs on one exported program",
                 "target_params": "the target search runs on one exported program",
                 "max_drop": "the target search runs on one exported program",
                 "runtime": "latency tables are measured on one exported program",
                 "target_latency": "latency tables are measured on one exported program",
                 "sparsity": "2:4 is not applied to a model pruned part by part",
                 "recover_steps": "recovery re-traces the whole trained model",
                 "refit": "parts are pruned without refits"}


def parts_refusal(args: argparse.Namespace, hf_input: bool, out: Path | None) -> str | None:
    """Why this command can't fall back to pruning the parts that export (None: it can); ``out``: -o
    with the target's suffix added (None: not given)."""
    from prunec.backends.parts import PARTS_WRITERS
    if args.target not in PARTS_WRITERS:
        return f"--target {args.target} needs one exported program"
    if hf_input:
        return "hf: models are written as a from_pretrained folder with a model.pt2 (one exported program)"
    if args.gqa != "groups" or args.native_config == "on":
        flag = "--gqa query" if args.gqa != "groups" else "--native-config on"
        return f"{flag} is not applied to a model pruned part by part"
    if out is not None and out.suffix == ".pt2":
        return f"-o {out} names an ExportedProgram (.pt2)"
    for name, why in PARTS_REFUSED.items():
        value = getattr(args, name, None)
        if value and not (name == "refit" and value == "none"):
            return f"--{name.replace('_', '-')} is not supported for parts ({why})"
    return None


def refused(err: TraceError, why: str, out: Path | None) -> InputError:
    """The one-line error when the whole model does not export and ``why`` forbids pruning its parts."""
    first = _first(err.message)
    if why.startswith("--target") or why.startswith("hf:"):
        fix = "use --target torch (a pickled module + safetensors) or --target onnx: they prune the submodules that export"
    elif why.startswith("-o ") and out is not None:
        fix = f"write -o {out.with_suffix('.pt')} (a pickled module), or use --target onnx"
    else:
        fix = f"drop {why.split()[0]}: then the submodules that export are pruned"
    return InputError(f"{first}: only its parts can be pruned, and {why}", fix)


def check_whole_output(out: Path, name: str) -> None:
    """-o NAME.pt is the pickled module of a model pruned part by part: refused for a model that exports whole."""
    if out.suffix == ".pt":
        raise InputError(f"-o {out} is for models pruned part by part (a pickled module), and {name} exports whole",
                         f"write -o {out.with_suffix('.pt2')}")


def write_parts(args: argparse.Namespace, loaded: Any, result: Any, out: Path, seconds: float, status: Any) -> int:
    """Write the artifact of a model pruned part by part (-o as given, else NAME.pruned + the parts suffix),
    the --report, and print the summary."""
    import json

    from prunec.atomic import atomic_path, check_writable
    from prunec.backends.parts import PARTS_SUFFIX, PARTS_WRITERS
    if args.output is None:
        out = check_writable(Path(f"{loaded.name.replace('/', '_').replace(':', '_')}.pruned{PARTS_SUFFIX[args.target]}"))
    if status is not None:
        status.update(f"writing {args.target} artifact")
    result.report["time_s"] = round(seconds, 2)
    options = {"loaded": loaded, "opset": args.opset, "static": args.static}
    result.report["artifact"] = PARTS_WRITERS[args.target](result, out, options)
    if args.report:
        with atomic_path(args.report) as tmp:
            Path(tmp).write_text(json.dumps(result.report, indent=1, default=str))
    print("\n".join(parts_lines(result.report, out)))
    return 0


def _first(message: str) -> str:
    """'torch.export could not trace X: ErrorType' of a trace error's message."""
    return ": ".join(message.splitlines()[0].split(": ")[:2])[:200]


def parts_lines(report: dict[str, Any], out: Path) -> list[str]:
    """The summary of a parts result: each part, what stayed dense and why, the boundaries, the checks."""
    pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "n/a"
    lines = [f"whole   {_first(report['whole_model_trace_error'])}: pruned the submodules that export"]
    for p in report["parts"]:
        check = "verify skipped (--no-verify)" if p["rel_err"] is None else \
            f"verify PASSED (vs its zeroed reference): rel err {p['rel_err']:.3g} ≤ 0.0001"
        state = f"MACs {pct(p['macs_after'], p['macs_before'])}; {check}" if p["synced"] else \
            f"kept dense: {p['note']}"
        lines.append(f"part    {p['part']} ({p['class']}): {state}")
    lines += [f"dense   {path}: {why}" for path, why in report["left_dense"].items()] or \
        ["dense   no module with parameters left dense (the code between the parts holds no weights)"]
    tied = [b for b in report["boundaries"] if b["tied"]]
    groups = ", ".join(f"{g['size']}→{g['kept']}" + (f" kept whole: {g['kept_whole']}" if g["kept_whole"] else "")
                       for g in report["tied_groups"][:6]) + (" …" if len(report["tied_groups"]) > 6 else "")
    lines.append(f"ties    {len(tied)}/{len(report['boundaries'])} part boundaries tied"
                 + (f" (groups, units before→after: {groups})" if report["tied_groups"] else "")
                 + f"; {len(report['frozen_boundaries'])} not pruned")
    lines += [f"frozen  {f}" for f in report["frozen_boundaries"]]
    if report.get("boundaries_note"):
        lines.append(f"ties    {report['boundaries_note']}")
    lines += [*_end_to_end(report["verify_end_to_end"]),
              f"params  {report['params_before']:,} → {report['params_after']:,} "
              f"({pct(report['params_after'], report['params_before'])})",
              f"MACs    {report['macs_before']:,} → {report['macs_after']:,} "
              f"({pct(report['macs_after'], report['macs_before'])}; counted conv/linear/matmul)",
              f"module  {'synced (your class, every pruned part swapped in)' if report['module_synced'] else 'some parts kept dense (see part lines)'}",
              f"time    {report['time_s']:.2f}s"]
    return lines + _artifact(report.get("artifact") or {}) + [f"wrote   {out}"]


def _end_to_end(v: dict[str, Any]) -> list[str]:
    """How the whole model was checked against the original with every part's dropped units zeroed."""
    in_context = (f"every pruned part equals its zeroed reference on the inputs it received in the pruned run (rel err "
                  f"{v['parts_in_context_rel_err']:.3g}) and every tied boundary drops the same units on both sides")
    if v.get("output_elements") == 0:
        return ["e2e     outputs NOT compared: the example's outputs are empty (e.g. no detection above the score "
                "threshold: random weights?); " + in_context]
    head = "e2e     PASSED (whole model vs the original with the dropped units zeroed): "
    if v["outputs_equal"]:
        return [head + f"outputs equal, rel err {v['rel_err']:.3g} ≤ 0.0001"]
    if v.get("outputs_equal_float64"):
        return [head + f"float32 outputs differ (rel err {v['rel_err']:.3g}: top-k/NMS re-ranked near-tied scores); "
                f"in float64 equal, rel err {v['float64_rel_err']:.3g}"]
    return [head + f"outputs differ (rel err {v['rel_err']:.3g}, not equal in float64 either); " + in_context]


def _artifact(a: dict[str, Any]) -> list[str]:
    if a.get("target") == "torch":
        weights = f"{a['weights_reload_rel_err']:.3g}" if a.get("weights_reload_rel_err") is not None else "not checked"
        return [f"artifact pickled module (load: {a['load']}: it runs the classes' code), read back: rel err "
                f"{a['reload_rel_err']:.3g}", f"weights {a['weights']} (load: {a['weights_load']}, no pickle), "
                f"read back into the dense model: rel err {weights}"]
    if a.get("target") == "onnx":
        return [f"runtime onnxruntime vs torch on {name} {c['input_shapes']}: " + (
                f"max abs err {c['max_abs_err']:.3g}, rel err {c['rel_err']:.3g} (outputs {c['output_shapes'][:3]})"
                if c["output_elements"] else f"outputs empty in both (shapes {c['output_shapes'][:3]}): values NOT compared")
                for name, c in a["checks"].items()]
    return []
