"""What every command-line module shares: the stderr console and a parser whose errors are one line, exit 2."""
from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from rich.console import Console

from prunec.errors import InputError

console = Console(stderr=True, highlight=False)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"prunec: error: {message}. Run 'prunec --help' for usage.", file=sys.stderr)
        raise SystemExit(2)


def add_runtime_flags(p: argparse.ArgumentParser, default: str | None = "onnxruntime") -> None:
    """--runtime/--batch/--threads: where latency is measured (compile and `prunec profile`)."""
    p.add_argument("--runtime", default=default, help="time widths on this runtime: onnxruntime, executorch, "
                   "torch, tensorrt (needs a CUDA GPU) (with --channels: widths snap to its latency steps; default "
                   "for --target-latency: the --target's runtime)")
    p.add_argument("--batch", type=int, default=1, help="batch size latency is measured at (default 1)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all CPUs)")


def load_batches(path: str, loaded: Any, n: int, seed: int, example_inputs: Any = None) -> list:
    """Batches from a --calib/--data PATH: positional inputs like the example's (``example_inputs``, default
    the loaded model's), or keyword inputs (hf:) tokenised by the model's own tokenizer."""
    from prunec.calib import load_calib, load_text_calib
    if loaded.example_kwargs:
        embed = getattr(loaded.model, "get_input_embeddings", lambda: None)()
        return load_text_calib(path, loaded.example_kwargs, loaded.extra.get("tokenizer"), n, seed,
                               getattr(embed, "num_embeddings", None))
    return load_calib(path, loaded.example_inputs if example_inputs is None else example_inputs, n, seed)


def calibration(args: argparse.Namespace, loaded: Any) -> list | None:
    """The --calib batches (``--calib-samples``, ``--seed``); None without --calib."""
    if not args.calib:
        return None
    if args.calib_samples < 1:
        raise InputError(f"--calib-samples {args.calib_samples} must be ≥ 1", "e.g. --calib-samples 64")
    return load_batches(args.calib, loaded, args.calib_samples, args.seed)
