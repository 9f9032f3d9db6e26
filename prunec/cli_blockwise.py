"""Command line, block by block: `prunec hf:DIR --heads R --mlp R --blockwise` (prunec.blockwise)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prunec.cli_base import console
from prunec.errors import InputError


def use_blockwise(args: argparse.Namespace) -> bool:
    """--blockwise, or a supported decoder checkpoint over a quarter of physical memory."""
    import os

    from prunec.blockwise import is_supported
    from prunec.shards import Checkpoint
    folder = args.model[3:]
    if args.blockwise:
        return True
    if not is_supported(folder):
        return False
    try:
        size = Checkpoint.open(folder).nbytes
    except InputError:
        return False
    return size > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


BLOCKWISE_REFUSED = {"channels": "use --mlp for MLP units", "hidden": "the hidden width is kept block by block",
                     "layers": "blocks are pruned one at a time, none dropped", "plan": "plans are not replayed",
                     "save_plan": "the report holds each block's kept counts", "global_rank": "widths are uniform",
                     "sparsity": "2:4 is not applied", "recover_steps": "recover the written folder afterwards",
                     "target_macs": "give --heads/--mlp", "target_params": "give --heads/--mlp",
                     "max_drop": "give --heads/--mlp", "input_shape": "use --seq-len", "weights": "the folder holds them",
                     "target_latency": "give --heads/--mlp", "runtime": "latency tables are per whole model",
                     "refit": "refits are not applied block by block"}


def run_blockwise(args: argparse.Namespace, out: Path | None) -> int:
    """`prunec hf:DIR --heads R --mlp R -o OUT --blockwise`: prunec.blockwise, then a per-block summary."""
    from prunec.blockwise import compile_blockwise
    from prunec.hf import _tokenizer
    if getattr(args, "gqa", "groups") != "groups":
        raise InputError("--gqa query is not supported block by block (whole kv groups only)",
                         "drop --gqa, or compile without --blockwise if the model fits in memory")
    given = [n for n in BLOCKWISE_REFUSED if getattr(args, n, None)]
    if given:
        flag = "--" + given[0].replace("_", "-").replace("global-rank", "global")
        raise InputError(f"{flag} is not supported block by block ({BLOCKWISE_REFUSED[given[0]]})",
                         f"drop {flag}, or compile without --blockwise if the model fits in memory")
    if args.target != "torch":
        raise InputError(f"--target {args.target} is not supported block by block (it writes a Hugging Face folder)",
                         "use --target torch")
    if out is not None and out.suffix == ".pt2":
        raise InputError(f"-o {out} is a .pt2, but the block-by-block path writes a Hugging Face folder",
                         "give -o a folder name")
    folder = Path(args.model[3:])
    out = out or Path(f"{folder.name}.pruned")
    from prunec.blockwise import decoder_config
    config = decoder_config(folder)  # refuses other models before any work
    calib = None
    if args.calib:
        import torch

        from prunec.calib import load_text_calib
        ids = torch.zeros(1, args.seq_len or 32, dtype=torch.long)
        calib = [b["input_ids"] for b in load_text_calib(args.calib, {"input_ids": ids}, _tokenizer(folder),
                                                         args.calib_samples, args.seed,
                                                         getattr(config, "vocab_size", None))]
    progress = (lambda stage: console.print(stage)) if console.is_terminal else None
    report = compile_blockwise(folder, out, heads=args.heads, mlp=args.mlp, method=args.method,
                               round_to=args.round_to, seq_len=args.seq_len or 32, seed=args.seed, calib=calib,
                               check=not args.no_verify, progress=progress)
    if args.report:
        from prunec.atomic import atomic_path
        with atomic_path(args.report) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(_blockwise_lines(report, out)))
    return 0


def _blockwise_lines(report: dict[str, Any], out: Path) -> list[str]:
    """One line per block (verify, read-back), then params, memory and time."""
    lines = []
    for b in report["blocks"]:
        v = b["verify"]
        check = (f"verify PASSED (exact, vs its zeroed reference): rel err {v['rel_err']:.3g} ≤ 0.0001"
                 if v else "verify skipped (--no-verify)")
        lines.append(f"block {b['block']:>3}  {check}; read back into the config's layer: rel err "
                     f"{b['reload_rel_err']:.3g}; {b['time_s']:.1f}s")
    gb = lambda n: f"{n / 1e9:.2f} GB"
    before, after = report["params_before"], report["params_after"]
    lines += [f"blocks  params {before:,} → {after:,} ({100 * after / max(before, 1):.1f}%); config "
              + ", ".join(f"{k} {v}" for k, v in report["config"].items()),
              f"memory  peak RSS {gb(report['peak_rss_mb'] * 2**20)} ({report['peak_rss_mb'] * 2**20 / report['model_bytes']:.2f}× "
              f"the {gb(report['model_bytes'])} checkpoint; {gb(report['rss_at_start_mb'] * 2**20)} before the first block)",
              f"time    {report['time_s']:.1f}s",
              *(f"note    {n}" for n in report["notes"]),
              f"wrote   {out} (from_pretrained folder, {gb(report['output_bytes'])})"]
    return lines
