"""Compiler passes: criteria (score), selection (plan), refit, layer dropping, search."""
from prunec.passes.base import PASSES, Pass, PassResult, State, register_pass, run_passes
from prunec.passes.activation import Activation, ActivationVariance
from prunec.passes.bn_scale import BNScale
from prunec.passes.config_heads import ConfigHeads
from prunec.passes.native_config import NativeConfig
from prunec.passes.fisher import Fisher
from prunec.passes.flap import Flap
from prunec.passes.head_importance import HeadImportance
from prunec.passes.lasso import Lasso
from prunec.passes.latency_select import LatencySelect
from prunec.passes.layer_drop import LayerDrop
from prunec.passes.magnitude import L1, L2, Magnitude
from prunec.passes.movement import Movement
from prunec.passes.obd import OBD
from prunec.passes.refit import Refit
from prunec.passes.select import Select, keep_count
from prunec.passes.sensitivity import Sensitivity
from prunec.passes.target_search import TargetSearch
from prunec.passes.taylor import Taylor
from prunec.passes.thinet import LeastSquaresSelection, ThiNet
from prunec.passes.wanda import Wanda
from prunec.passes.wanda_sp import WandaSP

__all__ = ["PASSES", "Pass", "PassResult", "State", "register_pass", "run_passes",
           "Magnitude", "L1", "L2", "BNScale", "ConfigHeads", "Taylor", "Fisher", "OBD", "Activation",
           "ActivationVariance", "Wanda", "ThiNet", "Lasso", "LeastSquaresSelection", "Select",
           "keep_count", "NativeConfig", "LatencySelect", "LayerDrop", "Sensitivity", "TargetSearch", "HeadImportance", "Movement",
           "Flap", "WandaSP", "Refit"]
