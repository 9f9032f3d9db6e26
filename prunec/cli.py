"""Command line: `prunec MODEL --channels 0.5 …`, `prunec inspect|profile|sensitivity MODEL`. Only the cli_* modules print or exit."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from prunec.errors import InputError, InternalError, PrunecError, TraceError
from prunec.cli_base import Parser, add_runtime_flags, calibration, console
from prunec.cli_recover import recover_command
from prunec.cli_report import print_summary
from prunec.cli_tools import inspect_command, profile_command, sensitivity_command

COMMANDS = {"inspect": inspect_command, "recover": recover_command, "profile": profile_command,
            "sensitivity": sensitivity_command}   # `prunec NAME …`; anything else compiles


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    from prunec.backends import BACKENDS
    p = Parser(prog="prunec", description="Structured-pruning compiler for PyTorch models. "
                "MODEL is a .pt2, a pickled module (.pt/.pth, with --trust-pickle), "
                "torchvision:NAME, timm:NAME, zoo:NAME or hf:DIR. Use 'prunec inspect MODEL' to list groups.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--channels", type=_ratio, default=0.0, help="fraction of conv/linear channels to remove")
    p.add_argument("--mlp", type=_ratio, default=0.0, help="fraction of MLP hidden units to remove")
    p.add_argument("--heads", type=_ratio, default=0.0, help="fraction of attention heads to remove")
    p.add_argument("--gqa", choices=["groups", "query"], default="groups",
                   help="--heads on GQA attention (fewer kv than query heads): remove whole kv groups (default), "
                        "or query heads inside every group, the same slots in each, kv heads kept")
    p.add_argument("--native-config", choices=["auto", "on", "off"], default="auto",
                   help="diffusers models: widths their config expresses, so from_pretrained reloads them "
                        "(auto: when every config axis fits, else the free plan; on: only such widths)")
    p.add_argument("--hidden", type=_ratio, default=0.0,
                   help="fraction of residual-stream width to remove (approximate: norms read it)")
    p.add_argument("--layers", type=_ratio, default=0.0, help="fraction of residual blocks to drop")
    p.add_argument("--method", default="l1", help="unit criterion: l1, l2, bn, taylor, wanda, thinet, …; "
                   "with --layers also a block criterion: angular (alias block-influence), position")
    p.add_argument("--global", dest="global_rank", action="store_true",
                   help="rank units across all groups instead of a uniform ratio per group")
    p.add_argument("--round-to", type=int, default=8, help="keep channel counts multiple of N (default 8)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for text models")
    p.add_argument("--weights", help="state dict (safetensors or torch.save) for a zoo architecture")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled module (runs its code)")
    p.add_argument("--target", default="torch", choices=sorted(BACKENDS) or ["torch"])
    p.add_argument("-o", "--output", help="artifact path (default: NAME.pruned + the target's suffix: .pt2, .onnx, _trt/, .mlpackage, .pte)")
    p.add_argument("--sparsity", default=None, help="semi-structured sparsity after pruning: 2:4 (onnx, tensorrt, coreml)")
    p.add_argument("--sparsity-method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"],
                   help="how 2:4 masks are chosen (wanda/sparsegpt calibrate on the example inputs)")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="2:4 wanda/sparsegpt and --refit: one forward for every layer's statistics instead of block by block "
                        "(default for models with a list of blocks: each block calibrated on the outputs of the "
                        "already sparsified blocks before it)")
    p.add_argument("--refit", choices=["none", "ls", "bias"], default=None,
                   help="after selection, refit the Linear and conv layers that read pruned units on --calib data: "
                        "ls (least squares; k×k convs: bias compensation), bias (FLAP bias compensation, into the "
                        "layer's bias or the BatchNorm after a bias-free conv); default: bias for --method flap, "
                        "else none")
    p.add_argument("--coreml-target", default="iOS16", help="Core ML minimum deployment target (default iOS16)")
    p.add_argument("--int8", action="store_true", help="tensorrt: build an INT8 engine (default FP16)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset for onnx/tensorrt (≥ 17, default 18)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plan", help="replay a saved plan (JSON) instead of scoring")
    p.add_argument("--save-plan", help="write the plan (group → kept units) as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.add_argument("--seed", type=int, default=0, help="seed for example inputs and calibration sampling")
    p.add_argument("--calib", help="calibration data: image folder, .npy/.npz/.pt tensors, or .txt/.jsonl text")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples to draw (default 64)")
    p.add_argument("--static", action="store_true",
                   help="keep the example's input shapes (default: any batch size, any sequence length)")
    p.add_argument("--target-macs", type=_ratio, default=None,
                   help="search the uniform ratio that keeps this fraction of MACs (e.g. 0.5)")
    p.add_argument("--target-params", type=_ratio, default=None,
                   help="search the uniform ratio that keeps this fraction of parameters")
    p.add_argument("--max-drop", type=_ratio, default=None,
                   help="largest ratio whose relative output error on --calib data stays ≤ this")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="hf: allow a model folder whose config names custom code (auto_map); runs that code")
    p.add_argument("--blockwise", action="store_true",
                   help="hf: decoder LLMs (Llama, Mistral, Qwen2): compile block by block, streaming weights from "
                        "the safetensors shards (automatic when the checkpoint is over a quarter of RAM)")
    p.add_argument("--target-latency", default=None,
                   help="latency to reach on --runtime: a fraction of the dense model's (0.5) or a time (12ms)")
    add_runtime_flags(p, default=None)
    from prunec.cli_recover import add_recover_flags
    add_recover_flags(p)
    return p


def _compile(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from prunec.distributed import process_group
    try:
        with process_group():   # torchrun: data-parallel calibration (prunec.distributed)
            return _run_compile(args)
    except InternalError as err:
        err.context.setdefault("model", args.model)
        err.context.setdefault("output_dir", str(Path(args.output).resolve().parent) if args.output else ".")
        raise


def _run_compile(args: argparse.Namespace) -> int:
    import torch

    import prunec
    from prunec.partial import PartsResult
    from prunec.atomic import atomic_path, check_writable
    from prunec.backends import ARTIFACTS, BACKENDS
    from prunec.load import load_model
    from prunec.passes.select import check_ratio

    for name in ("channels", "mlp", "heads", "hidden", "layers"):
        check_ratio(name, getattr(args, name))
    if args.round_to < 1:
        raise InputError(f"--round-to {args.round_to} must be ≥ 1", "use 1 (off), 8, 16 or 32")
    hf_input = args.model.startswith("hf:")
    out, is_dir = output_path(args.output, args.target, hf_input)
    for path in (args.report, args.save_plan):
        if path:
            check_writable(path)
    from prunec.cli_blockwise import run_blockwise, use_blockwise
    from prunec.distributed import is_distributed, shard, world
    if hf_input and use_blockwise(args):
        if is_distributed():
            raise InputError("the block-by-block compile (--blockwise, or a checkpoint over a quarter of RAM) "
                             "does not run under torchrun yet", "run it as one process")
        return run_blockwise(args, out)
    search = _search_pass(args)
    runtime = _runtime(args, search)
    torch.manual_seed(args.seed)
    with console.status("loading", spinner="dots") if console.is_terminal else nullcontext() as status:
        loaded = load_model(args.model, args.input_shape, args.weights, args.trust_pickle, args.seq_len,
                            trust_remote_code=args.trust_remote_code)
        if out is None:
            stem = f"{loaded.name.replace('/', '_').replace(':', '_')}.pruned"
            suffix = "" if hf_input and args.target == "torch" else ARTIFACTS.get(args.target, (".pt2", False))[0]
            out, is_dir = output_path(stem + suffix, args.target, hf_input)
        plan = prunec.Plan.load(args.plan) if args.plan else None
        calib = calibration(args, loaded)
        calib = shard(calib) if calib else calib   # torchrun: each rank calibrates on its share
        progress = (lambda stage: status.update(stage)) if status is not None else None
        passes = _passes(args, loaded, search)
        method, layer_method = _methods(args)
        inplace = not (args.recover_steps and not args.teacher)
        from prunec.cli_parts import check_whole_output, parts_refusal, refused, write_parts
        no_parts = parts_refusal(args, hf_input, out if args.output else None)
        started = time.perf_counter()
        try:
            result = prunec.compile(loaded.model, loaded.example_inputs, example_kwargs=loaded.example_kwargs,
                                    channels=args.channels, mlp=args.mlp, heads=args.heads, hidden=args.hidden,
                                    layers=args.layers, passes=passes,
                                    method=method, layer_method=layer_method, round_to=args.round_to,
                                    global_rank=args.global_rank, refit=args.refit, sequential=args.sequential,
                                    gqa=args.gqa, plan=plan, calib=calib, check=not args.no_verify, progress=progress,
                                    static=args.static, dynamic_shapes=loaded.extra.get("dynamic_shapes"),
                                    parts=no_parts is None,  # the whole model does not export: prune its parts
                                    runtime=runtime, target_latency=args.target_latency,
                                    batch=args.batch, threads=args.threads,
                                    native_config={"auto": None, "on": True, "off": False}[args.native_config],
                                    inplace=inplace)  # the original is no teacher: share what stays whole
        except TraceError as err:
            raise (refused(err, no_parts, out) if no_parts else err) from None
        if loaded.extra.get("note"):
            result.report.setdefault("notes", []).append(loaded.extra["note"])
        if isinstance(result, PartsResult):
            return write_parts(args, loaded, result, out, time.perf_counter() - started, status)
        check_whole_output(out, loaded.name)
        from prunec.cli_recover import recover_after_compile
        result = recover_after_compile(args, loaded, result, status)
        if inplace:  # verified: the original's weights are not needed to write the artifact
            result.release_original(loaded.model)
            loaded.model = None
            gc.collect()
        if progress:
            progress(f"writing {args.target} artifact")
        options = {"loaded": loaded, "sparsity": args.sparsity, "sparsity_method": args.sparsity_method,
                   "sequential": args.sequential,
                   "coreml_target": args.coreml_target, "int8": args.int8, "opset": args.opset,
                   "hf_folder": hf_input and is_dir,
                   "calib": [((), b) if isinstance(b, dict) else (tuple(b), {}) for b in calib] if calib else None}
        if world()[0] != 0:   # the other ranks join 2:4 calibration's reductions, rank 0 writes everything
            from prunec.backends.sparsity import apply_from_options
            apply_from_options(result, options)
            return 0
        result.report["artifact"] = BACKENDS[args.target](result, out, options)
    if args.save_plan:
        with atomic_path(args.save_plan) as tmp:
            result.plan.save(tmp)
    if args.report:
        with atomic_path(args.report) as tmp:
            Path(tmp).write_text(json.dumps(result.report, indent=1, default=str))
    print_summary(result.report, out)
    return 0


def output_path(output: str | None, target: str, hf_input: bool = False) -> tuple[Path | None, bool]:
    """-o with the target's suffix added when it has none; a wrong suffix is refused. For hf: inputs with
    the torch target, -o without .pt2 is a Hugging Face folder (from_pretrained loads it)."""
    from prunec.atomic import check_writable
    from prunec.backends import ARTIFACTS
    if output is None:
        return None, False
    suffix, is_dir = ARTIFACTS.get(target, (".pt2", False))
    out = Path(output)
    if hf_input and target == "torch" and out.suffix != ".pt2":
        is_dir = True
    elif target == "torch" and out.suffix == ".pt":  # a pickled module: models pruned part by part
        pass
    elif is_dir and suffix.startswith("_"):  # a folder named freely (tensorrt)
        pass
    elif out.suffix == "":
        out = out.with_name(out.name + suffix)
    elif out.suffix.lower() != suffix:
        raise InputError(f"-o {output} does not end in {suffix}, the {target} target's suffix",
                         f"write -o {out.with_suffix(suffix)}, or leave the suffix out")
    check_writable(out, directory=is_dir)
    return out, is_dir


def _search_pass(args: argparse.Namespace) -> Any:
    """--target-macs / --target-params / --max-drop → a TargetSearch pass (None without them)."""
    asked = [n for n in ("target_macs", "target_params", "max_drop") if getattr(args, n) is not None]
    if not asked:
        return None
    if len(asked) > 1:
        raise InputError(f"--{asked[0].replace('_', '-')} and --{asked[1].replace('_', '-')} both given",
                         "ask for one target")
    if args.plan:
        raise InputError("a target search and --plan both given", "drop one of them")
    for name in ("target_macs", "target_params"):
        value = getattr(args, name)
        if value is not None and not 0.0 < value <= 1.0:
            raise InputError(f"--{name.replace('_', '-')} {value} is outside (0, 1]",
                             "give the fraction to keep, e.g. 0.5")
    if args.max_drop is not None and (args.max_drop < 0 or not args.calib):
        raise InputError("--max-drop needs --calib data and a value ≥ 0",
                         "e.g. --max-drop 0.05 --calib images/ (relative output error on that data)")
    return asked[0]


RUNTIME_OF_TARGET = {"onnx": "onnxruntime", "executorch": "executorch", "torch": "torch", "tensorrt": "tensorrt"}


def _runtime(args: argparse.Namespace, search: str | None) -> str | None:
    """The runtime latency is measured on (None: no latency-aware selection); checked before loading."""
    from prunec.latency import parse_target
    from prunec.runtimes import get_runtime
    if args.runtime is None and args.target_latency is None:
        return None
    if search is not None or args.plan:
        raise InputError(f"--target-latency/--runtime and {'--plan' if args.plan else '--' + search.replace('_', '-')} "
                         "both given", "ask for one target")
    if args.batch < 1 or (args.threads is not None and args.threads < 1):
        raise InputError("--batch and --threads must be ≥ 1", "e.g. --batch 1 --threads 2")
    if args.target_latency is not None:
        parse_target(args.target_latency)
    runtime = args.runtime or RUNTIME_OF_TARGET.get(args.target, "onnxruntime")
    get_runtime(runtime)
    return runtime


def _passes(args: argparse.Namespace, loaded: Any, search: str | None) -> list | None:
    """The pipeline for target searches (None: compile's default pipeline from the ratios)."""
    if search is None:
        return None
    from prunec.compiler import criterion
    from prunec.passes import TargetSearch
    kinds = tuple(k for k, v in (("channel", args.channels), ("mlp", args.mlp), ("head", args.heads)) if v) \
        or ("channel", "mlp")
    method = criterion(args.method, 0.5, args.round_to)
    if search == "max_drop":
        from prunec.passes.sensitivity import output_error
        metric = output_error(loaded.model, [tuple(b) if not isinstance(b, dict) else b for b in calibration(args, loaded)])
        return [TargetSearch(target_macs=None, max_drop=args.max_drop, metric=lambda m: -metric(m),
                             method=method, round_to=args.round_to, kinds=kinds)]
    return [TargetSearch(target_macs=args.target_macs, target_params=args.target_params, method=method,
                         round_to=args.round_to, kinds=kinds)]


def _methods(args: argparse.Namespace) -> tuple[str, str]:
    """--method names a unit criterion (l1, wanda, …) or, with --layers, a layer criterion (angular, …)."""
    from prunec.passes.layer_drop import layer_criterion
    layer = layer_criterion(args.method)
    if layer is None:
        return args.method, "angular"
    if not args.layers:
        raise InputError(f"--method {args.method} scores residual blocks", "use it with --layers R")
    return "l1", layer


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torchao (imported by transformers and executorch when installed) registers enums with pytree, and torch
    # logs a deprecation warning for each on stderr: noise about those libraries' internals, not about the model
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return _compile(argv)
    except PrunecError as err:
        print(f"prunec: error: {err.one_line()}", file=sys.stderr)
        return 2
    except InternalError as err:
        from prunec.repro import write_bundle
        bundle = write_bundle(err, argv)
        where = f"; repro bundle in {bundle}" if bundle else ""
        print(f"prunec: {err.one_line()} Please report it{where}.", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("prunec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
