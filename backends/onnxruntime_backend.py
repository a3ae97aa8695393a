"""The ONNX export run in onnxruntime as a backend: each op call exports the case's graph with
``darkspec.export.onnx`` and runs it on onnxruntime's CPU provider (spec/third-party.md#onnx).

Forward only: the graphs are inference graphs. Darknet's bugs (quirks) are not exported, so none is declared.
"""

from __future__ import annotations

import numpy as np

from darkspec.backends.base import ForwardOnlyBackend, Prepared, capability_grid
from darkspec.errors import DarkspecError
from darkspec.reference import shortcut

FIX = "install it with `pip install darkspec[onnx]` (onnx and onnxruntime)"


def _modules():
    import onnxruntime  # noqa: F401  (imported here: darkspec itself does not need it)

    from darkspec.export import onnx as export

    return export, onnxruntime


class OnnxRuntimeBackend(ForwardOnlyBackend):
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

    def session(self, model):
        """An onnxruntime session of one exported model on the CPU provider, one thread."""
        _, onnxruntime = _modules()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(self, model, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one exported model: its output ``y``."""
        return self.session(model).run(["y"], inputs)[0]

    def _model(self, op, inputs, settings):
        """The exported model of an op call, and its feeds."""
        export, _ = _modules()
        x = np.asarray(inputs["x"])
        if op != "shortcut":
            model = export.reorg_model(x.shape, settings["stride"], settings["reverse"], op == "reorg", x.dtype)
            return model, {"x": x}
        x, froms, weights, dialect, quirks = shortcut.check_call(
            "forward", x, inputs["froms"], inputs["weights"], settings["params"], settings["dialect"],
            settings.get("quirks", ()))
        if quirks:
            raise DarkspecError("quirks", sorted(q.value for q in quirks), "none: the ONNX export does not reproduce "
                                "Darknet's bugs", code="quirk-not-declared")
        model = export.shortcut_model(settings["params"], [x.shape, *(f.shape for f in froms)], weights, dialect,
                                      x.dtype)
        return model, {"x": x, **{f"from{i}": f for i, f in enumerate(froms)}}

    def prepare(self, op, pass_, inputs, settings):
        """The forward's session built once: what is timed is onnxruntime running the graph."""
        if pass_ != "forward":
            return None
        model, feeds = self._model(op, inputs, settings)
        session, outputs = self.session(model), []

        def run():
            outputs[:] = session.run(["y"], feeds)

        return Prepared(run, lambda: outputs[0])

    def shortcut_forward(self, x, froms, weights, **settings):
        return self.run(*self._model("shortcut", dict(x=x, froms=froms, weights=weights), settings))

    def reorg_forward(self, x, stride, reverse, old):
        return self.run(*self._model("reorg" if old else "reorg3d", dict(x=x), dict(stride=stride, reverse=reverse)))
