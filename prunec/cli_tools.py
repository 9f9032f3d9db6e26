"""Command line, the tools beside compile: `prunec profile|inspect|sensitivity MODEL`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from prunec.cli_base import Parser, add_runtime_flags, calibration
from prunec.errors import InputError


def profile_command(argv: Sequence[str]) -> int:
    """`prunec profile MODEL --runtime R`: time each prunable group's layers at candidate widths."""
    p = Parser(prog="prunec profile", description="Measure the latency of every conv/linear a prunable "
                "group's width touches, at candidate widths, on a runtime; cache the table and print "
                "each group's latency staircase.")
    p.add_argument("model", metavar="MODEL")
    add_runtime_flags(p)
    p.add_argument("--points", type=int, default=16, help="widths timed per group (default 16)")
    p.add_argument("--op-timing", choices=["kernel", "wall"], default="kernel",
                   help="kernel (default): each op's own kernel time where the runtime reports it (onnxruntime, "
                   "executorch), without the layout changes a standalone op pays at its edges; wall: end to end")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--reprofile", action="store_true", help="measure again, replacing the cached table")
    p.add_argument("-o", "--output", help="also write the table (JSON) here")
    for flag in ("--input-shape", "--weights"):
        p.add_argument(flag)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--trust-pickle", action="store_true")
    args = p.parse_args(argv)
    import prunec
    from prunec.atomic import atomic_path, check_writable
    from prunec.latency import cache_dir, describe_staircase, profile
    from prunec.load import load_model
    from prunec.runtimes import get_runtime
    get_runtime(args.runtime)
    if args.batch < 1 or (args.threads is not None and args.threads < 1) or args.points < 2 or args.rounds < 1:
        raise InputError("--batch, --threads and --rounds must be ≥ 1 and --points ≥ 2", "e.g. --batch 1 --points 16")
    if args.output:
        check_writable(args.output)
    loaded = load_model(args.model, args.input_shape, args.weights, args.trust_pickle, args.seq_len)
    coupling = prunec.analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    table = profile(loaded.model, coupling.program, coupling, args.runtime, args.batch, args.threads,
                    args.points, args.rounds, cache=cache_dir(), reprofile=args.reprofile, op_timing=args.op_timing)
    print(f"{loaded.name} on {args.runtime} (batch {args.batch}, {table.meta['key_fields']['threads']} threads): "
          f"dense {table.dense_ms:.4g} ms; {len(table.ops)} ops timed at widths in multiples of "
          f"{table.meta['key_fields']['multiple']} (every few widths for groups no wider), "
          + ("by their kernels' own time (layout changes at their edges left out)"
             if table.meta["key_fields"].get("op_timing") == "kernel" else "end to end"))
    print("\n".join(describe_staircase(table)))
    if args.output:
        with atomic_path(args.output) as tmp:
            Path(tmp).write_text(json.dumps(table.to_json(), indent=1))
    print(f"table   {table.meta.get('cache')}")
    return 0


def inspect_command(argv: Sequence[str]) -> int:
    p = Parser(prog="prunec inspect", description="List the prunable groups of MODEL and why others are frozen.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input-shape")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    import prunec
    from prunec.load import load_model
    loaded = load_model(args.model, args.input_shape, trust_pickle=args.trust_pickle, seq_len=args.seq_len)
    coupling = prunec.analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    from prunec.diagnose import describe_inspect, inspect_summary
    summary = inspect_summary(coupling)
    groups = [{"name": g.name, "kind": g.kind, "units": g.size,
               "unit_size": int(next(iter(g.members.values())).shape[1]),
               "tensors": [f"{f}@{d}" for f, d in g.members], "approximate": g.approximate}
              for g in coupling.groups]
    if args.json:
        print(json.dumps({"summary": summary, "groups": groups, "frozen": coupling.frozen}, indent=1))
        return 0
    print(describe_inspect(summary))
    table = Table(title=f"{loaded.name}: {len(groups)} prunable groups")
    for col in ("group", "kind", "units", "tensors"):
        table.add_column(col)
    for g in groups:
        table.add_row(g["name"], g["kind"], f"{g['units']}×{g['unit_size']}", str(len(g["tensors"])))
    Console().print(table)
    frozen = Table(title=f"{len(coupling.frozen)} frozen tensor dims (first 30)")
    frozen.add_column("tensor dim")
    frozen.add_column("why")
    for name, why in list(coupling.frozen.items())[:30]:
        frozen.add_row(name, why)
    Console().print(frozen)
    return 0


def sensitivity_command(argv: Sequence[str]) -> int:
    p = Parser(prog="prunec sensitivity", description="Prune each group alone at several ratios and "
                "write the relative output error on --calib data (JSON, and a PNG plot next to it).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--calib", help="calibration data (default: the example input)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--method", default="l1")
    p.add_argument("--by", default="group", choices=["group", "kind"])
    p.add_argument("--ratios", default="0.1,0.3,0.5,0.7", help="comma-separated fractions to remove")
    p.add_argument("-o", "--output", default="sensitivity.json", help="JSON path (the plot gets .png)")
    for flag in ("--input-shape", "--weights"):
        p.add_argument(flag)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    import prunec
    from prunec.atomic import check_writable
    from prunec.load import load_model
    from prunec.compiler import criterion
    from prunec.passes.sensitivity import Sensitivity
    out = Path(args.output if Path(args.output).suffix == ".json" else args.output + ".json")
    check_writable(out)
    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise InputError(f"--ratios {args.ratios} is not a list of numbers", "write e.g. --ratios 0.1,0.3,0.5") from None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise InputError(f"--ratios {args.ratios} must be fractions in (0, 1)", "write e.g. --ratios 0.1,0.3,0.5")
    loaded = load_model(args.model, args.input_shape, args.weights, args.trust_pickle, args.seq_len,
                        trust_remote_code=args.trust_remote_code)
    calib = calibration(args, loaded)
    sens = Sensitivity(ratios, out=out, plot=out.with_suffix(".png"), by=args.by,
                       method=criterion(args.method))
    result = prunec.sensitivity(loaded.model, loaded.example_inputs, sens, calib=calib,
                                example_kwargs=loaded.example_kwargs)
    worst = sorted(result["units"].items(), key=lambda kv: -kv[1]["drop"][-1])[:5]
    print(f"{len(result['units'])} {args.by}s, {result['metric']} at ratio {ratios[-1]}; most sensitive:")
    for name, row in worst:
        print(f"  {row['drop'][-1]:.3g}  {name}")
    print(f"wrote   {out} and {out.with_suffix('.png')}")
    return 0
