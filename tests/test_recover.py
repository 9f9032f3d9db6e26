"""prunec.recover: distillation makes the pruned model agree with the original again; checkpoints
resume exactly; bad input fails with one line. Tiny models, a few steps each."""
from __future__ import annotations

import copy
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

import prunec
from prunec.errors import InputError, RecoverError
from prunec.program_module import ProgramModule
from prunec.recover import Recovery


class Net(nn.Module):
    """linear-bn-relu ×2 → linear: BatchNorm exercises train mode and re-estimation."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                  nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data(n: int = 8, batch: int = 32, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 16, generator=gen) for _ in range(n)]


_W = torch.randn(16, 5, generator=torch.Generator().manual_seed(7))
_TEACHER: list[nn.Module] = []


def _teacher() -> nn.Module:
    """A confident teacher: trained (once per session) on a linearly separable 5-class task."""
    if not _TEACHER:
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.Adam(net.parameters(), 2e-2)
        for x in _data(60, 64, seed=3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), (x @ _W).argmax(-1)).backward()
            opt.step()
        _TEACHER.append(net.eval())
    return copy.deepcopy(_TEACHER[0])


def _pruned(teacher: nn.Module) -> prunec.CompileResult:
    result = prunec.compile(teacher, (torch.randn(2, 16),), channels=0.75, round_to=1)
    assert result.report["verify"]["passed"]
    return result


@pytest.mark.parametrize("which", ["model", "program"])
def test_distillation_improves_agreement(which: str) -> None:
    """Loss falls and held-out top-1 agreement with the teacher rises, on the synced class and on
    the ProgramModule fallback (whose parameters must receive gradients)."""
    teacher = _teacher()
    result = _pruned(teacher)
    student = getattr(result, which)
    assert isinstance(student, ProgramModule) == (which == "program")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run = Recovery(lr=1e-2, eval_data=_data(2, 128, seed=9)).run(student, teacher, _data(), 40)
    loss = run.report["loss"]
    assert len(loss) == 40 and np.mean(loss[-5:]) < 0.5 * np.mean(loss[:5])
    assert run.report["after"]["agreement"] > run.report["before"]["agreement"] + 0.1  # 0.68 → 0.90
    assert run.report["after"]["kd_loss"] < 0.5 * run.report["before"]["kd_loss"]
    assert run.report["batchnorm_reestimated"] == 2 and not run.model.training
    after = run.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "weight" in k)


def test_program_module_train_mode_uses_batch_statistics() -> None:
    program = _pruned(_teacher()).program
    x = torch.randn(8, 16) * 3 + 2
    mean = dict(program.named_buffers())["body.1.running_mean"]
    kept = mean.clone()
    program.eval()(x)
    assert torch.equal(mean, kept)
    program.train()(x)
    assert not torch.equal(mean, kept)


@pytest.mark.parametrize("which", ["model", "program"])
def test_frozen_batchnorm_keeps_the_running_statistics(which: str) -> None:
    """``batchnorm="frozen"``: BatchNorm normalises by the statistics the model came with while the weights
    train, and nothing re-estimates them ("train", the default, replaces them with the data's)."""
    teacher = _teacher()
    stats = {}
    for mode in ("frozen", "train"):
        student = getattr(_pruned(teacher), which)
        kept = {k: v.clone() for k, v in student.state_dict().items() if "running" in k or k == "head.weight"}
        x = [d * 3 + 2 for d in _data()]   # data whose statistics differ from the training set's
        run = Recovery(lr=1e-2, batchnorm=mode).run(student, teacher, x, 10)
        after = run.model.state_dict()
        stats[mode] = all(torch.equal(kept[k], after[k]) for k in kept if "running" in k)
        assert len(kept) == 5 and not run.model.training
        assert not torch.equal(kept["head.weight"], after["head.weight"])      # the weights did train
        assert (run.report["batchnorm_frozen"], bool(run.report["batchnorm_reestimated"])) == \
            ((2, False) if mode == "frozen" else (0, True))
    assert stats == {"frozen": True, "train": False}


def test_labels_add_the_task_loss_and_accuracy() -> None:
    teacher = _teacher()
    gen = torch.Generator().manual_seed(3)
    data = [(x, torch.randint(0, 5, (len(x),), generator=gen)) for x in _data()]
    run = Recovery(lr=1e-2, eval_data=data[:2]).run(_pruned(teacher).model, teacher, data, 5)
    assert "accuracy" in run.report["after"]
    plain = Recovery(lr=1e-2, labeled=False).run(_pruned(teacher).model, teacher, [d[0] for d in data], 5)
    assert run.report["loss"][0] > plain.report["loss"][0]  # + cross-entropy on random labels


def _interrupt_at(step: int):
    def progress(done: int, loss: float) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)
    return progress


def test_ctrl_c_checkpoints_and_resume_continues_identically(tmp_path) -> None:
    teacher = _teacher()
    straight = Recovery(lr=1e-2, checkpoint_dir=tmp_path / "a", checkpoint_every=4).run(
        _pruned(teacher).model, teacher, _data(), 8)
    cfg = dict(lr=1e-2, checkpoint_dir=tmp_path / "b", checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        Recovery(**cfg, progress=_interrupt_at(3)).run(_pruned(teacher).model, teacher, _data(), 8)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    resumed = Recovery(**cfg).run(_pruned(teacher).model, teacher, _data(), 8)
    assert resumed.report["resumed_from"] == 3
    assert resumed.report["loss"] == straight.report["loss"]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    teacher = _teacher()
    data = _data(6)
    data[4] = data[4].clone()
    data[4][0, 0] = float("nan")
    with pytest.raises(RecoverError, match=r"NaN|nan.*step 5.*last good checkpoint.*step 4"):
        Recovery(lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=2).run(_pruned(teacher).model, teacher, data, 10)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                     if v.is_floating_point())


def test_data_path_and_compile_result(tmp_path) -> None:
    teacher = _teacher()
    np.save(tmp_path / "x.npy", torch.randn(40, 16).numpy())
    model = prunec.recover(_pruned(teacher), teacher, str(tmp_path / "x.npy"), steps=3, samples=32)
    assert isinstance(model, Net) and model.body[0].out_features == 16


def test_feature_loss_pulls_a_kept_width_block_together() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)
            self.block = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(h + self.block(h))

    torch.manual_seed(0)
    teacher = Res().eval()
    coupling = prunec.analyze(teacher, (torch.randn(2, 8),))
    inner = next(g for g in coupling.groups if g.size == 64)  # block's hidden units, not the residual
    plan = prunec.Plan(kept={inner.name: list(range(0, 64, 4))}, sizes={inner.name: 64})
    student = prunec.compile(teacher, (torch.randn(2, 8),), plan=plan).model
    assert student.block[0].out_features == 16 and student.block[2].out_features == 16
    x = torch.randn(256, 8)
    gap = lambda: float((student.block(student.inp(x)) - teacher.block(teacher.inp(x))).pow(2).mean())
    start = gap()
    prunec.recover(student, teacher, [torch.randn(32, 8) for _ in range(4)], steps=30, lr=1e-2,
                   features=["block"], feature_weight=10.0)
    assert gap() < 0.5 * start


def _one_shot():
    yield torch.randn(4, 16)


@pytest.mark.parametrize("case, data, options, match", [
    ("empty data", [], {}, "empty"),
    ("one-shot generator", _one_shot(), {}, "ran out"),
    ("wrong input shape", [torch.randn(4, 7)], {}, "cannot run a data batch"),
    ("float labels", [(torch.randn(4, 16), torch.rand(4))], {"labeled": True}, "integer tensor"),
    ("labels out of range", [(torch.randn(4, 16), torch.full((4,), 7))], {}, "don't fit"),
    ("zero steps", [torch.randn(4, 16)], {"steps": 0}, "positive integer"),
    ("bad lr", [torch.randn(4, 16)], {"lr": -1.0}, "learning rate"),
    ("bad batchnorm mode", [torch.randn(4, 16)], {"batchnorm": "fixed"}, "unknown batchnorm mode 'fixed'"),
    ("missing path", "/nonexistent/x.npy", {}, "does not exist"),
])
def test_bad_input(case: str, data, options: dict, match: str) -> None:
    teacher = _teacher()
    steps = options.pop("steps", 3)
    with pytest.raises(InputError, match=match):
        prunec.recover(_pruned(teacher), teacher, data, steps=steps, **options)


def test_teacher_with_other_outputs_is_refused() -> None:
    teacher = _teacher()
    with pytest.raises(InputError, match="does not match"):
        prunec.recover(_pruned(teacher).model, Net(classes=7).eval(), _data(1), steps=2)
