"""The NumPy reference as a backend: the definition every other backend is checked against."""

from __future__ import annotations

import numpy as np

import darkspec
from darkspec.backends.base import REORG_DIALECT, Backend, capability_grid
from darkspec.reference import reorg, shortcut
from darkspec.reference.dialects import Dialect, Quirk

SHORTCUT_DIALECTS = tuple(d.value for d in Dialect)
#: darknet-inference has only a forward; the pjreddie shortcut has no weights to update.
SHORTCUT_PASSES = {
    Dialect.DARKNET_INFERENCE.value: ("forward",),
    Dialect.PJREDDIE.value: ("forward", "backward"),
}


class ReferenceBackend(Backend):
    name = "reference"

    def capabilities(self):
        return capability_grid({"shortcut": SHORTCUT_DIALECTS}, (np.float32, np.float64), passes=SHORTCUT_PASSES) \
            | capability_grid({"reorg3d": (REORG_DIALECT,), "reorg": (REORG_DIALECT,)}, (np.float32, np.float64))

    def version(self):
        return f"darkspec {darkspec.__version__}, numpy {np.__version__}"

    def quirks(self):
        return frozenset(Quirk)

    def shortcut_forward(self, x, froms, weights, **settings):
        return shortcut.forward(x, froms, weights, **settings)

    def shortcut_backward(self, x, froms, weights, delta, **settings):
        return shortcut.backward(x, froms, weights, delta, **settings)

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        return shortcut.update(weights, weight_updates, hyper, dialect)

    def reorg_forward(self, x, stride, reverse, old):
        return (reorg.reorg_old_forward if old else reorg.reorg3d_forward)(x, stride, reverse)

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        # Darknet overwrites the previous layer's delta: its old value does not matter.
        return (reorg.reorg_old_backward if old else reorg.reorg3d_backward)(delta, stride, reverse)
