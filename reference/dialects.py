"""Dialects and quirks: the named choices a backend declares (spec/dialects.md, spec/quirks.md).

A *dialect* is one consistent definition of forward, backward and update that some real implementation computes.
A *quirk* is a known Darknet bug that the reference reproduces only when asked to (never by default).
"""

from __future__ import annotations

import enum

from darkspec.errors import DarkspecError


class Dialect(str, enum.Enum):
    #: AlexeyAB's CPU training path: relu normalization, weight gradient delta*input, decay, no clipping.
    DARKNET_CPU = "darknet-cpu"
    #: AlexeyAB's GPU training path: 0.001 clamp, its own surrogate weight gradient, no decay, clipped updates.
    DARKNET_GPU = "darknet-gpu"
    #: AlexeyAB inference: weights normalized once at load (with the 0.001 clamp), then used raw. Forward only.
    DARKNET_INFERENCE = "darknet-inference"
    #: pjreddie's 2018 two-input shortcut with alpha/beta and the stride/sample spatial rule.
    PJREDDIE = "pjreddie"
    #: The darknet-cpu forward with the true derivative everywhere (what autograd computes).
    EXACT = "exact"


class Quirk(str, enum.Enum):
    #: CPU forward: the n=1, unweighted fast path is chosen on the from layer's *input* dims (spec/quirks.md).
    CPU_FASTPATH_INPUT_DIMS = "cpu-fastpath-input-dims"
    #: AlexeyAB's CPU activate() has no relu6 case: the forward is 0.
    CPU_RELU6_ZERO = "cpu-relu6-zero"
    #: hard_mish and normalize_channels* are not evaluated inside [shortcut]: the forward is 0.
    SHORTCUT_UNEVALUATED_ACTIVATIONS = "shortcut-unevaluated-activations"


def parse_dialect(value: str | Dialect) -> Dialect:
    try:
        return Dialect(value)
    except ValueError:
        raise DarkspecError(
            "dialect", value, ", ".join(d.value for d in Dialect), code="unknown-dialect"
        ) from None


def parse_quirks(values) -> frozenset[Quirk]:
    """Quirk names (or one name) as a set of Quirk."""
    quirks = set()
    for value in [values] if isinstance(values, str) else values:
        try:
            quirks.add(Quirk(value))
        except ValueError:
            raise DarkspecError("quirk", value, ", ".join(q.value for q in Quirk), code="unknown-quirk") from None
    return frozenset(quirks)
