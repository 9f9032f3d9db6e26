"""Command line, recovery: `prunec MODEL … --recover-steps N --data PATH` and `prunec recover PRUNED …`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from prunec.cli_base import Parser, console, load_batches
from prunec.errors import InputError


def add_recover_flags(p: argparse.ArgumentParser, standalone: bool = False) -> None:
    """Distillation flags: after a compile (--recover-steps N) or for `prunec recover`."""
    steps = "--steps" if standalone else "--recover-steps"
    p.add_argument(steps, dest="recover_steps", type=int, default=0 if not standalone else None,
                   required=standalone, help="distil the pruned model from the original for N steps")
    p.add_argument("--data", help="recovery data: image folder, .npy/.npz/.pt tensors, or .txt/.jsonl text")
    if not standalone:
        p.add_argument("--teacher", help="teacher MODEL (default: the model being pruned)")
    p.add_argument("--lora", type=int, default=None, metavar="R", help="train LoRA adapters of rank R, merged at the end")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--recover-samples", type=int, default=512, help="samples drawn from --data (default 512)")
    p.add_argument("--recover-batchnorm", choices=["train", "frozen"], default="train",
                   help="train (default): BatchNorm uses batch statistics while training, re-estimated at the end; "
                        "frozen: keep the model's running statistics (small batches of little data)")
    p.add_argument("--eval", dest="eval_data", help="held-out data (same formats): agreement/KD loss before and after")
    p.add_argument("--checkpoint-dir", help="save every 50 steps here and resume from it")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun/accelerate launch: train a sharded (FSDP) copy instead of DDP replicas")


def _recovery(args: argparse.Namespace, loaded: Any, example_inputs: Any) -> tuple[Any, list]:
    """The Recovery settings and the --data batches (the --calib formats; hf: text via its tokenizer)."""
    from prunec.recover import Recovery
    if args.recover_steps < 1:
        raise InputError(f"--recover-steps {args.recover_steps} must be ≥ 1", "e.g. --recover-steps 300")
    if not args.data:
        raise InputError("recovery needs data", "pass --data PATH (image folder, .npy/.npz/.pt, .txt/.jsonl)")

    data = load_batches(args.data, loaded, args.recover_samples, args.seed, example_inputs)
    eval_data = load_batches(args.eval_data, loaded, 64, args.seed + 1, example_inputs) if args.eval_data else None
    return Recovery(lr=args.recover_lr, lora=args.lora, seed=args.seed, eval_data=eval_data,
                    batchnorm=args.recover_batchnorm,
                    checkpoint_dir=args.checkpoint_dir, fsdp=args.fsdp, progress=console.is_terminal), data


def recover_after_compile(args: argparse.Namespace, loaded: Any, result: Any, status: Any) -> Any:
    """`prunec MODEL --channels 0.5 --recover-steps N --data PATH`: distil, then re-trace the trained module."""
    if not args.recover_steps:
        return result
    from prunec.load import load_model
    recovery, data = _recovery(args, loaded, loaded.example_inputs)
    teacher = load_model(args.teacher, args.input_shape, None, args.trust_pickle, args.seq_len).model \
        if args.teacher else loaded.model
    if status is not None:
        status.stop()
    run = recovery.run(result.model, teacher, data, args.recover_steps)
    if status is not None:
        status.start()
        status.update("re-tracing the recovered model")
    return _retraced(result, run, loaded.example_inputs, loaded.example_kwargs)


def _retraced(result: Any, run: Any, inputs: Any, kwargs: dict[str, Any]) -> Any:
    """The artifact is written from a fresh trace of the trained module (LoRA merges replace tensors)."""
    import prunec
    fresh = prunec.apply_plan(run.model, inputs, prunec.Plan(), check=False, example_kwargs=kwargs)
    result.model, result.program = fresh.model, fresh.program
    result.report["recover"] = run.report
    return result


def recover_command(argv: Sequence[str]) -> int:
    """`prunec recover PRUNED --teacher MODEL --data PATH --steps N -o OUT`."""
    p = Parser(prog="prunec recover", description="Distil a pruned model (.pt2 or MODEL spec) from its original.")
    p.add_argument("pruned", metavar="PRUNED")
    p.add_argument("--teacher", required=True, help="the original MODEL (same specs as `prunec MODEL`)")
    p.add_argument("-o", "--output", required=True, help="recovered .pt2")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--input-shape")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    add_recover_flags(p, standalone=True)
    args = p.parse_args(argv)
    import torch

    from prunec.atomic import atomic_path, check_writable
    from prunec.load import load_model
    out = check_writable(args.output)
    if args.report:
        check_writable(args.report)
    torch.manual_seed(args.seed)
    teacher = load_model(args.teacher, args.input_shape, None, args.trust_pickle, args.seq_len)
    student, inputs = _load_student(args, teacher)
    recovery, data = _recovery(args, teacher, inputs)
    run = recovery.run(student, teacher.model, data, args.recover_steps)
    import prunec
    ep = prunec.apply_plan(run.model, inputs, prunec.Plan(), check=False).export()  # dynamic dims as compile's
    with atomic_path(out) as tmp:
        torch.export.save(ep, tmp)
    if args.report:
        with atomic_path(args.report) as tmp:
            Path(tmp).write_text(json.dumps({"recover": run.report}, indent=1, default=str))
    print(recover_line(run.report) + f"\nwrote   {out}")
    return 0


def _load_student(args: argparse.Namespace, teacher: Any) -> tuple[Any, tuple[Any, ...]]:
    """A .pt2 becomes a trainable ProgramModule (its state as parameters); other specs load as usual."""
    import torch

    from prunec.load import load_model
    from prunec.program_module import ProgramModule, copy_graph
    from prunec.trace import Program
    path = Path(args.pruned)
    if path.suffix != ".pt2":
        loaded = load_model(args.pruned, args.input_shape, None, args.trust_pickle, args.seq_len)
        return loaded.model, loaded.example_inputs
    if not path.is_file():
        raise InputError(f"pruned model {path} does not exist", "pass the .pt2 that prunec wrote")
    try:
        ep = torch.export.load(path)
    except Exception as err:
        raise InputError(f"{path} is not a readable .pt2 ({type(err).__name__})", "write it with prunec") from None
    inputs = teacher.example_inputs  # the pruned model takes the original's inputs
    program = Program(ep, inputs)
    return ProgramModule(program, copy_graph(ep.graph)[0], program.state()), inputs


def recover_line(report: dict[str, Any]) -> str:
    loss = report["loss"]
    line = f"recover {report['steps']} steps in {report['time_s']:.1f}s: loss {loss[0]:.4g} → {loss[-1]:.4g}"
    if report.get("before") and report.get("after"):
        line += (f"; held-out agreement {report['before']['agreement']:.3f} → {report['after']['agreement']:.3f}, "
                 f"KD loss {report['before']['kd_loss']:.4g} → {report['after']['kd_loss']:.4g}")
    return line
