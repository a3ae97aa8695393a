"""The ONNX export run in onnxruntime as a backend: each op call exports the case's graph with
``darkspec.export.onnx`` and runs it on onnxruntime's CPU provider (spec/third-party.md#onnx).

Forward only: the graphs are inference graphs. Darknet's bugs (quirks) are not exported, so none is declared.
"""

from __future__ import annotations

import numpy as np

from darkspec.backends.base import Backend, capability_grid
from darkspec.errors import DarkspecError
from darkspec.reference.dialects import parse_quirks

FIX = "install it with `pip install darkspec[onnx]` (onnx and onnxruntime)"


def _modules():
    import onnxruntime  # noqa: F401  (imported here: darkspec itself does not need it)

    from darkspec.export import onnx as export

    return export, onnxruntime


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def availability(self):
        try:
            _modules()
        except ImportError as error:
            return f"{error.name or 'onnx/onnxruntime'} is not importable ({type(error).__name__}: {error}); {FIX}"
        return None

    def capabilities(self):
        return frozenset(c for c in capability_grid() if c.pass_ == "forward")  # every op, dialect and dtype

    def version(self):
        export, onnxruntime = _modules()
        return f"onnxruntime {onnxruntime.__version__}, onnx {export.onnx.__version__}, opset {export.OPSET}"

    def run(self, model, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one exported model on the CPU provider: its output ``y``."""
        _, onnxruntime = _modules()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(["y"], inputs)[0]

    def shortcut_forward(self, x, froms, weights, *, params, dialect, quirks=frozenset(), from_input_shapes=None):
        if parse_quirks(quirks):
            raise DarkspecError("quirks", sorted(q.value for q in parse_quirks(quirks)), "none: the ONNX export does "
                                "not reproduce Darknet's bugs", code="quirk-not-declared")
        export, _ = _modules()
        x, froms = np.asarray(x), [np.asarray(f) for f in froms]
        model = export.shortcut_model(params, [x.shape, *(f.shape for f in froms)], weights, dialect, x.dtype)
        return self.run(model, {"x": x, **{f"from{i}": f for i, f in enumerate(froms)}})

    def reorg_forward(self, x, stride, reverse, old):
        export, _ = _modules()
        x = np.asarray(x)
        return self.run(export.reorg_model(x.shape, stride, reverse, old, x.dtype), {"x": x})
