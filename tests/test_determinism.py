"""Same model, inputs, flags and seed → byte-identical plan JSON and identical artifact weights."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunec
from prunec.backends import BACKENDS


class Net(nn.Module):
    """Conv trunk (ties in scores are likely: BN-free, small) into a token attention head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 5)
        with torch.no_grad():  # equal scores: order must still be deterministic
            self.c1.weight[8:] = self.c1.weight[:8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        t = self.proj(x.flatten(2).transpose(1, 2))
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.mean(1))


def _compile_and_write(method: str, out: Path) -> tuple[str, bytes]:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    calib = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    torch.manual_seed(1234 if out.name.startswith("b") else 99)  # global RNG must not matter
    heads = 0.5 if method == "l1" else 0.0  # ThiNet selects channels itself
    result = prunec.compile(model, x, channels=0.5, heads=heads, mlp=0.5, method=method, round_to=1,
                            calib=calib, layers=0.5)
    BACKENDS["torch"](result, out)
    return json.dumps(result.plan.to_json(), sort_keys=False), out.with_suffix(".safetensors").read_bytes()


@pytest.mark.parametrize("method", ["l1", "thinet"])
def test_compile_twice_gives_identical_plan_and_weights(method: str, tmp_path: Path) -> None:
    plan_a, weights_a = _compile_and_write(method, tmp_path / "a.pt2")
    plan_b, weights_b = _compile_and_write(method, tmp_path / "b.pt2")
    assert json.loads(plan_a)["groups"], "the plan prunes something"
    assert plan_a == plan_b
    assert weights_a == weights_b
