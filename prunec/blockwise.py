"""Block-by-block compile of ``hf:`` decoder checkpoints larger than RAM (Llama, Mistral, Qwen2).

The model is built on the meta device (no weights). One decoder block is traced; its coupling is
the same for every block, so its groups (heads, MLP units) are mapped onto block ``i`` by module
path (``model.layers.{i}.`` + the block's FQN) and block ``i``'s weights are swapped into the traced
program. Each block is streamed from the shards, scored, selected (same ratio, ``round_to`` and
config-valid head counts as ``prunec.compile``), rewritten, verified against its zeroed reference
on the activations the already-pruned blocks before it produced, written as its own output shard,
read back into the config's own layer class and compared, and freed. Peak memory is about one
block (original + pruned + reference) plus the activations. The hidden width is not pruned here.
"""
from __future__ import annotations

import copy
import gc
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunec.atomic import atomic_path
from prunec.backends.torch_backend import TOKENIZER_FILES
from prunec.coupling import Coupling
from prunec.cut import Cut
from prunec.errors import InputError, InternalError, first_line
from prunec.plan import Plan
from prunec.shards import Checkpoint, ShardWriter
from prunec.trace import Program, trace
from prunec.verify import compare, verify

SUPPORTED = ("llama", "mistral", "qwen2")
COPIED = (*TOKENIZER_FILES, "generation_config.json")  # copied from the input folder as they are
Call = tuple[tuple[Any, ...], dict[str, Any]]


def decoder_config(folder: str | Path) -> Any:
    """The folder's transformers config, if its model is a decoder this path supports."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder} is not a Hugging Face model directory (no config.json)",
                         "pass hf:DIR where DIR was written by save_pretrained")
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise InputError(f"{folder / 'config.json'} is not a readable config ({first_line(err, 150)})",
                         "write it with save_pretrained") from None
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise InputError(f"--blockwise supports decoder LLMs ({', '.join(SUPPORTED)}), not model_type '{kind}'",
                         "drop --blockwise to compile the whole model in memory")
    config._attn_implementation = "sdpa"
    return config


def is_supported(folder: str | Path) -> bool:
    """True when ``decoder_config`` accepts the folder (for the CLI's automatic choice)."""
    try:
        decoder_config(folder)
    except InputError:
        return False
    return True


@dataclass
class Skeleton:
    """The model built on the meta device: its class, the decoder-layer list's path and class."""

    model: nn.Module
    layers_path: str
    layer_cls: type
    n_layers: int

    @classmethod
    def of(cls, config: Any) -> "Skeleton":
        import transformers
        arch = (getattr(config, "architectures", None) or ["AutoModelForCausalLM"])[0]
        model_cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
        with torch.device("meta"):
            model = (model_cls(config) if model_cls is not transformers.AutoModelForCausalLM
                     else model_cls.from_config(config))
        path, layers = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)),
                           key=lambda nm: len(nm[1]))
        return cls(model, path, type(layers[0]), len(layers))

    def prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def new_layer(self, config: Any, i: int, weights: dict[str, torch.Tensor]) -> nn.Module:
        """Decoder layer ``i`` of ``config`` holding ``weights`` (block-relative FQNs), no copy."""
        with torch.device("meta"):
            layer = self.layer_cls(config, i)
        try:
            layer.load_state_dict(weights, assign=True, strict=True)
        except RuntimeError as err:
            raise InputError(f"block {i}'s weights don't match the config ({str(err).splitlines()[-1].strip()[:200]})",
                             "check that the shards were saved with this config.json") from None
        layer.config = config  # ConfigHeads reads state.model.config
        return layer.eval()


def block_weights(ckpt: Checkpoint, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
    """One block's tensors (fp32 for computing, block-relative FQNs) and their stored dtypes."""
    keys = [k for k in ckpt.weight_map if k.startswith(prefix)]
    tensors = ckpt.read(keys)
    dtypes = {k[len(prefix):]: t.dtype for k, t in tensors.items()}
    return {k[len(prefix):]: t.float() for k, t in tensors.items()}, dtypes


def first_inputs(ckpt: Checkpoint, skel: Skeleton, config: Any, tokens: torch.Tensor) -> Call:
    """Block 0's inputs for ``tokens``: embedding rows read from the shard, rotary cos/sin."""
    emb = skel.model.get_input_embeddings()
    key = next(n for n, p in skel.model.named_parameters() if p is emb.weight)
    hidden = ckpt.rows(key, tokens).float()
    rotary = next((m for n, m in skel.model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        raise InputError(f"{type(skel.model).__name__} has no rotary_emb module", "drop --blockwise")
    rot = type(rotary)(config=config)
    positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    cos, sin = rot(hidden, positions)
    return (hidden,), {"position_embeddings": (cos, sin), "attention_mask": None}


def bind(program: Program, layer: nn.Module) -> None:
    """Swap ``layer``'s tensors into the traced block program (same FQNs, same shapes)."""
    state = dict(layer.named_parameters()) | dict(layer.named_buffers())
    for fqn in program.placeholder_fqns().values():
        if fqn in program.ep.state_dict:
            program.ep.state_dict[fqn] = state[fqn]
        else:
            program.ep.constants[fqn] = state[fqn]


def unbind(program: Program) -> None:
    """Replace the traced program's tensors by meta tensors of the same shapes (frees the block)."""
    for store in (program.ep.state_dict, program.ep.constants):
        for fqn, t in list(store.items()):
            if isinstance(t, torch.Tensor):
                store[fqn] = t.to("meta")


def plan_block(layer: nn.Module, program: Program, coupling: Coupling, ratios: dict[str, float],
               method: str, round_to: int, calib: list[Call] | None) -> tuple[Plan, list[str]]:
    """The default pipeline (criterion → select → config_heads) on one bound block."""
    from prunec.compiler import _default_pipeline, services
    from prunec.passes import State, run_passes
    pipeline = _default_pipeline(method, {"channel": 0.0, **ratios, "hidden": 0.0}, round_to, False, 0.0,
                                 hf_heads=True)
    kinds = {k for k, v in ratios.items() if v}
    state = run_passes(pipeline, State(layer, program, coupling, calib=calib, kinds=kinds,
                                       services=services(coupling)))
    if state.updates:
        raise InputError(f"--method {method} refits weights, which the block-by-block path does not apply",
                         "use a scoring method (l1, l2, wanda, activation, …)")
    state.plan.check(coupling)
    return state.plan, state.notes


def prune_block(coupling: Coupling, plan: Plan, call: Call, check: bool
                ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any] | None]:
    """Rewrite one block (tensors it leaves whole are shared, not copied) and verify it against its zeroed
    reference on ``call``."""
    from prunec.rewrite import rewrite
    cut = Cut.of(coupling, plan)
    pruned, state, _ = rewrite(cut, share=True)
    if not check:
        return pruned, state, None
    result = verify(cut, pruned, *call)
    if not result.passed:
        raise InternalError(f"verification failed on a block: rel. err {result.rel_err:.3g} vs its zeroed "
                            f"reference (tolerance {result.tolerance:g})", plan=plan.to_json())
    return pruned, state, {"passed": True, "exact": result.exact, "rel_err": result.rel_err,
                           "max_abs_err": result.max_abs_err, "batch_sizes": result.batch_sizes,
                           "notes": result.notes}


def pruned_config(config: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, int]]:
    """``config`` with the pruned block's head counts and MLP width (head_dim kept explicit)."""
    new = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = state["self_attn.q_proj.weight"].shape[0] // head_dim
    kv = state["self_attn.k_proj.weight"].shape[0] // head_dim
    inter = state["mlp.up_proj.weight"].shape[0]
    if heads != config.num_attention_heads:
        new.head_dim = head_dim
    new.num_attention_heads, new.num_key_value_heads, new.intermediate_size = heads, kv, inter
    return new, {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter}


def run_block(module: nn.Module, call: Call) -> torch.Tensor:
    """The block's hidden-state output (HF layers return a tensor or a tuple)."""
    with torch.no_grad():
        out = module(*call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


def reload_block(skel: Skeleton, config: Any, shard: Path, prefix: str, i: int, call: Call,
                 want: torch.Tensor) -> float:
    """Read a written shard back into ``config``'s own layer class; rel. error vs the verified program."""
    from safetensors import safe_open  # read back with the library's own reader, as from_pretrained does
    with safe_open(shard, framework="pt") as f:
        weights = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys()}
    _, rel = compare(run_block(skel.new_layer(config, i, weights), call), want)
    return rel


def check_folder(config: Any, weight_map: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """The written keys and shapes are exactly what ``from_pretrained(config)`` builds (meta device)."""
    skel = Skeleton.of(config)
    model_state = skel.model.state_dict(keep_vars=True)
    tied = {k for k, v in model_state.items() if any(v is w for j, w in model_state.items() if j != k)}
    missing = [k for k in model_state if k not in weight_map and k not in tied]
    wrong = [k for k in weight_map if k not in model_state or tuple(model_state[k].shape) != shapes[k]]
    if missing or wrong:
        raise InternalError(f"the written folder does not match its config: missing {missing[:3]}, "
                            f"unexpected or mis-shaped {wrong[:3]}")


def rss_mb() -> float:
    """This process's resident set size now (MiB; Linux /proc, else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB: ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class BlockRun:
    """State shared by the blocks of one compile: the source, the traced template, the writer."""

    config: Any
    ckpt: Checkpoint
    skel: Skeleton
    writer: ShardWriter
    ratios: dict[str, float]
    method: str
    round_to: int
    check: bool
    program: Program | None = None
    coupling: Coupling | None = None
    new_config: Any = None
    report: dict[str, Any] | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    counts: dict[str, int] | None = None

    def template(self, layer: nn.Module, example: Call) -> None:
        """Trace the first block once and analyze it: every block has this coupling."""
        from prunec.analyze import build_coupling
        self.program = trace(layer, *example)
        self.coupling = build_coupling(self.program)
        self.report["groups"] = [{"name": g.name, "kind": g.kind, "size": g.size} for g in self.coupling.groups]

    def block(self, i: int, example: Call, calls: list[Call]) -> tuple[Call, list[Call]]:
        """Load, plan, rewrite, verify, write and read back block ``i``; returns the next block's inputs."""
        t0, prefix = time.perf_counter(), self.skel.prefix(i)
        weights, dtypes = block_weights(self.ckpt, prefix)
        before = sum(w.numel() for w in weights.values())
        layer = self.skel.new_layer(self.config, i, weights)
        del weights
        if self.program is None:
            self.template(layer, example)
        bind(self.program, layer)
        plan, notes = plan_block(layer, self.program, self.coupling, self.ratios, self.method, self.round_to,
                                 calls or None)
        kept = {n: len(k) for n, k in plan.kept.items()}
        if self.counts is not None and kept != self.counts:
            raise InternalError(f"block {i} keeps {kept}, block 0 {self.counts}: the config needs uniform widths")
        self.counts = kept
        pruned, state, verified = prune_block(self.coupling, plan, example, self.check)
        want = run_block(pruned, example)
        calls = [((run_block(pruned, c),), c[1]) for c in calls]
        del layer, pruned
        unbind(self.program)
        shard = self.writer.write({prefix + k: v.to(dtypes[k]) for k, v in state.items()})
        self.shapes.update({prefix + k: tuple(v.shape) for k, v in state.items()})
        if self.new_config is None:
            self.new_config, self.report["config"] = pruned_config(self.config, state)
        after = sum(v.numel() for v in state.values())
        del state
        gc.collect()  # the verifier's reference module sits in reference cycles that hold the original block
        reload_rel = reload_block(self.skel, self.new_config, shard, prefix, i, example, want)
        if reload_rel > 1e-5:
            raise InternalError(f"block {i} read back from its shard into {self.skel.layer_cls.__name__} differs "
                                f"from the verified program by rel. err {reload_rel:.3g}")
        self.report["blocks"].append({
            "block": i, "verify": verified, "reload_rel_err": reload_rel,
            "kept": {prefix + n: k for n, k in kept.items()},
            "plan": {n: [int(u) for u in k] for n, k in plan.kept.items()},
            "params_before": before, "params_after": after, "notes": notes,
            "time_s": round(time.perf_counter() - t0, 3)})
        return ((want,), example[1]), calls


def compile_blockwise(path: str | Path, out: str | Path, *, heads: float = 0.0, mlp: float = 0.0,
                      method: str = "l1", round_to: int = 8, seq_len: int = 32, seed: int = 0,
                      calib: list[torch.Tensor] | None = None, check: bool = True,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prune the ``hf:`` checkpoint in ``path`` block by block into the folder ``out``; returns the report.

    ``calib``: token-id tensors (batch, seq) for data-driven criteria; each block is scored on the
    outputs of the already-pruned blocks before it."""
    from prunec.passes.select import check_ratio
    start, path, rss_start = time.perf_counter(), Path(path), rss_mb()
    ratios = {"mlp": check_ratio("mlp", mlp), "head": check_ratio("heads", heads)}
    config = decoder_config(path)
    ckpt = Checkpoint.open(path)
    skel = Skeleton.of(config)
    gen = torch.Generator().manual_seed(seed)
    example = first_inputs(ckpt, skel, config, torch.randint(0, config.vocab_size, (1, seq_len), generator=gen))
    rows = [row[None] for t in calib or [] for row in torch.as_tensor(t).reshape(-1, torch.as_tensor(t).shape[-1])]
    if any(r.shape[1] != seq_len for r in rows):
        raise InputError(f"calibration token windows must be {seq_len} long (the traced block's sequence length)",
                         f"cut them to seq_len={seq_len} or pass seq_len")
    calls = [first_inputs(ckpt, skel, config, r.long()) for r in rows]
    others = [k for k in ckpt.weight_map if not any(k.startswith(skel.prefix(i)) for i in range(skel.n_layers))]
    report: dict[str, Any] = {"blockwise": True, "model_bytes": ckpt.nbytes, "blocks": [], "notes": [],
                              "method": method, "ratios": ratios, "calib_batches": len(calls)}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        run = BlockRun(config, ckpt, skel, ShardWriter(tmp, len(others) + skel.n_layers), ratios, method,
                       round_to, check, report=report, shapes={})
        for key in others:  # embeddings, final norm, lm_head: the hidden width is kept
            tensor = ckpt.read([key])[key]
            run.shapes[key] = tuple(tensor.shape)
            run.writer.write({key: tensor})
            del tensor
        for i in range(skel.n_layers):
            if progress:
                progress(f"block {i + 1}/{skel.n_layers}")
            example, calls = run.block(i, example, calls)
        run.writer.finish()
        run.new_config.save_pretrained(tmp)
        check_folder(run.new_config, run.writer.weight_map, run.shapes)
        for name in COPIED:
            if (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
    report["notes"] += sorted({n.split(": ", 1)[-1] for b in report["blocks"] for n in b["notes"]})
    peak = max(peak_rss_mb(), rss_mb(), rss_start)  # ru_maxrss's high-water mark lags /proc's count
    report.update(output_bytes=run.writer.nbytes, peak_rss_mb=round(peak, 1),
                  rss_at_start_mb=round(rss_start, 1), time_s=round(time.perf_counter() - start, 3),
                  artifact=str(out), params_before=sum(b["params_before"] for b in report["blocks"]),
                  params_after=sum(b["params_after"] for b in report["blocks"]))
    return report
