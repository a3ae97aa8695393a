"""Finding backends: the built-in ones, those other packages register, and any named on the command line.

- Built-in: ``BUILTIN`` below.
- Third-party: an entry point in the group ``darkspec.backends`` whose value is ``package.module:ClassName``.
- Ad hoc: ``load("package.module:ClassName")``.

A backend that cannot even be imported is still listed, as unavailable with the reason, so a broken plugin shows up
in the conformance matrix instead of disappearing from it.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from darkspec.backends.base import Backend
from darkspec.errors import DarkspecError

ENTRY_POINT_GROUP = "darkspec.backends"

BUILTIN = {
    "reference": "darkspec.backends.reference:ReferenceBackend",
    "torch": "darkspec.backends.torch_backend:TorchBackend",
    "torch-compile": "darkspec.backends.torch_backend:TorchCompileBackend",
    "torch-cuda": "darkspec.backends.torch_backend:TorchCudaBackend",
    "darknet": "darkspec.backends.darknet:DarknetBackend",
    "cupy": "darkspec.backends.cupy_backend:CupyBackend",
    "onnxruntime": "darkspec.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "opencv": "darkspec.backends.opencv_backend:OpenCVBackend",
}
class UnavailableBackend(Backend):
    """Stands in for a backend that cannot be loaded; it declares nothing and says why."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def availability(self) -> str:
        return self.reason


def load(spec: str) -> Backend:
    """A backend from ``package.module:ClassName`` or a built-in or registered name."""
    known = {**BUILTIN, **{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}}
    target = known.get(spec, spec)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise DarkspecError("--backend", spec, f"package.module:ClassName or one of {', '.join(sorted(known))}",
                            code="unknown-backend")
    try:
        backend = getattr(importlib.import_module(module_name), class_name)()
    except ModuleNotFoundError as error:
        return UnavailableBackend(spec, f"{target} needs the Python package {error.name!r}, which is not installed")
    except Exception as error:  # any import-time failure of a plugin is reported, not raised
        return UnavailableBackend(spec, f"cannot load {target}: {type(error).__name__}: {error}")
    if not isinstance(backend, Backend):
        return UnavailableBackend(spec, f"{target} is not a darkspec.backends.base.Backend")
    return backend


def discover() -> list[Backend]:
    """Every built-in and registered backend, in that order."""
    names = list(BUILTIN)
    names += sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in names)
    return [load(name) for name in names]
