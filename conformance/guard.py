"""The wall between the suite and the backend under test.

The backend under test is expected to be broken. :class:`GuardedBackend` stands in for it in every check: each call
it makes is guarded, so that whatever the backend does (raise, return a list, ``None``, the wrong dtype or shape,
change its inputs in place) ends as a :class:`BackendFault` that names the call and the cause, which the check
reports as its failure; the run goes on. What the protocol lets a backend raise is passed on unchanged: a
``DarkspecError`` (a refusal, which the checks judge) and ``BackendCrashed`` (the implementation stopped in a pass).

What a call must return (spec/shortcut.md, spec/reorg.md): NumPy arrays in the inputs' dtype, with the output the
previous layer's shape, each input's delta that input's shape, and the weights' shape for what updates them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from darkspec.backends.base import Backend, BackendCrashed, Capability, OpCase
from darkspec.errors import DarkspecError


class BackendFault(Exception):
    """The backend under test broke the protocol of one call; the message names the call and what it did."""


def _copies(inputs: dict) -> dict[str, np.ndarray]:
    """Snapshots of the array inputs (lists of arrays by element), to see afterwards whether the call changed them."""
    arrays = {}
    for name, value in inputs.items():
        if isinstance(value, np.ndarray):
            arrays[name] = value.copy()
        elif isinstance(value, (list, tuple)):
            arrays.update({f"{name}[{i}]": a.copy() for i, a in enumerate(value) if isinstance(a, np.ndarray)})
    return arrays


def _current(inputs: dict, name: str) -> np.ndarray:
    base, _, index = name.partition("[")
    return inputs[base][int(index.rstrip("]"))] if index else inputs[base]


def call(backend, method: str, args: dict, **settings):
    """``backend.method(*args.values(), **settings)``, guarded: raises BackendFault naming what went wrong. Every
    array among the arguments must be bit-for-bit unchanged afterwards (a backend that works in the caller's
    buffers corrupts the next check)."""
    watched = {**args, **settings}
    before = _copies(watched)
    try:
        result = getattr(backend, method)(*args.values(), **settings)
    except (DarkspecError, BackendCrashed):
        raise
    except (Exception, SystemExit) as error:
        raise BackendFault(f"{method} raised {type(error).__name__}: {error}") from error
    for name, was in before.items():
        now = _current(watched, name)
        if now.shape != was.shape or now.dtype != was.dtype or now.tobytes() != was.tobytes():
            raise BackendFault(f"{method} changed its input {name} in place")
    return result


def array(method: str, what: str, value, dtype, shape=None) -> np.ndarray:
    """``value`` if it is a NumPy array of ``dtype`` (and ``shape``, when given), else a BackendFault saying why."""
    if not isinstance(value, np.ndarray):
        raise BackendFault(f"{method} returned {type(value).__name__} as {what}, expected a numpy.ndarray of "
                           f"{np.dtype(dtype).name}")
    if value.dtype != dtype:
        raise BackendFault(f"{method} returned {what} in {value.dtype}, expected {np.dtype(dtype).name}: results are "
                           "in the inputs' dtype (spec/shortcut.md, spec/reorg.md)")
    if shape is not None and value.shape != tuple(shape):
        raise BackendFault(f"{method} returned {what} of shape {value.shape}, expected {tuple(shape)}")
    return value


class GuardedBackend(Backend):
    """The backend under test, every call guarded. Its capabilities and quirks are asked for once: a backend whose
    ``capabilities()`` raises, or returns anything but Capability objects, is a BackendFault."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = str(getattr(backend, "name", type(backend).__name__))
        self._capabilities: frozenset[Capability] | None = None
        self._quirks: frozenset | None = None

    def capabilities(self) -> frozenset[Capability]:
        if self._capabilities is None:
            declared = call(self.backend, "capabilities", {})
            if not isinstance(declared, (set, frozenset, list, tuple)) or \
                    not all(isinstance(c, Capability) for c in declared):
                raise BackendFault(f"capabilities() returned {declared!r:.200}, expected a set of Capability")
            self._capabilities = frozenset(declared)
        return self._capabilities

    def limited_to(self, capabilities) -> "GuardedBackend":
        """The same backend, declaring only those of its capabilities given (a replay then runs no other pass)."""
        view = GuardedBackend(self.backend)
        view._capabilities = self.capabilities() & frozenset(capabilities)
        view._quirks = self.quirks()
        return view

    def quirks(self) -> frozenset:
        if self._quirks is None:
            declared = call(self.backend, "quirks", {})
            try:
                self._quirks = frozenset(declared)
            except TypeError:
                raise BackendFault(f"quirks() returned {declared!r:.200}, expected a set of Quirk") from None
        return self._quirks

    def probes(self) -> frozenset[Capability]:
        probed = call(self.backend, "probes", {})
        if not isinstance(probed, (set, frozenset, list, tuple)) or not all(isinstance(c, Capability) for c in probed):
            raise BackendFault(f"probes() returned {probed!r:.200}, expected a set of Capability")
        return frozenset(probed)

    def known_difference(self, case: OpCase) -> str | None:
        reason = call(self.backend, "known_difference", dict(case=case))
        if reason is not None and not isinstance(reason, str):
            raise BackendFault(f"known_difference() returned {reason!r:.200}, expected None or the reason as a str")
        return reason

    def availability(self) -> str | None:
        reason = call(self.backend, "availability", {})
        if reason is not None and not isinstance(reason, str):
            raise BackendFault(f"availability() returned {reason!r:.200}, expected None or the reason as a str")
        return reason

    def version(self) -> str:
        try:
            return str(call(self.backend, "version", {}))
        except BackendFault as fault:
            return f"unknown ({fault})"

    def shortcut_forward(self, x, froms, weights, **settings):
        out = call(self.backend, "shortcut_forward", dict(x=x, froms=froms, weights=weights), **settings)
        return array("shortcut_forward", "the output", out, x.dtype, x.shape)

    def shortcut_backward(self, x, froms, weights, delta, **settings):
        method = "shortcut_backward"
        grads = call(self.backend, method, dict(x=x, froms=froms, weights=weights, delta=delta), **settings)
        for part in ("delta", "input_deltas", "weight_updates"):
            if not hasattr(grads, part):
                raise BackendFault(f"{method} returned {type(grads).__name__}, which has no {part}: expected a "
                                   "ShortcutGradients")
        array(method, "delta", grads.delta, x.dtype, x.shape)
        sources = [x, *froms]
        if not isinstance(grads.input_deltas, Sequence) or len(grads.input_deltas) != len(sources):
            raise BackendFault(f"{method} returned {grads.input_deltas!r:.120} as input_deltas, expected a list of "
                               f"{len(sources)} arrays (slot 0 and each from layer)")
        for i, (share, source) in enumerate(zip(grads.input_deltas, sources)):
            array(method, f"input_deltas[{i}]", share, x.dtype, source.shape)
        if weights is not None:
            array(method, "weight_updates", grads.weight_updates, x.dtype, weights.shape)
        return grads

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        method = "shortcut_update"
        result = call(self.backend, method, dict(weights=weights, weight_updates=weight_updates, hyper=hyper,
                                                 dialect=dialect))
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise BackendFault(f"{method} returned {type(result).__name__}, expected (weights, weight_updates)")
        return tuple(array(method, what, value, weights.dtype, weights.shape)
                     for what, value in zip(("weights", "weight_updates"), result))

    def reorg_forward(self, x, stride, reverse, old):
        out = call(self.backend, "reorg_forward", dict(x=x, stride=stride, reverse=reverse, old=old))
        return array("reorg_forward", "the output", out, x.dtype)

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        args = dict(delta=delta, stride=stride, reverse=reverse, old=old, previous_delta=previous_delta)
        out = call(self.backend, "reorg_backward", args)
        return array("reorg_backward", "the previous delta", out, delta.dtype,
                     None if previous_delta is None else previous_delta.shape)
