"""Deliberately broken backends: each one a real mistake that ports of these layers make.

The suite must fail every one of them (``darkspec mutants``; tests/test_mutants.py). A mutant is the reference with
one function replaced, or one op call wrapped, for the duration of each call.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import numpy as np

from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance.suite import BackendReport, run_suite
from darkspec.errors import DarkspecError
from darkspec.reference import contract, shortcut
from darkspec.reference.dialects import Dialect


@dataclass(frozen=True)
class Mutant:
    name: str
    mistake: str
    #: (module, attribute, replacement built from the original) patched during every op call
    patches: tuple[tuple[object, str, Callable], ...] = ()
    #: op name -> wrapper(original bound method) replacing the backend's op call
    wraps: tuple[tuple[str, Callable], ...] = ()


OP_CALLS = ("shortcut_forward", "shortcut_backward", "shortcut_update", "reorg_forward", "reorg_backward")


class MutantBackend(ReferenceBackend):
    def __init__(self, mutant: Mutant):
        self.mutant = mutant
        self.name = f"mutant:{mutant.name}"
        for op, wrapper in mutant.wraps:
            setattr(self, op, self._patched(wrapper(getattr(super(), op))))
        for op in OP_CALLS:
            if op not in dict(mutant.wraps):
                setattr(self, op, self._patched(getattr(super(), op)))

    def _patched(self, call):
        def run(*args, **kwargs):
            with ExitStack() as stack:
                for module, attribute, make in self.mutant.patches:
                    stack.enter_context(mock.patch.object(module, attribute, make(getattr(module, attribute))))
                return call(*args, **kwargs)

        return run


# --- the mistakes -------------------------------------------------------------------------------------------------


def _eps_before_max_subtraction(original):
    """softmax as exp(w - m) / (eps·exp(-m) + Σ exp(w - m)): eps added to the unshifted sum."""
    def normalize(table, normalization, *, relu_floor):
        if normalization != shortcut.Normalization.SOFTMAX:
            return original(table, normalization, relu_floor=relu_floor)
        m = table.max(axis=0)
        phi = np.exp(table - m)
        return (phi / (contract.NORMALIZATION_EPS * np.exp(-m) + phi.sum(axis=0))).astype(table.dtype)
    return normalize


def _sigmoid_normalization(original):
    """Weights squashed with a sigmoid, as several PyTorch ports do, instead of relu or softmax."""
    def normalize(table, normalization, *, relu_floor):
        if normalization == shortcut.Normalization.NONE:
            return original(table, normalization, relu_floor=relu_floor)
        return (1 / (1 + np.exp(-table))).astype(table.dtype)
    return normalize


def _no_gpu_floor(original):
    """The GPU dialect normalized with plain relu: the 0.001 floor forgotten."""
    def normalize(table, normalization, *, relu_floor):
        return original(table, normalization, relu_floor=None)
    return normalize


def _true_derivative_everywhere(original):
    """Autograd's weight gradient where Darknet's CPU dialect wants its surrogate delta·input."""
    def accumulate(d, inputs, table, what, init, params, dialect):
        return original(d, inputs, table, what, init, params, Dialect.EXACT)
    return accumulate


def _no_activation_gradient(original):
    """The delta passed through unchanged: the activation's gradient forgotten."""
    def factor(pre, out, params, dialect):
        return np.ones_like(out)
    return factor


def _first_from_only(forward):
    """Only the first from= input used, as OpenCV's Darknet importer does."""
    def run(x, froms, weights, **settings):
        if weights is not None:
            weights = weights.reshape(len(froms) + 1, -1)[:2].reshape(-1)
        return forward(x, list(froms)[:1], weights, **settings)
    return run


def _narrow_input_right_aligned(forward):
    """PRN: a narrower input added into the *last* channels instead of the first."""
    def run(x, froms, weights, **settings):
        channels = x.shape[1]
        padded = [np.concatenate([np.zeros((f.shape[0], channels - f.shape[1], *f.shape[2:]), f.dtype), f], axis=1)
                  if f.shape[1] < channels and f.shape[2:] == x.shape[2:] else f for f in froms]
        return forward(x, padded, weights, **settings)
    return run


def _weight_index_shifted(forward):
    """Each input multiplied by the next input's weight (slot i reads slot i+1's)."""
    def run(x, froms, weights, **settings):
        if weights is not None:
            weights = np.roll(weights.reshape(len(froms) + 1, -1), -1, axis=0).reshape(-1)
        return forward(x, froms, weights, **settings)
    return run


def _pixel_unshuffle_order(forward):
    """[reorg3d] with PyTorch pixel_unshuffle's channel order (c·s² + offset) instead of Darknet's (offset·C + c)."""
    def run(x, stride, reverse, old):
        out = forward(x, stride, reverse, old)
        if old or reverse:
            return out
        n, _, h, w = out.shape
        c = x.shape[1]
        return out.reshape(n, stride * stride, c, h, w).transpose(0, 2, 1, 3, 4).reshape(out.shape)
    return run


def _reorg_backward_accumulates(backward):
    """The reorg backward added into the previous layer's delta, which Darknet overwrites."""
    def run(delta, stride, reverse, old, previous_delta):
        return backward(delta, stride, reverse, old, previous_delta) + previous_delta
    return run


def _no_input_checks(original):
    """No validation of the inputs: shapes, dtypes, weights and spatial sizes taken as they come."""
    def accept(x, froms, weights, params, dialect):
        return np.asarray(x), [np.asarray(f) for f in froms], None if weights is None else np.asarray(weights)
    return accept


def _generic_refusal_code(call):
    """Bad input refused, but under one catch-all code instead of the spec's."""
    def run(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except DarkspecError as error:
            raise DarkspecError(error.setting, error.value, error.allowed, code="invalid-argument") from error
    return run


def _gpu_update_like_cpu(update):
    """Darknet's CPU update rule used for the GPU dialect: decay applied, nothing clipped or repaired."""
    def run(weights, weight_updates, hyper, dialect):
        if dialect == Dialect.DARKNET_GPU.value:
            dialect = Dialect.DARKNET_CPU.value
        return update(weights, weight_updates, hyper, dialect)
    return run


MUTANTS = (
    Mutant("eps-before-max-subtraction", "softmax eps added before the max subtraction",
           patches=((shortcut, "normalize_weights", _eps_before_max_subtraction),)),
    Mutant("true-derivative-for-darknet", "the true weight derivative where a Darknet dialect wants its surrogate",
           patches=((shortcut, "_accumulate_weight_updates", _true_derivative_everywhere),)),
    Mutant("prn-right-aligned", "PRN: a narrower input added into the last channels",
           wraps=(("shortcut_forward", _narrow_input_right_aligned),)),
    Mutant("first-from-only", "only the first from= input used (OpenCV)",
           wraps=(("shortcut_forward", _first_from_only),)),
    Mutant("weight-index-shifted", "each input weighted with the next input's weight",
           wraps=(("shortcut_forward", _weight_index_shifted),)),
    Mutant("pixel-unshuffle-order", "[reorg3d] in pixel_unshuffle's channel order",
           wraps=(("reorg_forward", _pixel_unshuffle_order),)),
    Mutant("missing-activation-gradient", "the activation's gradient left out of backward",
           patches=((shortcut, "activation_factor", _no_activation_gradient),)),
    Mutant("reorg-backward-adds", "reorg backward adding into a delta Darknet overwrites",
           wraps=(("reorg_backward", _reorg_backward_accumulates),)),
    Mutant("sigmoid-normalization", "weights normalized with a sigmoid",
           patches=((shortcut, "normalize_weights", _sigmoid_normalization),)),
    Mutant("gpu-without-floor", "the GPU dialect without the 0.001 floor",
           patches=((shortcut, "normalize_weights", _no_gpu_floor),)),
    Mutant("gpu-update-like-cpu", "the GPU update with decay and without clipping",
           wraps=(("shortcut_update", _gpu_update_like_cpu),)),
    Mutant("no-input-validation", "the inputs' shapes, dtypes and weights never checked",
           patches=((shortcut, "check_inputs", _no_input_checks),)),
    Mutant("generic-refusal-code", "bad input refused with one catch-all code, not the spec's",
           wraps=tuple((op, _generic_refusal_code) for op in OP_CALLS)),
)


def hunt(mutant: Mutant, profile: str = "ci", golden=()) -> BackendReport:
    """Run the suite on one mutant until the first check fails."""
    return run_suite(MutantBackend(mutant), profile, golden, stop_at_first_failure=True)


def killer(report: BackendReport) -> str | None:
    """What killed the mutant: the first failing check, or None if it survived."""
    for result in report.results:
        if not result.passed:
            return (f"{result.capability.label()} {result.capability.dtype} ({result.check}): "
                    f"{result.first_failure}")
    return None
