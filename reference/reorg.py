"""[reorg3d] and the old [reorg]: bit-exact NumPy reference (spec/reorg.md).

Both layers are pure permutations of their input: no value is computed, only moved, so the reference is exact for
every dtype. Everything here goes through one index rule, :func:`_reorg_cpu`, which is Darknet's ``reorg_cpu``
primitive written as an index array; the two section names and both directions differ only in which dimensions
they hand to it and in which direction they use it (:func:`plan`), exactly as Darknet's layer functions do.

Darknet's ``reorg_cpu(x, w, h, c, batch, s, forward, out)`` treats ``(c, h, w)`` as a *small* tensor ``Sm`` and
``(c / s**2, h * s, w * s)`` as a *large* tensor ``Lg``, with

    Sm[b, (dy*s + dx) * (c / s**2) + c2, j, i]  <->  Lg[b, c2, j*s + dy, i*s + dx]

``forward=0`` gathers (``out`` laid out as ``Sm`` from ``x`` laid out as ``Lg``: space to depth), ``forward=1``
scatters (``out`` laid out as ``Lg`` from ``x`` laid out as ``Sm``: depth to space). Both read and write flat
buffers, so a layer that passes dimensions other than its input's *reinterprets* its input buffer.

=========  =======  ==========================  ==================  ==================
section    reverse  dims passed to reorg_cpu    forward uses        backward uses
=========  =======  ==========================  ==================  ==================
reorg3d    0        output (C*s*s, H/s, W/s)    forward=0           forward=1
reorg3d    1        output (C/s/s, H*s, W*s)    forward=1           forward=0
reorg      0        input  (C, H, W)            forward=0           forward=1
reorg      1        input  (C, H, W)            forward=1           forward=0
=========  =======  ==========================  ==================  ==================

Darknet *overwrites* the previous layer's delta in backward (``out[...] = ...``, not ``+=``), so every ``*_backward``
here returns the new value of that delta, not an increment to add to it.

darkspec refuses, with :class:`darkspec.errors.DarkspecError`, every input on which Darknet divides by zero, runs
past a buffer, moves values other than by a permutation of the whole input, or silently misreads its input
(spec/reorg.md, "Errors").
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import numpy as np

from darkspec.errors import DarkspecError

__all__ = [
    "reorg3d_forward",
    "reorg3d_backward",
    "reorg3d_output_shape",
    "reorg_old_forward",
    "reorg_old_backward",
    "reorg_old_output_shape",
    "forward_gather_index",
    "backward_gather_index",
    "REORG3D",
    "REORG_OLD",
]

#: The section [reorg3d] (AlexeyAB, hank-ai): reorg_cpu is called with the layer's *output* dimensions.
REORG3D = "reorg3d"
#: The old section [reorg] (pjreddie; AlexeyAB's REORG_OLD): reorg_cpu is called with the layer's *input* dimensions.
REORG_OLD = "reorg"

# Stable error codes (spec/reorg.md, "Errors").
CODE_SHAPE = "reorg-bad-shape"
CODE_DELTA_SHAPE = "reorg-bad-delta-shape"
CODE_STRIDE = "reorg-bad-stride"
CODE_REVERSE = "reorg-bad-reverse"
CODE_SIZE = "reorg-size-not-divisible"
CODE_REORG3D_REVERSE_CHANNELS = "reorg3d-reverse-channels"
CODE_OLD_CHANNELS = "reorg-old-channels"


# --------------------------------------------------------------------------------------------------------------
# The one index rule: Darknet's reorg_cpu.


def _reorg_cpu_index(out_w: int, out_h: int, out_c: int, batch: int, stride: int) -> np.ndarray:
    """``idx[sm] = lg``: for each flat index ``sm`` of the small tensor, the flat index of the large tensor.

    This is ``reorg_cpu``'s ``in_index -> out_index`` map (Darknet names the small tensor's dims ``out_*`` in
    AlexeyAB and ``w, h, c`` in pjreddie). It needs ``out_c`` to be a multiple of ``stride**2`` (the callers check).
    """
    in_c = out_c // (stride * stride)
    large = np.arange(batch * in_c * out_h * stride * out_w * stride, dtype=np.intp)
    # large laid out as (b, c2, j, dy, i, dx); the small index is (b, dy, dx, c2, j, i) in row-major order.
    return large.reshape(batch, in_c, out_h, stride, out_w, stride).transpose(0, 3, 5, 1, 2, 4).reshape(-1)


def _reorg_cpu(x: np.ndarray, out_w: int, out_h: int, out_c: int, batch: int, stride: int, forward: bool):
    """Darknet's ``reorg_cpu(x, out_w, out_h, out_c, batch, stride, forward, out)`` on flat buffers.

    ``forward=False``: ``out[sm] = x[lg]`` (gather; space to depth). ``forward=True``: ``out[lg] = x[sm]``
    (scatter; depth to space). Returns the flat ``out``; every element is written (the map is a bijection).
    """
    flat = x.reshape(-1)
    idx = _reorg_cpu_index(out_w, out_h, out_c, batch, stride)
    if forward:
        out = np.empty_like(flat)
        out[idx] = flat
        return out
    return flat[idx]


# --------------------------------------------------------------------------------------------------------------
# Which call each layer makes, and what darkspec refuses.


@dataclass(frozen=True)
class Plan:
    """One layer's use of reorg_cpu: the dims it passes, and the flag its forward uses (backward: the other)."""

    in_shape: tuple[int, int, int, int]
    out_shape: tuple[int, int, int, int]
    stride: int
    dims: tuple[int, int, int]  # (w, h, c) handed to reorg_cpu
    forward_flag: bool

    def run(self, array: np.ndarray, backward: bool) -> np.ndarray:
        w, h, c = self.dims
        out = _reorg_cpu(array, w, h, c, self.in_shape[0], self.stride, self.forward_flag != backward)
        return out.reshape(self.in_shape if backward else self.out_shape)


def _check_stride(stride) -> int:
    if isinstance(stride, (bool, np.bool_)) or not isinstance(stride, numbers.Integral):
        raise DarkspecError("stride", stride, "an integer >= 1", code=CODE_STRIDE, reason="the cfg value is an integer")
    if stride < 1:
        raise DarkspecError(
            "stride",
            stride,
            "an integer >= 1",
            code=CODE_STRIDE,
            reason="Darknet divides the size by the stride: stride=0 is an integer division by zero (SIGFPE) and a "
            "negative stride gives negative sizes",
        )
    return int(stride)


def _check_reverse(reverse) -> bool:
    if not isinstance(reverse, (bool, np.bool_, numbers.Integral)):
        raise DarkspecError("reverse", reverse, "0/1 or False/True (Darknet: any non-zero integer is 1)",
                            code=CODE_REVERSE)
    return bool(reverse)


def _check_shape(shape, name: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        dims = None
    if dims is None or len(dims) != 4 or dims[0] < 0 or min(dims[1:]) < 1:
        raise DarkspecError(
            name,
            shape,
            "an NCHW shape (N, C, H, W) of integers with N >= 0 and C, H, W >= 1",
            code=CODE_SHAPE,
            reason="Darknet's parser refuses a [reorg3d]/[reorg] whose previous layer does not output an image",
        )
    return dims


def plan(variant: str, shape, stride, reverse, name: str = "x.shape") -> Plan:
    b, c, h, w = _check_shape(shape, name)
    s = _check_stride(stride)
    rev = _check_reverse(reverse)
    ss = s * s
    section = f"[{variant}] reverse={int(rev)}"

    if variant == REORG_OLD:
        if c % ss:
            if c < ss:
                reason = "Darknet computes C/stride**2 = 0 and then takes k % 0: integer division by zero (SIGFPE)"
            elif not rev:
                reason = (
                    "Darknet's index map is then not a permutation: it reads some input elements twice and others never"
                )
            else:
                reason = (
                    "Darknet's index map is then not a permutation: it writes N*C*H*W values into an output buffer of "
                    "N*(C//stride**2)*stride**2*H*W elements, some of them twice or past the buffer's end"
                )
            raise DarkspecError(
                "channels", c, f"a multiple of stride**2 = {ss} for {section} (stride={s})",
                code=CODE_OLD_CHANNELS, reason=reason,
            )
    elif variant == REORG3D:
        if rev and c % (ss * ss):
            if c // ss < ss:
                reason = (
                    "Darknet hands reorg_cpu C/stride**2 channels and it divides those by stride**2 again: "
                    "C/stride**4 = 0 and k % 0 is an integer division by zero (SIGFPE)"
                )
            elif (c // ss) % ss:
                reason = "Darknet's index map then writes some output elements twice and others never"
            else:
                reason = (
                    "Darknet then ignores the last N*(C % stride**2)*H*W elements of the flat input and misaligns "
                    "every sample after the first"
                )
            raise DarkspecError(
                "channels", c, f"a multiple of stride**4 = {ss * ss} for {section} (stride={s})",
                code=CODE_REORG3D_REVERSE_CHANNELS, reason=reason,
            )
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown reorg variant {variant!r}")

    if not rev:
        for setting, value in (("height", h), ("width", w)):
            if value % s:
                if variant == REORG3D:
                    what = (
                        "Darknet silently reads the first N*C*(H//stride*stride)*(W//stride*stride) elements of the "
                        "flat input as an (N, C, H//stride*stride, W//stride*stride) tensor (rows misaligned, not "
                        "a crop), and its backward leaves the rest of the previous delta untouched"
                    )
                else:
                    what = (
                        "Darknet silently permutes all N*C*H*W input elements into an output buffer of only "
                        "N*C*stride**2*(H//stride)*(W//stride) elements, writing past its end"
                    )
                raise DarkspecError(
                    setting, value, f"a multiple of stride={s} for {section}", code=CODE_SIZE, reason=what
                )
        out_shape = (b, c * ss, h // s, w // s)
    else:
        out_shape = (b, c // ss, h * s, w * s)

    if variant == REORG3D:
        dims = (out_shape[3], out_shape[2], out_shape[1])
    else:
        dims = (w, h, c)
    return Plan(in_shape=(b, c, h, w), out_shape=out_shape, stride=s, dims=dims, forward_flag=rev)


def plan_from_output(variant: str, out_shape, stride, reverse) -> Plan:
    """The plan of the layer whose *output* has ``out_shape`` (the backward knows only its delta)."""
    b, c, h, w = _check_shape(out_shape, "delta.shape")
    s = _check_stride(stride)
    rev = _check_reverse(reverse)
    ss = s * s
    if not rev:
        if c % ss:
            raise DarkspecError(
                "delta.shape", (b, c, h, w),
                f"an output shape of [{variant}] reverse=0: channels a multiple of stride**2 = {ss}",
                code=CODE_DELTA_SHAPE,
            )
        in_shape = (b, c // ss, h * s, w * s)
    else:
        if h % s or w % s:
            raise DarkspecError(
                "delta.shape", (b, c, h, w),
                f"an output shape of [{variant}] reverse=1: height and width multiples of stride={s}",
                code=CODE_DELTA_SHAPE,
            )
        in_shape = (b, c * ss, h // s, w // s)
    return plan(variant, in_shape, s, rev, name="input shape")


def _forward(variant: str, x, stride, reverse) -> np.ndarray:
    x = np.asarray(x)
    return plan(variant, x.shape, stride, reverse).run(x, backward=False)


def _backward(variant: str, delta, stride, reverse) -> np.ndarray:
    delta = np.asarray(delta)
    return plan_from_output(variant, delta.shape, stride, reverse).run(delta, backward=True)


# --------------------------------------------------------------------------------------------------------------
# Public API.


def forward_gather_index(old: bool, shape, stride, reverse=False) -> np.ndarray:
    """``g`` with ``forward(x).reshape(-1) == x.reshape(-1)[g]``: the forward permutation as one gather, for
    backends that move data with an index (the same index rule, applied to the flat positions)."""
    variant = REORG_OLD if old else REORG3D
    size = int(np.prod(shape))
    return plan(variant, shape, stride, reverse).run(np.arange(size, dtype=np.intp), backward=False).reshape(-1)


def backward_gather_index(old: bool, out_shape, stride, reverse=False) -> np.ndarray:
    """``g`` with ``backward(delta).reshape(-1) == delta.reshape(-1)[g]`` for a delta of ``out_shape``."""
    variant = REORG_OLD if old else REORG3D
    size = int(np.prod(out_shape))
    backward = plan_from_output(variant, out_shape, stride, reverse)
    return backward.run(np.arange(size, dtype=np.intp), backward=True).reshape(-1)


def reorg3d_output_shape(shape, stride, reverse=False) -> tuple[int, int, int, int]:
    """NCHW output shape of [reorg3d] on an NCHW input ``shape``; raises DarkspecError where darkspec refuses."""
    return plan(REORG3D, shape, stride, reverse, name="shape").out_shape


def reorg_old_output_shape(shape, stride, reverse=False) -> tuple[int, int, int, int]:
    """NCHW output shape of the old [reorg] on an NCHW input ``shape``; raises DarkspecError where darkspec refuses."""
    return plan(REORG_OLD, shape, stride, reverse, name="shape").out_shape


def reorg3d_forward(x, stride, reverse=False) -> np.ndarray:
    """[reorg3d] forward.

    ``reverse=0``: ONNX SpaceToDepth (DCR), ``y[n, (dy*s+dx)*C + c, j, i] = x[n, c, j*s+dy, i*s+dx]``.
    ``reverse=1``: Darknet's [reorg3d] reverse, which is *not* the inverse of ``reverse=0``: DCR DepthToSpace of the
    input buffer reinterpreted as ``(N, C/s**2, H*s, W*s)``; needs ``C % s**4 == 0``. Any dtype; values are moved,
    never changed. Returns a new array.
    """
    return _forward(REORG3D, x, stride, reverse)


def reorg3d_backward(delta, stride, reverse=False) -> np.ndarray:
    """[reorg3d] backward: the gradient arriving at the output, moved back to the input layout.

    Returns the *new value* of the previous layer's delta: Darknet overwrites that delta with this result (it
    does not add into it), so whatever the previous delta held before is discarded. The result is the inverse
    (equivalently, the transpose) of the forward permutation.
    """
    return _backward(REORG3D, delta, stride, reverse)


def reorg_old_forward(x, stride, reverse=False) -> np.ndarray:
    """Old [reorg] forward (pjreddie's [reorg]; AlexeyAB's [reorg], REORG_OLD).

    ``reverse=0`` (what YOLOv2 weights were trained with): the input buffer reinterpreted as
    ``(N, C/s**2, H*s, W*s)``, SpaceToDepth'ed, and the result reinterpreted as ``(N, C*s**2, H/s, W/s)``.
    ``reverse=1``: DCR DepthToSpace of the input (the inverse of [reorg3d] ``reverse=0``). Needs ``C % s**2 == 0``.
    """
    return _forward(REORG_OLD, x, stride, reverse)


def reorg_old_backward(delta, stride, reverse=False) -> np.ndarray:
    """Old [reorg] backward: the inverse (= transpose) of the forward permutation applied to ``delta``.

    Returns the *new value* of the previous layer's delta: Darknet overwrites that delta with this result (it
    does not add into it).
    """
    return _backward(REORG_OLD, delta, stride, reverse)
