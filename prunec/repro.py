"""Repro bundle for an InternalError: plan, command, versions and traceback in one folder."""
from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from prunec.errors import InternalError

PACKAGES = ("prunec", "torch", "torchvision", "timm", "transformers", "numpy", "scipy", "onnx",
            "onnxruntime", "coremltools", "executorch")


def versions() -> dict[str, str]:
    """Python, platform and the installed version of every package prunec may touch."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_bundle(err: InternalError, argv: Sequence[str], root: str | Path | None = None) -> Path | None:
    """Write ``prunec-bug-<time>/`` (next to the output, else the working directory) holding
    plan.json (when known), command.json, versions.json and traceback.txt; None if unwritable."""
    base = Path(root or err.context.get("output_dir") or ".")
    folder = base / time.strftime("prunec-bug-%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plan = err.context.get("plan")
        if plan is not None:
            (folder / "plan.json").write_text(json.dumps(plan, indent=1))
        command: dict[str, Any] = {"argv": ["prunec", *argv], "model": err.context.get("model"),
                                   "cwd": str(Path.cwd())}
        (folder / "command.json").write_text(json.dumps(command, indent=1))
        (folder / "versions.json").write_text(json.dumps(versions(), indent=1))
        (folder / "traceback.txt").write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    except OSError:
        return None
    return folder
