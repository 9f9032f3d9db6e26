"""Fuzzing: random architectures at random ratios and methods either verify or fail cleanly.

Each example draws a recipe from tests/fuzz_arch.py (residual adds, concat, split/chunk,
grouped and depthwise convs, BN/GN/LN, SE gates, pooling, flatten → linear, attention with
nn.MultiheadAttention or reshape-to-heads, tied weights, a module called twice). Contract:
``prunec.compile`` returns a result whose exact part verified within tolerance, and the returned
model runs at batch b + 1 (rows agree with batch b), or raises a one-line ``PrunecError``.
Derandomised with a fixed example count (~2 minutes on 2 cores); ``bench/fuzz.py`` runs 1,000+.
"""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_arch import random_spec, run_case

OUTCOMES = ("verified", "verified-pinned", "error")


@settings(derandomize=True, max_examples=20, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**31 - 1))
def test_random_architectures_verify_or_fail_cleanly(seed: int) -> None:
    spec = random_spec(random.Random(seed))
    outcome = run_case(spec)  # any exception but a PrunecError fails the test
    assert outcome.split(":")[0] in OUTCOMES, outcome

