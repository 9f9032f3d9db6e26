"""prunec: a structured-pruning compiler for PyTorch."""
from prunec.compiler import CompileResult, analyze, apply_plan, compile, sensitivity
from prunec.errors import InputError, PrunecError, PruneError, TraceError
from prunec.plan import Plan

__all__ = ["compile", "analyze", "apply_plan", "sensitivity", "CompileResult", "Plan",
           "PrunecError", "InputError", "PruneError", "TraceError"]
__version__ = "0.1.0"
