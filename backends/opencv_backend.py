"""OpenCV's Darknet importer as a backend: each case becomes a cfg and a ``.weights`` file in Darknet's format, read
by ``cv2.dnn.readNetFromDarknet`` and run on OpenCV's CPU path (spec/third-party.md#opencv).

OpenCV gets one input blob, so every input of a case travels in it, stacked along the channels (a smaller one on a
strided grid): a 1x1 ``[convolutional]`` copies the blob, and per input a ``[route]`` back to that copy and a 1x1
``[convolutional]`` (weights 0 and 1) picks the input's channels out again, exactly. The layer under test comes
last. Forward only, float32 only (OpenCV's DNN computes in float32).

The backend declares what OpenCV computes as specified; :meth:`OpenCVBackend.known_difference` names each case it
does not, so that the conformance report shows OpenCV's actual result there as a known difference.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darkspec.backends.base import REORG_DIALECT, Capability, ForwardOnlyBackend, OpCase, Prepared, capability_grid
from darkspec.errors import DarkspecError
from darkspec.reference import reorg, shortcut
from darkspec.reference.dialects import Dialect
from darkspec.reference.network import parse_network
from darkspec.reference.shortcut import WeightsType
from darkspec.reference.weights import write_weights

FIX = "install it with `pip install darkspec[opencv]` (opencv-python-headless<5: OpenCV 5 has no Darknet importer)"
#: The activations OpenCV's importer builds for [shortcut] and computes as Darknet does (tests/test_opencv.py).
ACTIVATIONS = ("linear", "leaky", "relu", "logistic", "swish", "mish", "tanh")


def _cv2():
    import cv2

    return cv2


def _refused(cv2, cfg_text: str, error) -> DarkspecError:
    """OpenCV's cv2.error as darkspec's refusal, naming the layer and OpenCV's message without its source location
    ("Unsupported activation: relu6 in function 'setActivation'")."""
    text = " ".join(str(error).split())
    match = re.search(r"error: \(-?\d+:[^)]*\) (.*)", text)
    return DarkspecError("cfg", cfg_text.strip().split("\n\n")[-1].replace("\n", " "),
                         "a cfg OpenCV's Darknet importer accepts", code="opencv-refused",
                         reason=f"OpenCV {cv2.__version__}: {match.group(1) if match else text}")


@dataclass
class _Cfg:
    """A cfg under construction, with the parameters of each [convolutional] that picks an input out of the blob."""

    net: str
    sections: list[str] = field(default_factory=list)
    weights: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, section: str, weights: dict | None = None) -> int:
        self.sections.append(section)
        if weights:
            self.weights[len(self.sections) - 1] = weights
        return len(self.sections) - 1

    def text(self) -> str:
        return "\n".join([self.net, *self.sections])


def _picker(blob_channels: int, offset: int, channels: int, stride: int) -> tuple[str, dict]:
    """A 1x1 [convolutional] whose output is channels offset..offset+channels of its input (every stride-th pixel)."""
    weights = np.zeros((channels, blob_channels), np.float32)
    weights[np.arange(channels), offset + np.arange(channels)] = 1
    section = f"[convolutional]\nfilters={channels}\nsize=1\nstride={stride}\npad=0\nactivation=linear\n"
    return section, {"biases": np.zeros(channels, np.float32), "weights": weights}


def _check_float32(x: np.ndarray):
    if x.dtype != np.float32:
        raise DarkspecError("x.dtype", str(x.dtype), "float32 (OpenCV's DNN computes in float32)", code="bad-dtype")


def _blob(arrays) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """All inputs in one blob: stacked along the channels, each smaller one on a grid of stride blob size / its
    size. Returns the blob and, per input, (channel offset, channels, stride)."""
    batch = arrays[0].shape[0]
    height, width = max(a.shape[2] for a in arrays), max(a.shape[3] for a in arrays)
    places, offset = [], 0
    for a in arrays:
        stride = height // a.shape[2]
        if height % a.shape[2] or width % a.shape[3] or width // a.shape[3] != stride:
            raise DarkspecError("input shapes", [x.shape for x in arrays], "spatial sizes that divide the largest one "
                                "by the same factor in height and width", code="opencv-shape-unbuildable")
        places.append((offset, a.shape[1], stride))
        offset += a.shape[1]
    blob = np.zeros((batch, offset, height, width), np.float32)
    for a, (start, channels, stride) in zip(arrays, places):
        blob[:, start:start + channels, ::stride, ::stride] = a
    return blob, places


def _net(blob) -> str:
    batch, channels, height, width = blob.shape
    return f"[net]\nbatch={batch}\nsubdivisions=1\nwidth={width}\nheight={height}\nchannels={channels}\n"


def _inputs_cfg(arrays) -> tuple[_Cfg, np.ndarray, list[int]]:
    """The cfg up to the layer under test: the blob's copy, then one picker per input; the layer index of each."""
    blob, places = _blob(arrays)
    cfg = _Cfg(_net(blob))
    copy = cfg.add(*_picker(blob.shape[1], 0, blob.shape[1], 1))
    layers = []
    for offset, channels, stride in places:
        if cfg.sections and len(cfg.sections) - 1 != copy:
            cfg.add(f"[route]\nlayers={copy}\n")
        layers.append(cfg.add(*_picker(blob.shape[1], offset, channels, stride)))
    return cfg, blob, layers


class OpenCVBackend(ForwardOnlyBackend):
    name = "opencv"

    def availability(self):
        try:
            cv2 = _cv2()
        except ImportError as error:
            return f"cv2 is not importable ({type(error).__name__}: {error}); {FIX}"
        if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromDarknet"):
            return f"OpenCV {cv2.__version__} has no cv2.dnn.readNetFromDarknet; {FIX}"
        return None

    def version(self):
        return f"opencv {_cv2().__version__}"

    def capabilities(self):
        return frozenset(c for c in capability_grid(dtypes=("float32",))  # OpenCV's DNN computes in float32
                         if c.pass_ == "forward" and c.op != "reorg3d")

    def probes(self):
        return frozenset({Capability("reorg3d", REORG_DIALECT, "float32", "forward")})

    def known_difference(self, case: OpCase) -> str | None:
        """Why OpenCV computes this case differently from darkspec's reference (spec/third-party.md#opencv)."""
        if case.op == "reorg3d":
            return "[reorg3d]: OpenCV's importer refuses it (Unknown layer type)"
        if case.op == "reorg":
            return "[reorg] reverse=1: OpenCV ignores reverse and computes reverse=0" if case.reverse else None
        params = case.params
        if params.activation not in ACTIVATIONS:
            return f"an activation other than {', '.join(ACTIVATIONS)}: OpenCV's importer refuses it"
        if len(case.input_shapes) > 2:
            return "from= with two or more layers: OpenCV adds only the first"
        if params.weights_type != WeightsType.NONE:
            return "weights_type per_feature or per_channel: OpenCV ignores the weights"
        if case.dialect == Dialect.PJREDDIE.value:
            (_, channels, *x_size), (_, from_channels, *from_size) = case.input_shapes
            if x_size != from_size:
                return "pjreddie's strided shortcut (a from layer of another spatial size): OpenCV asserts"
            if params.beta != 1:
                return "pjreddie's beta other than 1: OpenCV refuses it (Non-zero beta)"
            if params.alpha != 1 and from_channels < channels:
                return ("pjreddie's alpha other than 1 with a from layer of fewer channels: OpenCV scales all of x, "
                        "pjreddie only where the from layer meets it")
        return None

    def run_cfg(self, cfg_text: str, weights: bytes, blob: np.ndarray) -> np.ndarray:
        """OpenCV's output of the last layer of a Darknet cfg and weights file, on one input blob (NCHW float32).
        OpenCV's refusal (cv2.error) is a DarkspecError with code ``opencv-refused`` and OpenCV's message."""
        return self.prepare_cfg(cfg_text, weights, blob)()

    def prepare_cfg(self, cfg_text: str, weights: bytes, blob: np.ndarray):
        """The net read and its input set once; the callable runs OpenCV's forward (refusals as in run_cfg)."""
        cv2 = _cv2()
        with tempfile.TemporaryDirectory(prefix="darkspec-opencv-") as folder:
            cfg_path, weights_path = Path(folder) / "case.cfg", Path(folder) / "case.weights"
            cfg_path.write_text(cfg_text)
            weights_path.write_bytes(weights)
            logging = cv2.utils.logging
            level = logging.getLogLevel()
            logging.setLogLevel(logging.LOG_LEVEL_SILENT)  # a refusal is reported by the exception, not on stderr
            try:
                net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights_path))
                net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
                net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
                net.setInput(np.ascontiguousarray(blob, np.float32))
            except cv2.error as error:
                raise _refused(cv2, cfg_text, error) from None
            finally:
                logging.setLogLevel(level)

        def forward():
            logging.setLogLevel(logging.LOG_LEVEL_SILENT)
            try:
                return np.array(net.forward(), dtype=np.float32)
            except cv2.error as error:
                raise _refused(cv2, cfg_text, error) from None
            finally:
                logging.setLogLevel(level)

        return forward

    def _prepare_case(self, cfg: _Cfg, blob: np.ndarray, library: str):
        network = parse_network(cfg.text(), library)
        return self.prepare_cfg(cfg.text(), write_weights(network, cfg.weights), blob)

    def prepare(self, op, pass_, inputs, settings):
        """The case's net built once; what is timed is OpenCV's forward of the whole net, the 1x1 convolutions that
        pick the inputs out of the blob included: an upper bound of the layer's own time."""
        if pass_ != "forward":
            return None
        if op == "shortcut":
            forward = self._shortcut_case(inputs["x"], inputs["froms"], inputs["weights"], **settings)
        else:
            forward = self._reorg_case(inputs["x"], settings["stride"], settings["reverse"], op == "reorg")
        outputs = []

        def run():
            outputs[:] = [forward()]

        return Prepared(run, lambda: outputs[0])

    def shortcut_forward(self, x, froms, weights, **settings):
        return self._shortcut_case(x, froms, weights, **settings)()

    def reorg_forward(self, x, stride, reverse, old):
        return self._reorg_case(x, stride, reverse, old)()

    def _shortcut_case(self, x, froms, weights, *, params, dialect, quirks=frozenset(), from_input_shapes=None):
        x, froms, weights, dialect, quirks = shortcut.check_call("forward", x, froms, weights, params, dialect, quirks)
        _check_float32(x)
        if quirks:
            raise DarkspecError("quirks", sorted(q.value for q in quirks), "none: OpenCV's importer does not "
                                "reproduce Darknet's bugs", code="quirk-not-declared")
        dialect = dialect.value
        cfg, blob, layers = _inputs_cfg([*froms, x])
        settings = {"from": ",".join(str(layer) for layer in layers[:-1]), "activation": params.activation}
        library = "pjreddie" if dialect == Dialect.PJREDDIE.value else "alexeyab"
        if library == "pjreddie":  # written where not pjreddie's default 1, as a cfg would
            settings.update({key: repr(float(value)) for key, value in (("alpha", params.alpha),
                                                                       ("beta", params.beta)) if value != 1})
        elif params.weights_type != WeightsType.NONE:
            settings.update(weights_type=params.weights_type.value,
                            weights_normalization=params.weights_normalization.value)
        section = "[shortcut]\n" + "".join(f"{key}={value}\n" for key, value in settings.items())
        cfg.add(section, None if weights is None else {"weights": np.asarray(weights, np.float32)})
        return self._prepare_case(cfg, blob, library)

    def _reorg_case(self, x, stride, reverse, old):
        x = np.asarray(x)
        reorg.plan(reorg.REORG_OLD if old else reorg.REORG3D, x.shape, stride, reverse)
        _check_float32(x)
        cfg, blob, _ = _inputs_cfg([x])
        cfg.add(f"[{'reorg' if old else 'reorg3d'}]\nstride={int(stride)}\nreverse={int(bool(reverse))}\n")
        return self._prepare_case(cfg, blob, "alexeyab")
