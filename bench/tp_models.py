"""Torch-Pruning's test-suite models (tests/test_tp_models.py) compiled by prunec: verified / MACs
cut / why not. Writes the `tpmodels` section of docs/coverage.md.

    python bench/tp_models.py
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_section  # noqa: E402
from prunec.errors import PrunecError  # noqa: E402
from tests.test_tp_models import TP_MODELS, compile_tp  # noqa: E402

DOC = ROOT / "docs" / "coverage.md"
BEGIN, END = "<!-- tpmodels:begin -->", "<!-- tpmodels:end -->"
warnings.filterwarnings("ignore")


def row(case) -> str:
    torch.manual_seed(0)
    opts = case.options or {"channels": 0.5}
    flags = " ".join(f"--{k} {v}" for k, v in opts.items())
    try:
        r = compile_tp(case).report
    except PrunecError as err:
        return f"| `{case.name}` | {flags} | refused (exit 2) | – | – | {err.one_line()[:160]} |"
    v = r["verify"]
    verdict = ("✅ exact" if v["exact"] else "✅ approximate") if v["passed"] else "❌"
    s = r.get("shortfall")
    why = "–" if not s else f"{s['status']}: " + "; ".join(
        f"{x['reason']} ({100 * x['share']:.0f}% of params)" for x in s["reasons"])
    return (f"| `{case.name}` | {flags} | {verdict} | {v['rel_err']:.1e} | "
            f"{r['macs_after'] / r['macs_before']:.2f} | {why} |")


def main() -> None:
    lines = [BEGIN, "## Torch-Pruning's test-suite models (bench/tp_models.py)", "",
             f"Command: `python bench/tp_models.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"load {os.getloadavg()[0]:.1f}). The model shapes of Torch-Pruning's `tests/` folder, rebuilt small in "
             "`tests/test_tp_models.py` (same structure, our code), compiled with `round_to=1`, L1. "
             "*why not* is the report's `shortfall` (nothing or < half the asked MACs cut).", "",
             "| Torch-Pruning test | flags | verified | rel err | MACs after/before | why not |",
             "|---|---|---|---|---|---|"]
    for case in TP_MODELS:
        lines.append(row(case))
        print(lines[-1], flush=True)
    lines.append(END)
    write_section(DOC, BEGIN, END, lines)


if __name__ == "__main__":
    main()
