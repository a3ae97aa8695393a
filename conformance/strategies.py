"""Hypothesis strategies for [shortcut] cases: shapes, inputs, weights and settings, read like the spec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from darkspec.reference.shortcut import Normalization, ShortcutParams, WeightsType, weight_count

DTYPES = (np.float32, np.float64)


@dataclass(frozen=True)
class ShortcutCase:
    x: np.ndarray
    froms: list[np.ndarray]
    weights: np.ndarray | None
    delta: np.ndarray
    params: ShortcutParams


def values(dtype, shape, bound=4.0):
    """Finite values of moderate size (the sums stay far from overflow)."""
    elements = st.floats(-bound, bound, width=np.dtype(dtype).itemsize * 8, allow_subnormal=False)
    return hnp.arrays(dtype, shape, elements=elements)


def weight_values(dtype, count, normalization: Normalization, away_from_kinks: bool = False):
    """Weights that probe the interesting places: negatives, the relu kink at 0, the 0.001 floor, and (for
    softmax) values large enough that exp would overflow without the max subtraction."""
    if away_from_kinks:
        magnitude = st.floats(0.05, 3.0)
        elements = st.tuples(st.sampled_from([-1.0, 1.0]), magnitude).map(lambda pair: pair[0] * pair[1])
    else:
        special = st.sampled_from([0.0, -0.0, 1e-3, -1e-3, 9e-4, 1.1e-3, 1.0, -1.0])
        big = st.floats(-80.0, 80.0) if normalization == Normalization.SOFTMAX else st.floats(-4.0, 4.0)
        elements = st.one_of(special, big, st.floats(-4.0, 4.0))
    return hnp.arrays(dtype, (count,), elements=elements)


@st.composite
def shortcut_cases(
    draw,
    dtype=None,
    weights_type=None,
    normalization=None,
    activation="linear",
    max_from=3,
    same_channels=False,
    away_from_kinks=False,
):
    """One [shortcut] case: batch and sizes from 1, 1..max_from from-inputs whose channel counts may differ."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    weights_type = weights_type or draw(st.sampled_from(list(WeightsType)))
    normalization = normalization or draw(st.sampled_from(list(Normalization)))
    batch, channels, height, width = (draw(st.integers(1, 3)), draw(st.integers(1, 5)),
                                      draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    n_from = draw(st.integers(1, max_from))
    from_channels = [channels if same_channels else draw(st.integers(1, 7)) for _ in range(n_from)]
    x = draw(values(dtype, (batch, channels, height, width)))
    froms = [draw(values(dtype, (batch, c, height, width))) for c in from_channels]
    count = weight_count(weights_type, n_from, channels)
    weights = draw(weight_values(dtype, count, normalization, away_from_kinks)) if count else None
    delta = draw(values(dtype, x.shape))
    params = ShortcutParams(weights_type=weights_type, weights_normalization=normalization, activation=activation)
    return ShortcutCase(x, froms, weights, delta, params)
