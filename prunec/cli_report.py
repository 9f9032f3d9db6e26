"""Command line, the compile's summary: the lines `prunec MODEL …` prints from its report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

FP16_REL_ERR = 1e-2   # model_fp16.onnx vs torch: FP16 rounding stays well below (4e-4–8e-4 on ResNet-50, DeiT-Tiny)


def print_summary(report: dict[str, Any], out: Path) -> None:
    """The compile's summary on stdout: sizes, the verifier, groups, timings, latency, notes, the artifact."""
    from prunec.cli_recover import recover_line
    from prunec.diagnose import describe_shortfall
    v = report.get("verify") or {}
    pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "n/a"
    shortfall = report.get("shortfall")
    lines = [
        *([f"warning {describe_shortfall(shortfall)}"] if shortfall else []),
        f"params  {report['params_before']:,} → {report['params_after']:,} "
        f"({pct(report['params_after'], report['params_before'])})",
        f"MACs    {report['macs_before']:,} → {report['macs_after']:,} "
        f"({pct(report['macs_after'], report['macs_before'])})",
        *verify_lines(v),
        f"groups  {sum(1 for g in report['groups'] if g['kept'] < g['size'])} pruned of "
        f"{len(report['groups'])}; {len(report['frozen'])} tensor dims frozen",
        f"module  {'synced (your class, attributes updated)' if report['module_synced'] else report['module_note']}",
        f"time    {report['time_s']['total']:.2f}s ({', '.join(f'{k} {v:.2f}' for k, v in report['time_s'].items() if k != 'total')})",
        *latency_lines(report.get("latency")),
        *(f"note    {note}" for note in report.get("notes", [])),
        *artifact_lines(report.get("artifact") or {}),
        *([recover_line(report["recover"])] if report.get("recover") else []),
        f"wrote   {out}",
    ]
    print("\n".join(lines))


def latency_lines(lat: dict[str, Any] | None) -> list[str]:
    """Predicted vs measured latency of the result on the runtime (dense timed in the same run)."""
    if not lat:
        return []
    where = f"{lat['runtime']}, batch {lat['batch']}, {lat['threads']} threads"
    pred = f"predicted {lat['predicted_ms']:.4g} ms ({lat['predicted_ratio']:.2f} of dense)" + (
        "" if lat.get("calibrated", True) else " by standalone ops (the table is not calibrated on the whole "
        "model until a --target-latency compile calibrates it)")
    if lat.get("measured_ms") is None:
        return [f"latency {pred}; not measured: {lat.get('reason')} ({where})"]
    aim = f"; target {lat['target_ms']:.4g} ms" if lat.get("target_ms") else ""
    return [f"latency {pred}, measured {lat['measured_ms']:.4g} ms vs dense {lat['dense_ms']:.4g} ms "
            f"({lat['measured_ratio']:.2f}){aim} ({where}; load {lat.get('load')})"]


def verify_lines(v: dict[str, Any]) -> list[str]:
    """The exact part's check (must pass), then the approximate groups' error (reported only)."""
    if not v:
        return ["verify  skipped (--no-verify)"]
    sizes = "/".join(str(b) for b in v.get("batch_sizes") or []) or "?"
    lines = [f"verify  {'PASSED' if v.get('passed') else 'FAILED'} (exact part, batch {sizes}): "
             f"max abs err {v['max_abs_err']:.3g}, rel err {v['rel_err']:.3g} ≤ {v['tolerance']:g}"]
    approx = v.get("approximate")
    if approx:
        groups = ", ".join(approx["groups"][:3]) + (" …" if len(approx["groups"]) > 3 else "")
        lines.append(f"approx  {len(approx['groups'])} approximate group(s) ({groups}): max abs err "
                     f"{approx['max_abs_err']:.3g}, rel err {approx['rel_err']:.3g} (reported, not checked)")
    refit = v.get("refit")
    if refit:
        lines.append(f"refit   output error vs original, in sample (on calibration data it was fitted to) "
                     f"{refit['rel_err_before']:.4g} → {refit['rel_err_after']:.4g}"
                     f" ({'applied' if refit['applied'] else 'not applied: worse than no refit'})")
    lines += [f"verify  note: {n}" for n in v.get("notes") or []]
    return lines


def fp16_lines(fp16: dict[str, Any] | None) -> list[str]:
    """--target tensorrt's model_fp16.onnx: not written (why), not run here (why), or its error vs torch."""
    if not fp16:
        return []
    if not fp16.get("written"):
        return [f"fp16    model_fp16.onnx not written ({fp16.get('reason')}): FP16 engines need TensorRT 10's flag"]
    if not fp16.get("checked"):
        return [f"fp16    model_fp16.onnx not run here: {fp16.get('reason')}"]
    err = fp16["rel_err"]
    verdict = "FP16's own rounding" if err <= FP16_REL_ERR else \
        "more than FP16 rounding (overflow or precision-sensitive layers): check accuracy before deploying"
    return [f"fp16    model_fp16.onnx in onnxruntime: rel err vs torch {err:.3g}, {verdict}"]


def artifact_lines(artifact: dict[str, Any]) -> list[str]:
    """What the backend checked with its runtime, and what it could not do."""
    lines = []
    if "runtime" in artifact and "max_abs_err" in artifact:
        lines.append(f"runtime {artifact['runtime']}: max abs err vs torch {artifact['max_abs_err']:.3g}")
    lines += fp16_lines(artifact.get("fp16_onnx"))
    if "engine" in artifact and not artifact["engine"]:
        lines.append(f"engine  not built: {artifact.get('reason', 'unknown reason')}")
    if "prediction" in artifact:
        lines.append(f"predict {artifact['prediction']}")
    sparsity = artifact.get("sparsity")
    if isinstance(sparsity, dict):
        lines.append(f"2:4     {sparsity.get('method')}: {sparsity.get('layers_sparsified')} layers sparse, "
                     f"{sparsity.get('layers_skipped')} skipped (too few or odd input channels)")
    return lines
