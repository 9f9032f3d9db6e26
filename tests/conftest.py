import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_verified(result, tol: float = 1e-4) -> None:
    """The compile's own verifier passed, exactly, within ``tol``."""
    v = result.report["verify"]
    assert v["passed"] and v["exact"], v
    assert v["rel_err"] <= tol, v
