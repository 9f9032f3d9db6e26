"""Recovery: distil a pruned model from the original, beside compile (not inside it).

    student = prunec.recover(result, teacher=model, data=batches, steps=300)

Logit KL with temperature (Hinton et al., 2015) by default, plus optional feature losses on named
module pairs, plus cross-entropy when batches carry labels. AdamW, linear warm-up then cosine
decay, gradient clipping, BatchNorm statistics re-estimated on the data at the end, eval mode
restored. LoRA (``lora=r``, needs ``peft``) trains low-rank adapters on the Linear layers and merges
them back into dense weights. Under ``torchrun``/``accelerate launch`` (an initialised
``torch.distributed`` group) the student is wrapped in DistributedDataParallel (or, with
``fsdp=True``, trained as a sharded FSDP copy: ``prunec.parallel``) and every rank takes its slice
of each (global) batch; only rank 0 writes checkpoints.
"""
from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from prunec.distill import (Features, Step, cycle, evaluate, freeze_batchnorm, kd_loss, logits_of,
                            reestimate_batchnorm, shard, split_batch)
from prunec.distributed import has_group, world
from prunec.errors import InputError, RecoverError, first_line
from prunec.lora import merge_lora, with_lora
from prunec.parallel import (fsdp_copy, full_state, load_full_state, load_optimizer_state, optimizer_state,
                             pick_device, to_device, wrap_ddp)
from prunec.program_module import ProgramModule
from prunec.trace import eval_mode

Progress = Callable[[int, float], None]  # (steps done, loss)
CHECKPOINT = "last.pt"


@dataclass
class RecoverResult:
    """The recovered module, its report section and, if asked, the weights saved at ``rewind_at``."""

    model: nn.Module
    report: dict[str, Any]
    rewind: dict[str, torch.Tensor] | None = None


@dataclass
class Recovery:
    """Recovery settings; defaults a user need not touch. ``run`` trains the student in place."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05            # fraction of steps with a linear LR ramp, then cosine to 0
    clip: float = 1.0               # gradient-norm clip (0: off)
    temperature: float = 2.0
    loss: str = "kl"                # "kl" (logits) or "mse" (regression outputs)
    task_weight: float = 1.0        # × cross-entropy when batches carry labels
    features: Sequence[tuple[str, str] | str] = ()   # module pairs (student, teacher) for feature MSE
    feature_weight: float = 1.0
    labeled: bool | None = None     # None: detect (x, y) batches with integer class labels
    lora: int | None = None         # LoRA rank; adapters merged back at the end
    bn_batches: int = 16            # batches for BatchNorm re-estimation (0: off)
    # "train": BatchNorm normalises by each batch while training and its running statistics are re-estimated
    # at the end (bn_batches); "frozen": it keeps the running statistics it came with (eval mode throughout,
    # nothing re-estimated): for small batches of little data, whose statistics would replace the model's
    # (and a refit's compensation held in them; docs/recovery.md)
    batchnorm: str = "train"
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 50
    resume: bool = True
    rewind_at: int | None = None    # keep the weights after this many steps (lottery-ticket rewinding)
    rewind: str | Path | dict[str, torch.Tensor] | None = None   # start from such weights
    eval_data: Iterable[Any] | None = None
    progress: bool | Progress = False
    seed: int = 0
    example_inputs: Any = None      # needed when ``data`` is a path (batch shape, dtype)
    tokenizer: Any = None           # for .txt/.jsonl data
    samples: int = 512              # samples drawn from a data path
    device: str | None = None       # None: cuda:$LOCAL_RANK under torchrun with CUDA, else the student's
    fsdp: bool = False              # under torchrun: train a sharded (FSDP) copy instead of DDP replicas

    def run(self, student: Any, teacher: nn.Module, data: Any, steps: int) -> RecoverResult:
        """Distil ``student`` (a module or a CompileResult) from ``teacher`` for ``steps`` batches."""
        student, example = _unwrap(student, self.example_inputs)
        data = self._data(data, example)
        self._check(student, teacher, steps)
        return _Loop(self, student, teacher, data, steps).run()

    def _data(self, data: Any, example: Any) -> Iterable[Any]:
        if isinstance(data, (str, Path)):
            if example is None:
                raise InputError("a data path needs example inputs to shape its batches",
                                 "pass the CompileResult as the student, or example_inputs=")
            from prunec.calib import load_calib
            return load_calib(data, example, self.samples, self.seed, self.tokenizer)
        if data is None:
            raise InputError("recovery needs data", "pass batches or a path (--data)")
        return data

    def _check(self, student: nn.Module, teacher: nn.Module, steps: int) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps {steps} must be a positive integer", "e.g. steps=300")
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise InputError("student and teacher must be torch modules", "pass the original model as teacher")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise InputError(f"learning rate {self.lr} must be a positive number", "e.g. lr=1e-4")
        if self.temperature <= 0:
            raise InputError(f"temperature {self.temperature} must be > 0", "e.g. temperature=2")
        if self.loss not in ("kl", "mse"):
            raise InputError(f"unknown distillation loss '{self.loss}'", "use 'kl' or 'mse'")
        if self.batchnorm not in ("train", "frozen"):
            raise InputError(f"unknown batchnorm mode '{self.batchnorm}'", "use 'train' or 'frozen'")
        if self.lora is not None and self.lora < 1:
            raise InputError(f"LoRA rank {self.lora} must be ≥ 1", "e.g. lora=8")
        if self.checkpoint_every < 1:
            raise InputError(f"checkpoint_every {self.checkpoint_every} must be ≥ 1", "e.g. 50")
        if self.fsdp and not has_group():
            raise InputError("fsdp=True needs a torch.distributed process group",
                             "launch with torchrun or accelerate launch, or drop fsdp")
        if self.fsdp and self.lora:
            raise InputError("LoRA and FSDP together are not supported", "use lora= with DDP, or fsdp without lora")


def recover(student: Any, teacher: nn.Module, data: Any, *, steps: int, **options: Any) -> nn.Module:
    """Distil the pruned ``student`` from ``teacher`` (the original) on ``data`` and return it.

    ``data``: an iterable of batches (tensor, tuple, ``(x, y)`` with labels, or dict of keyword
    inputs), cycled until ``steps``, or a path in the ``--calib`` formats. Options: see ``Recovery``.
    """
    return Recovery(**options).run(student, teacher, data, steps).model


def _unwrap(student: Any, example: Any) -> tuple[nn.Module, Any]:
    if hasattr(student, "model") and hasattr(student, "plan") and hasattr(student, "report"):
        return student.model, example if example is not None else student.example_inputs
    return student, example


class _Loop:
    """One training run: optimizer, schedule, checkpoints, interrupts."""

    def __init__(self, cfg: Recovery, student: nn.Module, teacher: nn.Module, data: Iterable[Any],
                 steps: int) -> None:
        self.cfg, self.student, self.teacher, self.data, self.steps = cfg, student, teacher, data, steps
        self.rank, self.world = world()
        self.dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.history: list[float] = []
        self.step = 0
        self.last_saved: int | None = None
        self.stop_requested = False
        self.checked_inputs = False  # errors on the first batch are the data's, later ones are not

    def run(self) -> RecoverResult:
        cfg, start = self.cfg, time.perf_counter()
        if cfg.rewind is not None:
            _load_weights(self.student, cfg.rewind)
        eval_mode(self.teacher)  # runs under no_grad: its parameters are left as they are
        self.device = self.data_device = pick_device(cfg.device, self.student)
        if cfg.fsdp:  # sharded copies on the device; the student stays where it is and gets the result
            model = self.trainable = fsdp_copy(self.student, self.device)
            self.teacher = fsdp_copy(self.teacher, self.device)
        else:
            self.student.to(self.device)
            self.teacher.to(self.device)
            model = self.trainable = with_lora(self.student, cfg.lora) if cfg.lora else self.student
        params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        if not params:
            raise InputError("the student has no trainable floating-point parameters",
                             "unfreeze them (requires_grad=True) or use lora=")
        torch.manual_seed(cfg.seed)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = max(1, round(cfg.warmup * self.steps)) if cfg.warmup > 0 else 0
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, warm, self.steps))
        eval_steps = [self._on_device(split_batch(b, cfg.labeled)) for b in cfg.eval_data] \
            if cfg.eval_data is not None else []
        with self._data_errors():
            before = evaluate(model, self.teacher, eval_steps, cfg.temperature, cfg.loss) if eval_steps else None
        resumed = self._resume()
        self.ddp = wrap_ddp(model, self.device) if self.world > 1 and not cfg.fsdp else model
        pairs = [(f, f) if isinstance(f, str) else tuple(f) for f in cfg.features]
        self.features = Features(model, self.teacher, pairs) if pairs else None
        rewind = None
        batches = islice(cycle(self.data), self.step, None)  # a resumed run skips what it saw
        model.train()
        frozen = freeze_batchnorm(model) if cfg.batchnorm == "frozen" else 0
        try:
            with _on_interrupt(self), _bar(cfg.progress, self.steps, self.rank) as report:
                report(self.step, float("nan"))
                while self.step < self.steps:
                    step = shard(split_batch(next(batches), cfg.labeled), self.rank, self.world)
                    self._train_step(self._on_device(step))
                    report(self.step, self.history[-1])
                    if cfg.rewind_at is not None and self.step == cfg.rewind_at:
                        weights = full_state(model) if cfg.fsdp else self.student.state_dict()
                        rewind = {k: v.detach().clone() for k, v in weights.items()}
                        self._save("rewind.pt", {"model": rewind})
                    if self.dir and (self.step % cfg.checkpoint_every == 0 or self.step == self.steps):
                        self._checkpoint()
                    if self.stop_requested:
                        self._checkpoint()
                        raise KeyboardInterrupt
        finally:
            if self.features:
                self.features.close()
        model.eval()
        if cfg.lora:
            self.student = merge_lora(model)
        if cfg.fsdp:
            self.student.load_state_dict(full_state(model))
            self.data_device = next(iter(self.student.parameters())).device
        bn_steps = [self._on_device(shard(split_batch(b, cfg.labeled), self.rank, self.world))
                    for b in islice(cycle(self.data), cfg.bn_batches)] if cfg.bn_batches and cfg.batchnorm == "train" else []
        bn_layers = reestimate_batchnorm(self.student, bn_steps)
        after = evaluate(model if cfg.fsdp else self.student, self.teacher, eval_steps, cfg.temperature,
                         cfg.loss) if eval_steps else None
        self.student.eval()  # pruned models come (and go back) in eval mode
        report = {"steps": self.steps, "loss": [round(x, 6) for x in self.history],
                  "time_s": round(time.perf_counter() - start, 3), "lr": cfg.lr, "lora": cfg.lora,
                  "world_size": self.world, "fsdp": cfg.fsdp, "device": str(self.device), "resumed_from": resumed, "batchnorm_reestimated": bn_layers, "batchnorm_frozen": frozen,
                  "program_module": isinstance(self.student, ProgramModule),
                  "before": before, "after": after}
        return RecoverResult(self.student, report, rewind)

    def _train_step(self, step: Step) -> None:
        cfg = self.cfg
        kwargs = dict(step.kwargs, labels=step.kw_labels) if step.kw_labels is not None else step.kwargs
        with self._data_errors():
            with torch.no_grad():
                t_out = logits_of(self.teacher(*step.args, **step.kwargs), "teacher")
            out = self.ddp(*step.args, **kwargs)
        self.checked_inputs = True
        s_out = logits_of(out, "student")
        loss = kd_loss(s_out, t_out, cfg.temperature, cfg.loss)
        if step.labels is not None:
            labels = step.labels.to(s_out.device)
            if s_out.dim() < 2 or labels.shape != s_out.shape[:-1] or int(labels.max()) >= s_out.shape[-1] \
                    or int(labels.min()) < 0:
                raise InputError(f"labels of shape {tuple(labels.shape)} (max {int(labels.max())}) don't fit "
                                 f"outputs {tuple(s_out.shape)}", "give one class index per output row")
            loss = loss + cfg.task_weight * nn.functional.cross_entropy(s_out.flatten(0, -2).float(),
                                                                        labels.flatten())
        if step.kw_labels is not None:
            task = getattr(out, "loss", None)
            if not isinstance(task, torch.Tensor):
                raise InputError("batches carry 'labels' but the student returned no .loss",
                                 "drop 'labels' from the batches, or give (x, y) tuples")
            loss = loss + cfg.task_weight * task
        if self.features:
            loss = loss + cfg.feature_weight * self.features.loss()
        self._stop_if_not_finite(loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip:
            nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], cfg.clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        logged = loss.detach().clone()
        if self.world > 1:  # the curve of the global batch: the mean of the ranks' losses
            import torch.distributed as dist
            dist.all_reduce(logged)
            logged /= self.world
        self.history.append(float(logged))

    def _on_device(self, step: Step) -> Step:
        """A batch on the device the module it feeds runs on."""
        return Step(*to_device((step.args, step.kwargs, step.labels, step.kw_labels), self.data_device))

    @contextmanager
    def _data_errors(self) -> Iterator[None]:
        """Errors on the first batch are the data's (shape, dtype, names): one line, not a traceback."""
        try:
            yield
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            if self.checked_inputs or isinstance(err, InputError):
                raise
            static = " (an exported program has the example's static shapes)" \
                if isinstance(self.student, ProgramModule) else ""
            raise InputError(f"the models cannot run a data batch: {first_line(err, 160)}",
                             f"batches must match the model's inputs{static}: shape, dtype, keyword names") from None

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            where = (f"the last good checkpoint is {self.dir / CHECKPOINT} (step {self.last_saved})"
                     if self.last_saved is not None and self.dir else "no checkpoint was written")
            raise RecoverError(f"the recovery loss became {float(loss.detach())} at step {self.step + 1}; {where}",
                               "lower the learning rate (lr=) or check the data for NaN/inf; "
                               "the weights were not updated with it")

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {"model": full_state(self.trainable), "optimizer": optimizer_state(self.trainable, self.opt),
                "scheduler": self.sched.state_dict(), "step": self.step, "history": self.history,
                "rng": torch.get_rng_state(), "config": _plain(asdict(self.cfg))}

    def _checkpoint(self) -> None:
        if self.dir and self.step != self.last_saved:
            self._save(CHECKPOINT, self._state())
            self.last_saved = self.step

    def _save(self, name: str, obj: dict[str, Any]) -> None:
        if self.dir is None or self.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.dir / name)

    def _resume(self) -> int | None:
        path = self.dir / CHECKPOINT if self.dir else None
        if path is None or not self.cfg.resume or not path.exists():
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            load_full_state(self.trainable, ckpt["model"])
            load_optimizer_state(self.trainable, self.opt, ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise InputError(f"checkpoint {path} does not fit this run: {first_line(err, 160)}",
                             "use another checkpoint_dir, or resume=False to start over") from None
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"])
        self.last_saved = self.step
        if self.step > self.steps:
            raise InputError(f"checkpoint {path} is at step {self.step}, past steps={self.steps}",
                             "ask for more steps, or resume=False")
        return self.step


def _lr_factor(step: int, warm: int, total: int) -> float:
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _plain(obj: Any) -> Any:
    """Config values a weights_only checkpoint can hold (paths and objects as strings)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k not in ("eval_data", "tokenizer", "example_inputs")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(type(obj).__name__)


def _load_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> None:
    state = source
    if not isinstance(source, dict):
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"rewind weights do not fit the student: {first_line(err, 160)}",
                         "rewind to weights of the same (pruned) architecture") from None


@contextmanager
def _on_interrupt(loop: _Loop) -> Iterator[None]:
    """Ctrl-C finishes the current step, writes a resumable checkpoint, then stops."""
    if loop.dir is None:
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(loop, "stop_requested", True))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _bar(progress: bool | Progress, total: int, rank: int) -> Iterator[Progress]:
    if callable(progress):
        yield progress
        return
    if not progress or rank != 0:
        yield lambda step, loss: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.console import Console
    columns = (TextColumn("recover"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Bar(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("recover", total=total, loss="-")
        yield lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4g}")
