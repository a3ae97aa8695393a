"""Hypothesis strategies for the ops' cases: shapes, inputs, weights and settings, read like the spec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from darkspec.reference import reorg
from darkspec.reference.shortcut import Normalization, ShortcutParams, UpdateParams, WeightsType, weight_count

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


@st.composite
def pjreddie_cases(draw, dtype=None, activation="linear"):
    """pjreddie's two-input case: one from layer, no weights, a spatial size equal to, twice or half the output's."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    height, width = draw(st.integers(1, 3)) * 2, draw(st.integers(1, 3)) * 2
    ratio = draw(st.sampled_from([1, 2, 0.5]))
    from_shape = (batch, draw(st.integers(1, 7)), int(height * ratio), int(width * ratio))
    x = draw(values(dtype, (batch, channels, height, width)))
    params = ShortcutParams(activation=activation, alpha=draw(st.sampled_from([1.0, 0.5, -2.0])),
                            beta=draw(st.sampled_from([1.0, 2.0, 0.25])))
    return ShortcutCase(x, [draw(values(dtype, from_shape))], None, draw(values(dtype, x.shape)), params)


@dataclass(frozen=True)
class ReorgCase:
    x: np.ndarray
    delta: np.ndarray
    previous_delta: np.ndarray
    stride: int
    reverse: bool
    old: bool


@st.composite
def reorg_cases(draw, old: bool, dtype=None):
    """Shapes on which Darknet's reorg is a permutation: sizes divisible by the stride and the channel counts each
    variant and direction needs (spec/reorg.md)."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    stride, reverse = draw(st.integers(1, 3)), draw(st.booleans())
    batch = draw(st.integers(1, 2))
    if old or not reverse:
        channels = draw(st.integers(1, 3)) * (stride * stride if old else 1)
    else:
        channels = draw(st.integers(1, 2)) * stride ** 4
    spatial = 1 if reverse else stride
    height, width = draw(st.integers(1, 3)) * spatial, draw(st.integers(1, 3)) * spatial
    x = draw(values(dtype, (batch, channels, height, width)))
    shape_rule = reorg.reorg_old_output_shape if old else reorg.reorg3d_output_shape
    out_shape = shape_rule(x.shape, stride, reverse)
    return ReorgCase(x, draw(values(dtype, out_shape)), draw(values(dtype, x.shape)), stride, reverse, old)


@dataclass(frozen=True)
class UpdateCase:
    weights: np.ndarray
    weight_updates: np.ndarray
    hyper: UpdateParams


@st.composite
def update_cases(draw, dtype=None):
    """One update step: weight updates large enough to meet the GPU's ±1 clip, and non-finite values for its
    repair, with burn-in settings that sometimes skip the step."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    count = draw(st.integers(1, 12))
    weights = draw(values(dtype, (count,)))
    updates = draw(hnp.arrays(dtype, (count,), elements=st.one_of(
        st.floats(-8, 8, width=np.dtype(dtype).itemsize * 8), st.sampled_from([np.nan, np.inf, -np.inf]))))
    hyper = UpdateParams(
        learning_rate=draw(st.sampled_from([0.001, 0.01, 0.1])), momentum=draw(st.sampled_from([0.0, 0.9, 0.949])),
        decay=draw(st.sampled_from([0.0, 0.0005, 0.01])), batch=draw(st.integers(1, 64)),
        learning_rate_scale=draw(st.sampled_from([1.0, 0.5])), loss_scale=draw(st.sampled_from([1.0, 128.0])),
        iteration=draw(st.integers(0, 3000)), burn_in=draw(st.sampled_from([0, 1000])),
        burnin_update=draw(st.sampled_from([0, 2])), dont_update=draw(st.sampled_from([0, 500])),
    )
    return UpdateCase(weights, updates, hyper)
