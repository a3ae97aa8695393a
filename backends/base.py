"""The backend protocol: what an implementation declares and the calls the conformance suite makes.

A backend takes and returns NumPy arrays at the boundary, whatever it computes with inside. It declares its
capabilities (op, dialect, dtype, pass, device); the suite checks every capability it declares against the
reference and reports every other one as unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from darkspec.errors import DarkspecError
from darkspec.reference import contract
from darkspec.reference.contract import REORG_DIALECT

__all__ = ["REORG_DIALECT", "Backend", "BackendCrashed", "Capability", "capability_grid"]


class BackendCrashed(RuntimeError):
    """The implementation behind a backend stopped (a crash, an abort, an exit) during one pass: ``stage`` is
    ``parse``, ``forward``, ``backward`` or ``update``. A replay counts it as Darknet's behaviour where the recording
    shows Darknet stopping in that same pass, and as a failure anywhere else."""

    stage = "unknown"


@dataclass(frozen=True, order=True)
class Capability:
    op: str
    dialect: str
    dtype: str
    pass_: str
    device: str = "cpu"

    def label(self) -> str:
        return f"{self.op}/{self.dialect}/{self.pass_}"


@dataclass(frozen=True)
class Prepared:
    """A pass made ready for timing (:meth:`Backend.prepare`): ``run()`` computes it on arrays already in the
    backend's own memory; ``result()`` returns what the last ``run()`` computed, as the NumPy API returns it (a
    backward's ``delta`` may be None: autograd does not return it)."""

    run: Callable[[], Any]
    result: Callable[[], Any]


@dataclass(frozen=True)
class OpCase:
    """What a case of an op is, for :meth:`Backend.known_difference`: the op and dialect, and for ``shortcut`` its
    settings and the NCHW shapes of x and of each from layer, for ``reorg3d``/``reorg`` the stride and direction."""

    op: str
    dialect: str
    params: Any = None
    input_shapes: tuple = ()
    stride: int = 1
    reverse: bool = False


class Backend:
    """Base class of backends. Subclasses set ``name`` and override ``capabilities`` and the op calls they
    support; ``availability`` returns None when the backend can run here, else the reason it cannot (and the fix).

    The op calls and their meaning are those of :mod:`darkspec.reference.shortcut` and
    :mod:`darkspec.reference.reorg`:

    - ``shortcut_forward(x, froms, weights, *, params, dialect, quirks, from_input_shapes) -> output``
    - ``shortcut_backward(x, froms, weights, delta, *, params, dialect, quirks, weight_updates,
      from_input_shapes) -> ShortcutGradients`` (the delta after the activation gradient, what each input's delta
      gains, and the weight-update accumulator after backward)
    - ``shortcut_update(weights, weight_updates, hyper, dialect) -> (weights, weight_updates)``
    - ``reorg_forward(x, stride, reverse, old) -> output``
    - ``reorg_backward(delta, stride, reverse, old, previous_delta) -> the previous layer's delta after backward``
    """

    name = "backend"

    def availability(self) -> str | None:
        return None

    def capabilities(self) -> frozenset[Capability]:
        return frozenset()

    def version(self) -> str:
        return "unknown"

    def quirks(self) -> frozenset:
        """The quirks (darkspec.reference.dialects.Quirk) the backend can reproduce on request."""
        return frozenset()

    def probes(self) -> frozenset[Capability]:
        """Capabilities the backend does not declare but can still run: the suite runs them and reports the
        backend's actual result as a known difference (what a third-party runtime really does there)."""
        return frozenset()

    def known_difference(self, case: OpCase) -> str | None:
        """Why the backend is known to compute this case differently from the reference, or None where it claims
        to conform. The suite counts such a case not towards the capability but as a known difference, with the
        measured error; every case of a probed capability needs a reason."""
        return None

    @property
    def dialects(self) -> frozenset[str]:
        return frozenset(c.dialect for c in self.capabilities())

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities()

    def declared(self, op: str, dialect: str, dtype: str, pass_: str) -> Capability | None:
        """The declared capability for this op, dialect, dtype and pass on whichever device, or None."""
        return next((c for c in sorted(self.capabilities())
                     if (c.op, c.dialect, c.dtype, c.pass_) == (op, dialect, dtype, pass_)), None)

    def prepare(self, op: str, pass_: str, inputs: dict, settings: dict) -> Prepared | None:
        """Optional, for throughput measurement: ``op``'s ``pass_`` on ``inputs`` (the op call's array arguments:
        ``x``, ``froms``, ``weights``, ``delta``, ``weight_updates``) moved once into the backend's own arrays, so
        that ``darkspec bench`` times the computation and not the NumPy boundary. A forward writes into a
        preallocated output where the backend has one. ``settings`` are the call's other keyword arguments. None
        where the backend has no such path (the bench then times the NumPy API)."""
        return None

    def shortcut_forward(self, x, froms, weights, **settings) -> np.ndarray:
        raise NotImplementedError

    def shortcut_backward(self, x, froms, weights, delta, **settings):
        raise NotImplementedError

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        raise NotImplementedError

    def reorg_forward(self, x, stride, reverse, old) -> np.ndarray:
        raise NotImplementedError

    def reorg_backward(self, delta, stride, reverse, old, previous_delta) -> np.ndarray:
        raise NotImplementedError


def capability_grid(ops: dict[str, tuple[str, ...]] | None = None, dtypes=None, device="cpu", passes=None):
    """The capabilities of the contract (darkspec.reference.contract): every (op, dialect, dtype, pass) of the given
    ops and their dialects (default: every op in every dialect), in ``dtypes`` (default: the op's), with each
    dialect's passes (``passes`` may restrict a dialect's)."""
    ops = ops or {name: op.dialects for name, op in contract.OPS.items()}
    restricted = passes or {}
    return frozenset(
        Capability(op, dialect, np.dtype(dtype).name, pass_, device)
        for op, dialects in ops.items()
        for dialect in dialects
        for dtype in (dtypes or contract.OPS[op].dtypes)
        for pass_ in contract.passes(op, dialect)
        if pass_ in restricted.get(dialect, contract.passes(op, dialect))
    )


class ForwardOnlyBackend(Backend):
    """A backend that runs forwards only (an inference runtime): a backward or an update is refused, with the
    spec's code where the dialect has no such pass, else with ``pass-not-declared``."""

    def _refuse(self, op: str, dialect, pass_: str):
        contract.require_pass(op, dialect, pass_)
        raise DarkspecError("pass", pass_, f"forward (the {self.name} backend runs inference only)",
                            code="pass-not-declared")

    def shortcut_backward(self, x, froms, weights, delta, *, dialect, **settings):
        self._refuse("shortcut", dialect, "backward")

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        self._refuse("shortcut", dialect, "update")

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        self._refuse("reorg" if old else "reorg3d", REORG_DIALECT, "backward")
