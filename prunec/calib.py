"""Calibration data: load it from files, stream statistics over it, accumulate gradients.

* ``load_calib`` turns an image folder, a tensor file (.npy/.npz/.pt) or a text/JSONL file into
  a list of input tuples batched like the example inputs, sampled deterministically by seed.
* ``collect`` runs the traced ATen graph with a ``torch.fx.Interpreter`` subclass and hands each
  node's value to a callback, which keeps running sums; activations are never all stored (the
  interpreter frees each value after its last use).
* ``call_args`` is the one place a calibration batch is interpreted (positional tuple, or a dict
  of keyword inputs); ``run`` / ``output_error`` / ``collect`` are the one program runner.
* ``grad_sums`` runs the user's module with autograd and hands per-batch parameter gradients to
  a callback (Taylor, Fisher, OBD criteria).
* Data-parallel calibration (``prunec.distributed``): ``collect`` and ``grad_sums`` all-reduce the
  caller's running ``sums`` once they have seen every batch, ``output_error`` its sum and count.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import InputKind

from prunec.distributed import all_reduce_sum_, global_mean
from prunec.errors import InputError
from prunec.program_module import ProgramModule, copy_graph
from prunec.trace import Program, trace

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEXT_EXTS = {".txt", ".jsonl", ".json"}
TENSOR_EXTS = {".npy", ".npz", ".pt", ".pth"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Batch = tuple[Any, ...]                      # one calibration batch as given: positional inputs or (dict,)
Call = tuple[tuple[Any, ...], dict[str, Any]]  # (positional, keyword) inputs: what every runner takes


def load_calib(path: str | Path, example_inputs: Sequence[Any], n_samples: int = 64, seed: int = 0,
               tokenizer: Any = None) -> list[Batch]:
    """Calibration batches shaped like ``example_inputs`` (same batch size, dtype, H×W)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"calibration data {path} does not exist", "check --calib PATH")
    example = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(example, torch.Tensor):
        raise InputError("calibration data needs a tensor example input", "pass a tensor example")
    if n_samples < 1:
        raise InputError(f"n_samples {n_samples} must be ≥ 1", "ask for at least one sample")
    rng = np.random.default_rng(seed)
    suffix = path.suffix.lower()
    if path.is_dir():
        samples = _images(path, example, n_samples, rng)
    elif suffix in TENSOR_EXTS:
        samples = _tensors(path, example, n_samples, rng)
    elif suffix in TEXT_EXTS:
        samples = _text(path, example, n_samples, rng, tokenizer)
    else:
        raise InputError(f"cannot read calibration data {path.name}",
                         "pass an image folder, .npy/.npz/.pt tensors, or a .txt/.jsonl file")
    return [(samples[i:i + example.shape[0]],) for i in range(0, len(samples), example.shape[0])]


def _pick(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def _images(folder: Path, example: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as err:
        raise InputError("reading an image folder needs Pillow", "pip install pillow") from err
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InputError(f"no images in {folder}", f"put {sorted(IMAGE_EXTS)} files there")
    if example.dim() != 4 or example.shape[1] not in (1, 3):
        raise InputError(f"images need an N×C×H×W example input with C ∈ {{1, 3}}, got "
                         f"{tuple(example.shape)}", "give --input-shape like 1,3,224,224")
    channels, (h, w) = example.shape[1], example.shape[2:]
    out = []
    for i in _pick(len(files), n, rng):
        img = Image.open(files[i]).convert("RGB" if channels == 3 else "L").resize((w, h))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        arr = arr.permute(2, 0, 1) if channels == 3 else arr[None]
        mean = torch.tensor(IMAGENET_MEAN[:channels] if channels == 3 else (0.5,)).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD[:channels] if channels == 3 else (0.5,)).view(-1, 1, 1)
        out.append((arr - mean) / std)
    return torch.stack(out).to(example.dtype)


def _read_tensor(path: Path) -> Any:
    """The array or tensor saved in ``path`` (np.save / np.savez: the first array / torch.save, weights only)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                data = torch.from_numpy(z[z.files[0]])
        else:
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # numpy/torch raise many types for bad files
        raise InputError(f"cannot read tensors from {path.name}: {type(err).__name__}",
                         "save a plain array (np.save) or tensor (torch.save)") from err
    if isinstance(data, dict):
        data = next(iter(data.values()))
    return data


def _tensors(path: Path, example: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    data = _read_tensor(path)
    if not isinstance(data, torch.Tensor) or tuple(data.shape[1:]) != tuple(example.shape[1:]):
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise InputError(f"calibration tensors have shape {got}, the model wants N×"
                         f"{'×'.join(map(str, example.shape[1:]))}", "save samples along dim 0")
    return data[torch.as_tensor(_pick(len(data), n, rng))].to(example.dtype)


def _text(path: Path, example: torch.Tensor, n: int, rng: np.random.Generator,
          tokenizer: Any) -> torch.Tensor:
    if tokenizer is None:
        raise InputError(f"text calibration data {path.name} needs a tokenizer",
                         "pass tokenizer=AutoTokenizer.from_pretrained(...) or token ids as .pt")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix.lower() in (".jsonl", ".json"):
        lines = [_json_text(ln) for ln in lines]
    if not lines:
        raise InputError(f"{path.name} holds no text", "give one sample per line")
    seq = example.shape[-1]
    picked = [lines[i] for i in _pick(len(lines), n, rng)]
    enc = tokenizer(picked, padding="max_length", truncation=True, max_length=seq,
                    return_tensors="pt")
    return enc["input_ids"].to(example.dtype)


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_EXTS)
        if not files:
            raise InputError(f"no .txt/.jsonl files in {path}", "put text files there, one sample per line")
        return files
    if path.suffix.lower() not in TEXT_EXTS:
        raise InputError(f"text models calibrate on text, not {path.name}",
                         "pass a .txt file, a .jsonl file with a 'text' field, or a folder of them")
    return [path]


def load_text_calib(path: str | Path, example_kwargs: dict[str, Any], tokenizer: Any, n_samples: int = 64,
                    seed: int = 0, vocab: int | None = None) -> list[dict[str, Any]]:
    """Keyword batches for a text model, shaped like ``example_kwargs`` (batch × sequence): the text is
    tokenised as one stream (token ids saved as an integer array are one already, each below ``vocab`` when
    given) and cut into windows, ``n_samples`` of which are drawn by seed."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"calibration data {path} does not exist", "check --calib PATH")
    ids = example_kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("text calibration needs a model whose example has input_ids", "use an hf: model")
    if path.suffix.lower() in TENSOR_EXTS:   # token ids already: no tokenizer needed
        stream = _token_ids(path, vocab)
    else:
        if tokenizer is None:
            raise InputError(f"text calibration data {path.name} needs the model's tokenizer, and the model "
                             "folder has none", "save it next to the model with tokenizer.save_pretrained(DIR), "
                             "or pass token ids (np.save of an integer N×L array)")
        texts = []
        for file in _text_files(path):
            lines = [ln for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
            texts += [_json_text(ln) for ln in lines] if file.suffix.lower() in (".jsonl", ".json") else lines
        stream = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0] \
            if texts else torch.zeros(0, dtype=torch.long)
    batch, seq = ids.shape
    windows = len(stream) // seq
    if windows < 1:
        raise InputError(f"{path.name} holds {len(stream)} tokens, fewer than one window of {seq}",
                         "give more text or a smaller --seq-len")
    rng = np.random.default_rng(seed)
    picked = torch.stack([stream[i * seq:(i + 1) * seq] for i in _pick(windows, n_samples, rng)]).to(ids.dtype)
    extra = {k: v for k, v in example_kwargs.items() if k not in ("input_ids", "attention_mask")}
    out = []
    for i in range(0, len(picked), batch):
        chunk = picked[i:i + batch]
        item = {"input_ids": chunk}
        if "attention_mask" in example_kwargs:
            item["attention_mask"] = torch.ones_like(chunk, dtype=example_kwargs["attention_mask"].dtype)
        out.append({**item, **extra})
    return out


def _token_ids(path: Path, vocab: int | None = None) -> torch.Tensor:
    """Token ids saved as an integer array or tensor (any shape; rows are read as one stream), each ≥ 0 and
    below ``vocab`` when given."""
    data = _read_tensor(path)
    if not isinstance(data, torch.Tensor) or data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
        got = str(data.dtype).replace("torch.", "") if isinstance(data, torch.Tensor) else type(data).__name__
        raise InputError(f"{path.name} holds {got} values, not token ids",
                         "save integer token ids (np.save of an N×L int array), or pass text (.txt/.jsonl)")
    stream = data.reshape(-1).long()
    if stream.numel() and int(stream.min()) < 0:
        raise InputError(f"{path.name} holds negative token ids (min {int(stream.min())})",
                         "save the tokenizer's ids, all ≥ 0")
    if vocab is not None and stream.numel() and int(stream.max()) >= vocab:
        raise InputError(f"{path.name} holds token id {int(stream.max())}, the model's vocabulary has {vocab}",
                         "save ids from this model's tokenizer")
    return stream


def _json_text(line: str) -> str:
    obj = json.loads(line)
    if isinstance(obj, str):
        return obj
    for key in ("text", "content", "sentence", "summary"):
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            return obj[key]
    raise InputError("a JSONL line has no 'text' field", 'write lines like {"text": "..."}')


def require_calib(calib: Iterable[Any] | None, who: str) -> list[Batch]:
    """The calibration batches as tuples, or a one-line error naming the pass."""
    if calib is None:
        raise InputError(f"{who} needs calibration data", "pass --calib PATH or calib=…")
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calib]
    if not batches:
        raise InputError(f"{who} got empty calibration data", "give at least one batch")
    return batches


class _Collector(fx.Interpreter):
    """Runs a graph and shows every node's value to ``fn`` (original node, value)."""

    def __init__(self, module: fx.GraphModule, originals: dict[str, fx.Node],
                 fn: Callable[[fx.Node, Any], None]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.originals, self.fn = originals, fn

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        original = self.originals.get(n.name)
        if original is not None and n.op in ("call_function", "placeholder"):
            self.fn(original, value)
        return value


def collect(program: Program | ProgramModule, calib: Iterable[Any],
            fn: Callable[[fx.Node, Any], None], watch: Iterable[fx.Node] | None = None,
            sums: dict[Any, Any] | None = None) -> None:
    """Call ``fn(node, value)`` for every op (and input) of ``program``'s graph on every calibration batch;
    ``sums``, the running sums ``fn`` keeps, is then all-reduced across ranks in place (``prunec.distributed``).

    Implemented with a ``torch.fx.Interpreter`` over the ATen graph (not module hooks), so every
    value, including functional ops, is visible by its node; ``fn`` keeps running sums. The graph is
    static (traced at the example's shapes): a batch of another batch size or sequence length runs
    through the model re-traced at that batch's shapes (cached on the Program), whose nodes are
    matched to the example graph's by name and op. A ``watch``-ed node without a match is an InputError.
    """
    source = program.graph_module.graph if isinstance(program, ProgramModule) else program.graph
    originals = {n.name: n for n in source.nodes}
    watched = list(watch or ())
    example = shape_key((tuple(program.example_inputs), dict(program.example_kwargs))) \
        if isinstance(program, Program) else None
    runners: dict[Any, tuple[_Collector, list[tuple[str, str | None]], dict[str, torch.Tensor]]] = {}
    with torch.no_grad():
        for batch in calib:
            call = call_args(batch)
            if isinstance(program, Program):
                call = with_example_options(program, call)
            key = shape_key(call)
            if key not in runners:
                target = program if example is None or key == example else _reshaped(program, call, key)
                runners[key] = _runner(target, originals, fn, watched)
            interp, inputs, state = runners[key]
            leaves = iter(pytree.tree_leaves(call))
            flat = [next(leaves) if kind == "user" else state[fqn] for kind, fqn in inputs]
            interp.run(*flat)
    if sums is not None:
        all_reduce_sum_(sums)


def shape_key(call: Call) -> tuple[Any, ...]:
    """What a static trace depends on: keyword names, tensor shapes/dtypes, other leaves' values."""
    leaves, spec = pytree.tree_flatten(call)
    return (str(spec), *((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in leaves))


def with_example_options(program: Program, call: Call) -> Call:
    """The batch's keyword inputs in the example's order, with the example's non-tensor options
    (e.g. ``use_cache=False``) filled in where the batch leaves them out."""
    args, kwargs = call
    example = program.example_kwargs
    merged = {k: kwargs[k] if k in kwargs else v for k, v in example.items()
              if k in kwargs or not isinstance(v, torch.Tensor)}
    return args, {**merged, **{k: v for k, v in kwargs.items() if k not in merged}}


def _reshaped(program: Program, call: Call, key: tuple[Any, ...]) -> Program:
    """``program``'s model traced at the shapes of ``call`` (cached on ``program``)."""
    if key not in program.reshaped:
        if program.model is None:
            raise InputError("a calibration batch is shaped unlike the example inputs and this program "
                             "has no model to re-trace", "give calibration batches shaped like the example")
        args, kwargs = call
        program.reshaped[key] = trace(program.model, args, kwargs)
    return program.reshaped[key]


def _runner(program: Program | ProgramModule, originals: dict[str, fx.Node], fn: Callable[[fx.Node, Any], None],
            watched: list[fx.Node]) -> tuple["_Collector", list[tuple[str, str | None]], dict[str, torch.Tensor]]:
    """An interpreter over ``program``'s graph reporting values under the example graph's nodes."""
    if isinstance(program, ProgramModule):
        graph_module, inputs = program.graph_module, program._inputs
        state = {fqn: p for fqn, p in [*program.named_parameters(), *program.named_buffers()]}
    else:
        graph, _ = copy_graph(program.graph)
        graph_module = fx.GraphModule(nn.Module(), graph)
        inputs = [("user", None) if s.kind == InputKind.USER_INPUT else ("state", s.target)
                  for s in program.ep.graph_signature.input_specs]
        state = program.state()
    matched = {n.name: originals[n.name] for n in graph_module.graph.nodes
               if n.name in originals and originals[n.name].target == n.target}
    missing = [n.name for n in watched if n.name not in matched]
    if missing:
        raise InputError(f"a calibration batch of other shapes traces to another graph (no op {missing[0]})",
                         "give calibration batches shaped like the example inputs")
    return _Collector(graph_module, matched, fn), inputs, state


def grad_sums(model: nn.Module, calib: Iterable[Any], fn: Callable[[dict[str, torch.Tensor],
              dict[str, torch.Tensor]], None], labels: Iterable[torch.Tensor] | None = None,
              hessian_probes: int = 0, seed: int = 0,
              loss_fn: Callable[[Any, Any, torch.Tensor | None], torch.Tensor] | None = None,
              sums: dict[Any, Any] | None = None) -> None:
    """For each batch call ``fn(weights, grads)`` (FQN → tensor) of the loss on that batch; ``sums``,
    the running sums ``fn`` keeps, is then all-reduced across ranks in place (``prunec.distributed``).

    A batch is a tuple of positional inputs, or a dict of keyword inputs (HF models; also as the
    single element of a tuple). Loss: ``loss_fn(output, batch, label)`` when given, else
    cross-entropy against ``labels`` (one tensor per batch) when given, else half the squared
    output norm averaged over the batch. With ``hessian_probes`` > 0, ``grads`` holds
    Hutchinson estimates of the Hessian diagonal, E[v ⊙ Hv] over Rademacher probes v.
    Gradients go through ``torch.autograd.grad``: the module's ``.grad`` fields are untouched.
    """
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    names, tensors = list(params), list(params.values())
    label_list = list(labels) if labels is not None else None
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(calib):
            args, kwargs = call_args(batch)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in tensors]
                output = torch.func.functional_call(model, dict(zip(names, leaves)), args, kwargs)
                label = None if label_list is None else label_list[i]
                loss = _loss(output, label) if loss_fn is None else loss_fn(output, batch, label)
                create = hessian_probes > 0
                grads = torch.autograd.grad(loss, leaves, create_graph=create, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]
                if create:
                    grads = _hutchinson(grads, leaves, hessian_probes, gen)
            fn(dict(zip(names, [t.detach() for t in tensors])),
               dict(zip(names, [g.detach() for g in grads])))
    finally:
        model.train(was_training)
    if sums is not None:
        all_reduce_sum_(sums)


def call_args(batch: Any) -> Call:
    """(positional, keyword) inputs of one calibration batch: a dict (or a 1-tuple holding one)
    is keyword inputs, a (tuple, dict) pair is both, anything else positional."""
    if (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], tuple)
            and isinstance(batch[1], dict)):
        return batch[0], dict(batch[1])
    if isinstance(batch, dict):
        return (), dict(batch)
    batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if len(batch) == 1 and isinstance(batch[0], dict):
        return (), dict(batch[0])
    return batch, {}


def calls(calib: Iterable[Any]) -> list[Call]:
    """Every calibration batch as (positional, keyword) inputs."""
    return [call_args(b) for b in calib]


def shared_rows(call: Any) -> int | None:
    """The size of dim 0 that every tensor input of ``call`` shares; None if they share none."""
    leaves = [t for t in pytree.tree_leaves(call) if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() == 0 or t.shape[0] != leaves[0].shape[0] for t in leaves):
        return None
    return int(leaves[0].shape[0])


def take_rows(call: Any, start: int, stop: int) -> Any:
    """``call`` with every tensor input cut to rows ``start:stop`` along dim 0 (other inputs as they are)."""
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, call)


def first_samples(batches: Iterable[Call], n: int) -> list[Call]:
    """The leading calls holding ``n`` samples in all (the rows along dim 0 that every tensor input
    shares; a call without such a dim counts as one sample), the last call cut to the rows still wanted."""
    out: list[Call] = []
    for call in batches:
        if n <= 0:
            break
        rows = shared_rows(call) or 1
        if rows > n:
            call = take_rows(call, 0, n)
        out.append(call)
        n -= min(rows, n)
    return out


def run(module: nn.Module, call: Call) -> Any:
    """``module(*args, **kwargs)`` without autograd."""
    args, kwargs = call
    with torch.no_grad():
        return module(*args, **kwargs)


def flat_output(output: Any) -> torch.Tensor:
    """Every tensor leaf of a model output, flattened and concatenated (float)."""
    leaves = [t.detach().float().reshape(-1) for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    return torch.cat(leaves) if leaves else torch.zeros(0)


def output_error(module: nn.Module, reference: nn.Module, batches: Iterable[Call]) -> float:
    """Mean over batches (every rank's) of ‖f(x) − f_ref(x)‖ / ‖f_ref(x)‖."""
    errs = []
    for call in batches:
        want = flat_output(run(reference, call))
        errs.append(float((flat_output(run(module, call)) - want).norm() / (want.norm() + 1e-12)))
    return global_mean(errs)


def _loss(output: Any, labels: torch.Tensor | None) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if labels is not None:
        return nn.functional.cross_entropy(leaves[0].flatten(0, -2), labels.flatten())
    return sum(0.5 * t.pow(2).sum() / max(t.shape[0] if t.dim() else 1, 1) for t in leaves)


def _hutchinson(grads: list[torch.Tensor], leaves: list[torch.Tensor], probes: int,
                gen: torch.Generator) -> list[torch.Tensor]:
    diag = [torch.zeros_like(t) for t in leaves]
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    for _ in range(probes):
        vs = [torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1 for t in leaves]
        hv = torch.autograd.grad([grads[i] for i in live], [leaves[i] for i in live],
                                 grad_outputs=[vs[i] for i in live], retain_graph=True,
                                 allow_unused=True)
        for i, h in zip(live, hv):
            if h is not None:
                diag[i] += vs[i] * h.detach() / probes
    return diag
