"""One record per op (the way PyTorch's OpInfo holds one per operator): what the suite, the tests and the bench
need to know about an op, in one place.

Each record holds the op's contract (darkspec.reference.contract: passes per dialect, dtypes, error codes), the
activations each dialect evaluates, the strategies that draw valid inputs for a capability
(darkspec.conformance.strategies), the tolerance rule of its comparisons, and its error inputs: one or more bad calls
per error code of the op's spec table, each with the code it must get.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

from darkspec.backends.base import Capability
from darkspec.conformance import strategies
from darkspec.conformance.compare import Tolerance, tolerance_for
from darkspec.reference import contract, reorg
from darkspec.reference.contract import OpContract
from darkspec.reference.dialects import Dialect, Quirk
from darkspec.reference.shortcut import Normalization, ShortcutParams, UpdateParams, WeightsType


@dataclass(frozen=True)
class Call:
    """One call of a backend's op: ``getattr(backend, method)(*args.values(), **settings)``."""

    method: str
    args: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInput:
    """A bad call and the refusal it must get (spec/shortcut.md#errors, spec/reorg.md#10-errors)."""

    code: str
    mistake: str
    #: capability -> the bad call, built on a valid call of that capability
    build: Callable[[Capability], Call]
    #: the dialects and passes it applies to (None: every one the op has)
    dialects: frozenset[str] | None = None
    passes: tuple[str, ...] | None = None
    #: the quirks a backend must declare for the call to reach the refusal
    quirks: frozenset[Quirk] = frozenset()

    def applies(self, capability: Capability, backend_quirks=frozenset()) -> bool:
        return ((self.dialects is None or capability.dialect in self.dialects)
                and (self.passes is None or capability.pass_ in self.passes)
                and self.quirks <= set(backend_quirks))


@dataclass(frozen=True)
class OpRecord:
    contract: OpContract
    #: capability -> a strategy of valid cases for it
    cases: Callable[[Capability], st.SearchStrategy]
    #: (dtype, largest magnitude involved) -> the tolerance of a comparison with the reference
    tolerance: Callable[[np.dtype, float], Tolerance]
    #: capability -> one small valid call of it (the error inputs change one thing in it)
    valid_call: Callable[[Capability], Call]
    error_inputs: tuple[ErrorInput, ...] = ()
    #: codes that no call reaches: the argument's own type refuses the value (code -> the refused construction)
    refused_by_types: dict[str, Callable[[], object]] = field(default_factory=dict)
    #: dialect -> the activations a case may use
    activations: Callable[[str], tuple[str, ...]] = lambda dialect: ()

    @property
    def name(self) -> str:
        return self.contract.name

    def errors_for(self, capability: Capability, backend_quirks=frozenset()) -> list[ErrorInput]:
        return [e for e in self.error_inputs if e.applies(capability, backend_quirks)]


def _shortcut_cases(capability: Capability) -> st.SearchStrategy:
    dtype = np.dtype(capability.dtype).type
    if capability.pass_ == "update":
        return strategies.update_cases(dtype=dtype)
    activation = st.sampled_from(contract.evaluated_activations(capability.dialect))
    if capability.dialect == Dialect.PJREDDIE.value:
        return activation.flatmap(lambda name: strategies.pjreddie_cases(dtype=dtype, activation=name))
    return activation.flatmap(lambda name: strategies.shortcut_cases(dtype=dtype, activation=name))


def _reorg_cases(old: bool) -> Callable[[Capability], st.SearchStrategy]:
    return lambda capability: strategies.reorg_cases(old=old, dtype=np.dtype(capability.dtype).type)


def _permutation(dtype, magnitude) -> Tolerance:
    """A reorg moves values: bit-exact."""
    return Tolerance.exact()


# --- [shortcut]: a valid call and the bad calls built on it ----------------------------------------------------------

_ALEXEYAB = frozenset(d.value for d in Dialect if d != Dialect.PJREDDIE)
_PJREDDIE = frozenset({Dialect.PJREDDIE.value})
_OTHER_DTYPE = {"float32": np.float64, "float64": np.float32}


def _array(shape, dtype, start=0.25):
    return (start + np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) / 8).astype(dtype)


def _shortcut_call(capability: Capability, x=None, froms=None, weights=None, delta=None, **settings) -> Call:
    """The capability's pass on a 2-channel 2x2 input and one from layer like it (or ``x``, ``froms``, ... given);
    an update on three weights. ``settings`` replace the call's keyword arguments."""
    dtype = np.dtype(capability.dtype)
    if capability.pass_ == "update":
        args = dict(weights=_array((3,), dtype), weight_updates=_array((3,), dtype, -0.5),
                    hyper=UpdateParams(learning_rate=0.1, momentum=0.9, decay=0.0005, batch=2),
                    dialect=capability.dialect)
        return Call("shortcut_update", {**args, **settings})
    x = _array((1, 2, 2, 2), dtype) if x is None else x
    froms = [_array(x.shape, x.dtype, 1.0)] if froms is None else froms
    options = {"params": ShortcutParams(), "dialect": capability.dialect, "quirks": frozenset(), **settings}
    if capability.pass_ == "forward":
        return Call("shortcut_forward", dict(x=x, froms=froms, weights=weights), options)
    delta = _array(x.shape, x.dtype, -1.0) if delta is None else delta
    return Call("shortcut_backward", dict(x=x, froms=froms, weights=weights, delta=delta), options)


def _per_feature(capability, n_from=1, weights=None, **settings) -> Call:
    dtype = np.dtype(capability.dtype)
    params = ShortcutParams(weights_type=WeightsType.PER_FEATURE, weights_normalization=Normalization.RELU)
    x = _array((1, 2, 2, 2), dtype)
    froms = [_array(x.shape, dtype, 1.0 + i) for i in range(n_from)]
    weights = np.linspace(0.5, 1.5, n_from + 1).astype(dtype) if weights is None else weights
    return _shortcut_call(capability, x, froms, weights, params=params, **settings)


def _update(capability, **changes) -> Call:
    return _shortcut_call(replace(capability, pass_="update"), **changes)


def _with_pass(capability, pass_) -> Call:
    return _shortcut_call(replace(capability, pass_=pass_))


SHORTCUT_ERRORS = (
    ErrorInput("bad-shape", "x is not NCHW", lambda c: _shortcut_call(c, x=_array((2, 2, 2), c.dtype)),
               passes=("forward", "backward")),
    ErrorInput("bad-shape", "a from input with another batch size",
               lambda c: _shortcut_call(c, froms=[_array((2, 2, 2, 2), c.dtype)]), passes=("forward", "backward")),
    ErrorInput("bad-shape", "a delta unlike x", lambda c: _shortcut_call(c, delta=_array((1, 2, 2, 1), c.dtype)),
               passes=("backward",)),
    ErrorInput("bad-shape", "a weight-update accumulator unlike the weights",
               lambda c: _update(c, weight_updates=_array((2,), c.dtype)), passes=("update",)),
    ErrorInput("bad-dtype", "a from input of another dtype than x",
               lambda c: _shortcut_call(c, froms=[_array((1, 2, 2, 2), _OTHER_DTYPE[c.dtype])]),
               passes=("forward", "backward")),
    ErrorInput("bad-dtype", "weights of another dtype than x",
               lambda c: _per_feature(c, weights=np.ones(2, _OTHER_DTYPE[c.dtype])), dialects=_ALEXEYAB,
               passes=("forward", "backward")),
    ErrorInput("spatial-mismatch", "a from input of another height and width",
               lambda c: _shortcut_call(c, froms=[_array((1, 2, 2, 1), c.dtype)]), dialects=_ALEXEYAB,
               passes=("forward", "backward")),
    ErrorInput("weights-size", "per_feature weights of the wrong count",
               lambda c: _per_feature(c, weights=np.ones(3, c.dtype)), dialects=_ALEXEYAB,
               passes=("forward", "backward")),
    ErrorInput("weights-size", "weights given with weights_type=none",
               lambda c: _shortcut_call(c, weights=np.ones(2, c.dtype)), dialects=_ALEXEYAB,
               passes=("forward", "backward")),
    ErrorInput("weights-not-finite", "a NaN weight", lambda c: _per_feature(c, weights=np.array([1, np.nan], c.dtype)),
               dialects=_ALEXEYAB, passes=("forward", "backward")),
    ErrorInput("weights-not-finite", "an infinite weight",
               lambda c: _per_feature(c, weights=np.array([np.inf, 1], c.dtype)), dialects=_ALEXEYAB,
               passes=("forward", "backward")),
    ErrorInput("unknown-dialect", "a dialect name outside spec/dialects.md",
               lambda c: _shortcut_call(c, dialect="darknet-fpga")),
    ErrorInput("unknown-quirk", "a quirk name outside spec/quirks.md",
               lambda c: _shortcut_call(c, quirks=frozenset({"no-such-quirk"})), passes=("forward", "backward")),
    ErrorInput("unknown-activation", "an activation no Darknet has",
               lambda c: _shortcut_call(c, params=ShortcutParams(activation="no_such_activation")),
               passes=("forward", "backward")),
    ErrorInput("unknown-activation", "mish, which pjreddie's Darknet does not have",
               lambda c: _shortcut_call(c, params=ShortcutParams(activation="mish")), dialects=_PJREDDIE,
               passes=("forward", "backward")),
    ErrorInput("activation-not-evaluated", "hard_mish, which Darknet's [shortcut] does not evaluate",
               lambda c: _shortcut_call(c, params=ShortcutParams(activation="hard_mish")), dialects=_ALEXEYAB,
               passes=("forward", "backward")),
    ErrorInput("activation-gradient-aborts", "the backward of normalize_channels (Darknet's aborts)",
               lambda c: _shortcut_call(c, params=ShortcutParams(activation="normalize_channels"),
                                        quirks=frozenset({Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS.value})),
               dialects=frozenset({Dialect.DARKNET_CPU.value, Dialect.DARKNET_GPU.value}), passes=("backward",),
               quirks=frozenset({Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS})),
    ErrorInput("pass-not-in-dialect", "a backward in darknet-inference, which is forward only",
               lambda c: _with_pass(c, "backward"), dialects=frozenset({Dialect.DARKNET_INFERENCE.value})),
    ErrorInput("pass-not-in-dialect", "an update in a dialect without trainable weights",
               lambda c: _update(c), dialects=frozenset({Dialect.DARKNET_INFERENCE.value, Dialect.PJREDDIE.value})),
    ErrorInput("bad-batch", "an update batch of 0",
               lambda c: _update(c, hyper=UpdateParams(learning_rate=0.1, momentum=0.9, decay=0.0, batch=0)),
               passes=("update",)),
    ErrorInput("pjreddie-single-from", "two from layers in pjreddie's shortcut",
               lambda c: _shortcut_call(c, froms=[_array((1, 2, 2, 2), c.dtype)] * 2), dialects=_PJREDDIE),
    ErrorInput("pjreddie-no-weights", "weights in pjreddie's shortcut", lambda c: _per_feature(c), dialects=_PJREDDIE),
    ErrorInput("pjreddie-spatial-ratio", "a from layer twice as high but as wide",
               lambda c: _shortcut_call(c, x=_array((1, 2, 4, 4), c.dtype), froms=[_array((1, 2, 8, 4), c.dtype)]),
               dialects=_PJREDDIE),
)

_UNKNOWN: Any = "per_pixel"  # a value outside the enum, as a cfg or a caller may give it
SHORTCUT_REFUSED_BY_TYPES: dict[str, Callable[[], object]] = {
    "unknown-weights-type": lambda: ShortcutParams(weights_type=_UNKNOWN),
    "unknown-weights-normalization": lambda: ShortcutParams(weights_normalization=_UNKNOWN),
}


# --- [reorg3d] and [reorg] -------------------------------------------------------------------------------------------


def _reorg_call(capability: Capability, shape=(1, 4, 4, 4), stride=2, reverse=False, delta_shape=None) -> Call:
    """The capability's pass on an input of ``shape`` (a backward: on the delta of that input's output, or of
    ``delta_shape``)."""
    dtype = np.dtype(capability.dtype)
    old = capability.op == contract.REORG.name
    if capability.pass_ == "forward":
        return Call("reorg_forward", dict(x=_array(shape, dtype), stride=stride, reverse=reverse, old=old))
    if delta_shape is None:
        output_shape = reorg.reorg_old_output_shape if old else reorg.reorg3d_output_shape
        delta_shape = output_shape(shape, 2, False)  # reverse=0's: the valid call's, whatever the bad one changes
    return Call("reorg_backward", dict(delta=_array(delta_shape, dtype), stride=stride, reverse=reverse, old=old,
                                       previous_delta=_array(shape, dtype, -2.0)))


REORG_ERRORS = (
    ErrorInput("reorg-bad-stride", "stride 0", lambda c: _reorg_call(c, stride=0)),
    ErrorInput("reorg-bad-stride", "a stride that is not an integer", lambda c: _reorg_call(c, stride=2.5)),
    ErrorInput("reorg-bad-reverse", "reverse that is not a bool or integer", lambda c: _reorg_call(c, reverse="yes")),
    ErrorInput("reorg-bad-shape", "an input that is not NCHW", lambda c: _reorg_call(c, shape=(4, 4, 4)),
               passes=("forward",)),
    ErrorInput("reorg-bad-shape", "a delta that is not NCHW", lambda c: _reorg_call(c, delta_shape=(16, 2, 2)),
               passes=("backward",)),
    ErrorInput("reorg-bad-delta-shape", "a delta no input of the layer has as its output",
               lambda c: _reorg_call(c, delta_shape=(1, 3, 2, 2)), passes=("backward",)),
    ErrorInput("reorg-size-not-divisible", "a height that is not a multiple of the stride",
               lambda c: _reorg_call(c, shape=(1, 4, 3, 4)), passes=("forward",)),
)
REORG3D_ERRORS = REORG_ERRORS + (
    ErrorInput("reorg3d-reverse-channels", "reverse=1 with channels not a multiple of stride**4",
               lambda c: _reorg_call(c, shape=(1, 4, 2, 2), reverse=True, delta_shape=(1, 1, 4, 4))),
)
REORG_OLD_ERRORS = REORG_ERRORS + (
    ErrorInput("reorg-old-channels", "channels not a multiple of stride**2",
               lambda c: _reorg_call(c, shape=(1, 3, 4, 4), delta_shape=(1, 12, 2, 2))),
)


SHORTCUT = OpRecord(contract.SHORTCUT, _shortcut_cases, tolerance_for, _shortcut_call, SHORTCUT_ERRORS,
                    SHORTCUT_REFUSED_BY_TYPES, contract.evaluated_activations)
REORG3D = OpRecord(contract.REORG3D, _reorg_cases(old=False), _permutation, _reorg_call, REORG3D_ERRORS)
REORG = OpRecord(contract.REORG, _reorg_cases(old=True), _permutation, _reorg_call, REORG_OLD_ERRORS)

RECORDS: dict[str, OpRecord] = {record.name: record for record in (SHORTCUT, REORG3D, REORG)}
