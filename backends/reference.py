"""The NumPy reference as a backend: the definition every other backend is checked against."""

from __future__ import annotations

import numpy as np

import darkspec
from darkspec.backends.base import Backend, capability_grid
from darkspec.reference import reorg, shortcut
from darkspec.reference.dialects import Quirk


class ReferenceBackend(Backend):
    name = "reference"

    def capabilities(self):
        return capability_grid()  # every op, dialect, dtype and pass of the contract

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
