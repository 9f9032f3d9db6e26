"""Artifact writers, one per target. ``BACKENDS[name](result, out, options) -> report dict``."""
from __future__ import annotations

from typing import Any, Callable

from prunec.registry import Registry

Writer = Callable[..., dict[str, Any]]
BACKENDS: Registry = Registry("backend")    # target → writer
ARTIFACTS: Registry = Registry("artifact")  # target → (default suffix, writes a directory)


def register_backend(name: str, suffix: str = ".pt2", directory: bool = False) -> Callable[[Writer], Writer]:
    def wrap(fn: Writer) -> Writer:
        BACKENDS[name] = fn
        ARTIFACTS[name] = (suffix, directory)
        return fn
    return wrap


from prunec.backends import torch_backend  # noqa: E402,F401

for _optional in ("onnx_backend", "tensorrt_backend", "coreml_backend", "executorch_backend"):
    try:
        __import__(f"prunec.backends.{_optional}")
    except ModuleNotFoundError as _err:  # the module itself not written yet; deps are imported lazily
        if _err.name != f"prunec.backends.{_optional}":
            raise
