"""Gradual pruning: cubic fractions, every step verified and recorded, same final size as one shot."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.errors import InputError
from prunec.schedule import Gradual
from test_recover import _data, _teacher


def test_cubic_fractions_follow_zhu_gupta() -> None:
    assert Gradual(final=0.5, steps=3).fractions() == pytest.approx([0.5 * (1 - (2 / 3) ** 3),
                                                                     0.5 * (1 - (1 / 3) ** 3), 0.5], abs=1e-6)
    assert Gradual(final=0.6, steps=3, curve="linear").fractions() == pytest.approx([0.2, 0.4, 0.6])


@pytest.mark.parametrize("rewind_at", [None, 2])
def test_gradual_reaches_the_one_shot_size_with_every_step_verified(rewind_at: int | None) -> None:
    teacher = _teacher()
    x = (torch.randn(2, 16),)
    one_shot = prunec.compile(teacher, x, channels=0.75, round_to=1)
    result = prunec.compile(teacher, x, round_to=1, schedule=Gradual(final=0.75, steps=3, every=6, rewind_at=rewind_at),
                            recover={"data": _data(), "lr": 1e-2})
    steps = result.report["schedule"]["per_step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["verify"]["passed"] for s in steps)
    params = [s["params"] for s in steps]
    assert params[0] > params[1] > params[2] == one_shot.report["params_after"]
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]
    assert shapes(result.model) == shapes(one_shot.model)
    assert all(len(s["recover"]["loss"]) == 6 for s in steps) and all(s["plan"]["groups"] for s in steps)
    assert result.report["params_before"] == one_shot.report["params_before"]


def test_gradual_needs_data_and_a_scoring_criterion() -> None:
    with pytest.raises(InputError, match="needs data"):
        prunec.compile(_teacher(), (torch.randn(2, 16),), schedule=Gradual(final=0.5))
    with pytest.raises(InputError, match="can.t follow a schedule"):
        prunec.compile(_teacher(), (torch.randn(2, 16),), method="thinet",
                       schedule=Gradual(final=0.5), recover={"data": _data()})
