"""Compiler passes: criteria (score), selection (plan)."""
from prunec.passes.base import PASSES, Pass, PassResult, State, register_pass, run_passes
from prunec.passes.bn_scale import BNScale
from prunec.passes.layer_drop import LayerDrop
from prunec.passes.magnitude import L1, L2, Magnitude
from prunec.passes.select import Select, keep_count

__all__ = ["PASSES", "Pass", "PassResult", "State", "register_pass", "run_passes",
           "Magnitude", "L1", "L2", "BNScale", "Select", "keep_count", "LayerDrop"]
