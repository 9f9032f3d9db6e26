"""prunec: a structured-pruning compiler for PyTorch."""
from prunec.compiler import CompileResult, analyze, apply_plan, compile, sensitivity
from prunec.blockwise import compile_blockwise
from prunec.errors import InputError, PrunecError, PruneError, TraceError
from prunec.module_sync import load_pruned
from prunec.plan import Plan
from prunec.recover import Recovery, recover
from prunec.schedule import Gradual

__all__ = ["compile", "compile_blockwise", "load_pruned", "analyze", "apply_plan", "sensitivity", "CompileResult", "Plan", "recover", "Recovery", "Gradual",
           "PrunecError", "InputError", "PruneError", "TraceError"]
__version__ = "0.1.0"
