"""Comparing an array against an expected one, and describing the worst element (spec/tolerances.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """An element passes when ``|actual - expected| <= atol + rtol * |expected|`` or it is within ``ulps`` units in
    the last place; NaN matches NaN. ``Tolerance.exact()`` demands identical bits up to the sign of zero."""

    rtol: float = 0.0
    atol: float = 0.0
    ulps: int = 0

    @staticmethod
    def exact() -> "Tolerance":
        return Tolerance()


@dataclass(frozen=True)
class Comparison:
    name: str
    passed: bool
    max_abs: float
    max_rel: float
    max_ulp: int
    #: The worst element: its index and both values (None when the arrays are equal or shapes differ).
    worst_index: tuple[int, ...] | None = None
    expected_value: float | None = None
    actual_value: float | None = None
    #: Elements left out because the reference marks them undefined (see spec/quirks.md).
    undefined: int = 0
    problem: str = ""

    def describe(self) -> str:
        if self.problem:
            return f"{self.name}: {self.problem}"
        text = f"{self.name}: abs {self.max_abs:.3g} rel {self.max_rel:.3g} ulp {self.max_ulp}"
        if not self.passed and self.worst_index is not None:
            text += f" at {list(self.worst_index)} (expected {self.expected_value!r}, got {self.actual_value!r})"
        if self.undefined:
            text += f", {self.undefined} undefined element(s) not compared"
        return text


def ulp_distance(a, b) -> np.ndarray:
    """How many representable values lie between a and b (0 for equal values, including +0 and -0)."""
    dtype = np.result_type(a, b)
    if dtype not in (np.float16, np.float32, np.float64):
        dtype = np.dtype(np.float64)
    return np.abs(_ordered(a, dtype) - _ordered(b, dtype))


def _ordered(values, dtype) -> np.ndarray:
    """Float bit patterns mapped to a line on which consecutive floats are consecutive numbers."""
    width = np.dtype(dtype).itemsize * 8
    ints = np.asarray(values, dtype).view({16: np.int16, 32: np.int32, 64: np.int64}[width]).astype(np.int64)
    magnitude = ints & np.int64((1 << (width - 1)) - 1)
    return np.where(ints < 0, -magnitude, magnitude).astype(np.float64)


def compare(name: str, expected, actual, tolerance: Tolerance, undefined=None) -> Comparison:
    """Compare ``actual`` against ``expected`` element by element. ``undefined`` masks elements not to compare."""
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape:
        return Comparison(name, False, np.inf, np.inf, 0, problem=f"shape {actual.shape}, expected {expected.shape}")
    mask = np.ones(expected.shape, bool) if undefined is None else ~np.asarray(undefined, bool)
    both_nan = np.isnan(expected) & np.isnan(actual)
    exp = np.where(mask & ~both_nan, expected, 0).astype(np.float64)
    act = np.where(mask & ~both_nan, actual, 0).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        abs_err = np.abs(act - exp)
        rel_err = np.where(exp != 0, abs_err / np.abs(np.where(exp != 0, exp, 1)), np.where(abs_err == 0, 0, np.inf))
    abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)
    rel_err = np.where(np.isnan(rel_err), np.inf, rel_err)
    ulps = ulp_distance(np.where(mask & ~both_nan, expected, 0), np.where(mask & ~both_nan, actual, 0))
    with np.errstate(invalid="ignore"):
        ok = (abs_err <= tolerance.atol + tolerance.rtol * np.abs(exp)) | (ulps <= tolerance.ulps)
    ok |= ~mask | both_nan | (expected == actual)  # equal infinities match
    passed = bool(ok.all())
    worst = None
    if expected.size:
        badness = np.where(ok, -1.0, ulps) if not passed else ulps  # the worst failing element, else the worst
        flat = int(np.argmax(badness))
        worst = tuple(int(i) for i in np.unravel_index(flat, expected.shape))
    return Comparison(
        name=name,
        passed=passed,
        max_abs=float(abs_err.max(initial=0.0)),
        max_rel=float(rel_err.max(initial=0.0)),
        max_ulp=int(ulps.max(initial=0)),
        worst_index=worst,
        expected_value=None if worst is None else float(expected[worst]),
        actual_value=None if worst is None else float(actual[worst]),
        undefined=int((~mask).sum()),
    )


def tolerance_for(dtype, magnitude: float) -> Tolerance:
    """The tolerance between two implementations of one dialect (spec/tolerances.md): within 4 ulp, or within
    4 epsilons of the dtype times the largest magnitude among the case's arrays."""
    return Tolerance(ulps=4, atol=4 * float(np.finfo(dtype).eps) * magnitude)


def largest_magnitude(*arrays) -> float:
    """The largest finite |value| among the arrays (0 if there is none)."""
    finite = [np.abs(a[np.isfinite(a)]) for a in map(np.asarray, arrays) if a.size]
    return max((float(f.max()) for f in finite if f.size), default=0.0)
