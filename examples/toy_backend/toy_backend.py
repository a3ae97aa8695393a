"""An out-of-tree darkspec backend, as small as a backend can be (README: "Validating a new backend").

It implements the [shortcut] forward of the darknet-cpu dialect, in float32 and float64, with its own NumPy code
(and darkspec's activations and constants), and declares exactly that. Everything else shows up as "unsupported".
Bad calls are refused with the reference's own checks, so their codes are the spec's.
"""

import numpy as np

from darkspec.backends.base import Backend, Capability
from darkspec.reference.activations import activate
from darkspec.reference.contract import NORMALIZATION_EPS
from darkspec.reference.shortcut import check_call


class ToyBackend(Backend):
    name = "toy"

    def capabilities(self):
        return frozenset(Capability("shortcut", "darknet-cpu", dtype, "forward") for dtype in ("float32", "float64"))

    def version(self):
        return "toy 1.0"

    def shortcut_forward(self, x, froms, weights, *, params, dialect, quirks=(), **_):
        x, froms, weights, _, _ = check_call("forward", x, froms, weights, params, dialect, quirks)
        batch, channels = x.shape[:2]
        slots = [x, *froms]
        if weights is None:
            scale = np.ones((len(slots), channels), x.dtype)
        else:
            table = weights.reshape(len(slots), -1)
            if params.weights_normalization == "relu":
                table = np.maximum(table, 0)
            elif params.weights_normalization == "softmax":
                table = np.exp((table - table.max(axis=0)).astype(np.float64)).astype(x.dtype)
            if params.weights_normalization != "none":
                total = np.full(table.shape[1], NORMALIZATION_EPS, x.dtype)
                for row in table:
                    total = total + row
                table = table / total
            scale = np.broadcast_to(table, (len(slots), channels))
        out = x * scale[0][None, :, None, None]
        for slot, add in enumerate(froms, start=1):
            c = min(channels, add.shape[1])  # equal spatial sizes: the PRN rule is "the first channels"
            out[:, :c] = out[:, :c] + add[:, :c] * scale[slot][None, :c, None, None]
        return activate(params.activation, out)
