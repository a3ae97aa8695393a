"""[reorg3d] and the old [reorg]: the reference against Darknet's recordings, its own properties, ONNX and PyTorch.

Every comparison is exact (``np.array_equal``): the layers only move values. spec/reorg.md names the test behind
each of its statements.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkspec.conformance.recordings import CRASH_IN_FORWARD, OK, load_recording
from darkspec.errors import DarkspecError
from darkspec.reference.reorg import (
    reorg3d_backward,
    reorg3d_forward,
    reorg3d_output_shape,
    reorg_old_backward,
    reorg_old_forward,
    reorg_old_output_shape,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
VECTORS = GOLDEN / "darknet-vectors"

REORG3D, OLD = "reorg3d", "reorg"
FORWARD = {REORG3D: reorg3d_forward, OLD: reorg_old_forward}
BACKWARD = {REORG3D: reorg3d_backward, OLD: reorg_old_backward}
OUTPUT_SHAPE = {REORG3D: reorg3d_output_shape, OLD: reorg_old_output_shape}

FAST = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------------------------------------------
# Recordings


#: The recording groups of these layers in golden/darknet-vectors/index.json.
REORG_GROUPS = ("reorg3d", "reorg_old", "pj_reorg")


def _recording_paths() -> list[Path]:
    cases = json.loads((VECTORS / "index.json").read_text())["cases"]
    return [VECTORS / case["file"] for case in cases if case["group"] in REORG_GROUPS]


RECORDINGS = [load_recording(path) for path in _recording_paths()]
OK_RECORDINGS = [r for r in RECORDINGS if r.status == OK]
CRASH_RECORDINGS = [r for r in RECORDINGS if r.status == CRASH_IN_FORWARD]

#: Which darkspec variant each (library, section name) is: AlexeyAB's [reorg] is the old layer (REORG_OLD).
SECTION_VARIANT = {("alexeyab", "reorg3d"): REORG3D, ("alexeyab", "reorg"): OLD, ("pjreddie", "reorg"): OLD}
#: The layer type each (library, section name) parses to, as the recordings' layer tables name it.
SECTION_LAYER_TYPE = {
    ("alexeyab", "reorg3d"): "reorg3d",
    ("alexeyab", "reorg"): "reorg_old",
    ("pjreddie", "reorg"): "reorg",
}


def _case(rec):
    layer = rec.network_layers[-1]
    return SECTION_VARIANT[(rec.library, rec.layer_type)], layer["stride"], layer["reverse"]


def _ids(recs):
    return [r.name for r in recs]


def test_all_reorg_recordings_present():
    assert {r.params["group"] for r in RECORDINGS} == set(REORG_GROUPS)
    assert len(RECORDINGS) == len(OK_RECORDINGS) + len(CRASH_RECORDINGS)  # every one either ran or crashed in forward
    assert len(OK_RECORDINGS) >= 14 and len(CRASH_RECORDINGS) >= 2


@pytest.mark.parametrize("rec", RECORDINGS, ids=_ids(RECORDINGS))
def test_section_names_per_library(rec):
    key = (rec.library, rec.layer_type)
    assert key in SECTION_LAYER_TYPE
    assert rec.network_layers[-1]["type"] == SECTION_LAYER_TYPE[key]


@pytest.mark.parametrize("rec", RECORDINGS, ids=_ids(RECORDINGS))
def test_reverse_defaults_to_zero(rec):
    section = rec.cfg.split("[")[-1]
    keys = {line.split("=")[0].strip() for line in section.splitlines() if "=" in line}
    if "reverse" not in keys:
        assert rec.network_layers[-1]["reverse"] == 0


@pytest.mark.parametrize("rec", OK_RECORDINGS, ids=_ids(OK_RECORDINGS))
def test_recording_forward(rec):
    variant, stride, reverse = _case(rec)
    y = FORWARD[variant](rec.arrays["x"], stride, reverse)
    assert y.dtype == rec.arrays["output"].dtype
    assert np.array_equal(y, rec.arrays["output"])


@pytest.mark.parametrize("rec", OK_RECORDINGS, ids=_ids(OK_RECORDINGS))
def test_recording_output_shape_matches_parser(rec):
    variant, stride, reverse = _case(rec)
    layer = rec.network_layers[-1]
    shape = OUTPUT_SHAPE[variant](rec.arrays["x"].shape, stride, reverse)
    assert shape == (layer["batch"], layer["out_c"], layer["out_h"], layer["out_w"]) == rec.arrays["output"].shape


@pytest.mark.parametrize("rec", OK_RECORDINGS, ids=_ids(OK_RECORDINGS))
def test_recording_backward_overwrites_previous_delta(rec):
    variant, stride, reverse = _case(rec)
    a = rec.arrays
    # No activation inside the layer: the delta reaches reorg_cpu unchanged.
    assert np.array_equal(a["delta_after_gradient"], a["delta"])
    dx = BACKWARD[variant](a["delta"], stride, reverse)
    assert np.array_equal(dx, a["dx"])
    # The delta was non-zero before backward and Darknet's result does not contain it: overwritten, not added to.
    assert np.all(a["dx_init"] != 0)
    assert not np.array_equal(a["dx"], dx + a["dx_init"])


@pytest.mark.parametrize("rec", CRASH_RECORDINGS, ids=_ids(CRASH_RECORDINGS))
def test_recording_crash_is_refused(rec):
    variant, stride, reverse = _case(rec)
    assert rec.params["run"]["signal"] == "SIGFPE"
    expected_code = "reorg3d-reverse-channels" if variant == REORG3D else "reorg-old-channels"
    for call in (
        lambda: FORWARD[variant](rec.arrays["x"], stride, reverse),
        lambda: OUTPUT_SHAPE[variant](rec.arrays["x"].shape, stride, reverse),
        lambda: BACKWARD[variant](rec.arrays["delta"], stride, reverse),
    ):
        with pytest.raises(DarkspecError) as info:
            call()
        assert info.value.code == expected_code
        assert info.value.setting == "channels"
    # The transcription of Darknet's code divides by zero at the same place.
    with pytest.raises(ZeroDivisionError):
        _darknet_layer(variant, rec.arrays["x"], stride, reverse)


# ----------------------------------------------------------------------------------------------------------------
# A line-by-line transcription of Darknet's reorg_cpu and of the layers' calls to it: a scalar oracle (slow, small
# shapes only). It is anchored to real Darknet by test_transcription_reproduces_recordings; it is what shows what
# Darknet does on the inputs darkspec refuses. Buffers are sized exactly as Darknet allocates them, so a write or
# read past the end raises IndexError instead of corrupting memory.


def _darknet_reorg_cpu(x, out_w, out_h, out_c, batch, stride, forward, out):
    in_c = out_c // (stride * stride)  # every operand is non-negative: C's / and % agree with // and %
    for b in range(batch):
        for k in range(out_c):
            for j in range(out_h):
                for i in range(out_w):
                    in_index = i + out_w * (j + out_h * (k + out_c * b))
                    c2 = k % in_c
                    offset = k // in_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + out_w * stride * (h2 + out_h * stride * (c2 + in_c * b))
                    if forward:
                        out[out_index] = x[in_index]
                    else:
                        out[in_index] = x[out_index]


def _darknet_layer(variant, x, stride, reverse, delta=None, prev_delta=None):
    """make_*_layer's sizes, then forward_*_layer (and backward_*_layer when ``delta`` is given)."""
    n, c, h, w = x.shape
    s = stride
    if reverse:
        out_w, out_h, out_c = w * s, h * s, c // (s * s)
    else:
        out_w, out_h, out_c = w // s, h // s, c * (s * s)
    dims = (out_w, out_h, out_c) if variant == REORG3D else (w, h, c)
    flag = 1 if reverse else 0
    output = np.zeros(n * out_c * out_h * out_w, dtype=x.dtype)  # calloc
    _darknet_reorg_cpu(x.reshape(-1), *dims, n, s, flag, output)
    y = output.reshape(n, out_c, out_h, out_w)
    if delta is None:
        return y
    dx = np.array(prev_delta, copy=True).reshape(-1)
    _darknet_reorg_cpu(np.asarray(delta).reshape(-1), *dims, n, s, 1 - flag, dx)
    return y, dx.reshape(x.shape)


@pytest.mark.parametrize("rec", OK_RECORDINGS, ids=_ids(OK_RECORDINGS))
def test_transcription_reproduces_recordings(rec):
    variant, stride, reverse = _case(rec)
    a = rec.arrays
    y, dx = _darknet_layer(variant, a["x"], stride, reverse, a["delta"], a["dx_init"])
    assert np.array_equal(y, a["output"]) and np.array_equal(dx, a["dx"])


@st.composite
def layer_cases(draw, variant=None, reverse=None, max_stride=3):
    """A valid (variant, reverse, stride, NCHW shape)."""
    variant = draw(st.sampled_from([REORG3D, OLD])) if variant is None else variant
    reverse = draw(st.booleans()) if reverse is None else reverse
    s = draw(st.integers(1, max_stride))
    n = draw(st.integers(0, 2))
    if variant == REORG3D and reverse:
        c = s**4 * draw(st.integers(1, 2 if s < 3 else 1))
    elif variant == OLD:
        c = s**2 * draw(st.integers(1, 3))
    else:
        c = draw(st.integers(1, 4))
    if reverse:
        h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    else:
        h, w = s * draw(st.integers(1, 3)), s * draw(st.integers(1, 3))
    return variant, reverse, s, (n, c, h, w)


def _ints(shape, seed, dtype=np.int64):
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(dtype)


@FAST
@given(layer_cases(), st.integers(0, 2**32 - 1))
def test_reference_matches_transcription(case, seed):
    variant, reverse, s, shape = case
    x = _ints(shape, seed, np.float32)
    out_shape = OUTPUT_SHAPE[variant](shape, s, reverse)
    delta = _ints(out_shape, seed + 1, np.float32)
    prev = _ints(shape, seed + 2, np.float32)
    y, dx = _darknet_layer(variant, x, s, reverse, delta, prev)
    assert np.array_equal(FORWARD[variant](x, s, reverse), y)
    assert np.array_equal(BACKWARD[variant](delta, s, reverse), dx)


# ----------------------------------------------------------------------------------------------------------------
# Properties


@FAST
@given(layer_cases(), st.integers(0, 2**32 - 1))
def test_forward_backward_are_adjoint(case, seed):
    variant, reverse, s, shape = case
    x = _ints(shape, seed)
    g = _ints(OUTPUT_SHAPE[variant](shape, s, reverse), seed + 1)
    lhs = np.sum(FORWARD[variant](x, s, reverse) * g)
    rhs = np.sum(x * BACKWARD[variant](g, s, reverse))
    assert lhs == rhs


@FAST
@given(layer_cases())
def test_forward_is_a_bijection(case):
    variant, reverse, s, shape = case
    x = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    y = FORWARD[variant](x, s, reverse)
    assert y.size == x.size
    assert np.array_equal(np.sort(y.reshape(-1)), x.reshape(-1))
    assert np.array_equal(BACKWARD[variant](y, s, reverse), x)
    assert np.array_equal(FORWARD[variant](BACKWARD[variant](y, s, reverse), s, reverse), y)


@FAST
@given(layer_cases(), st.integers(0, 2**32 - 1))
def test_batch_independence(case, seed):
    variant, reverse, s, shape = case
    x = _ints(shape, seed)
    y = FORWARD[variant](x, s, reverse)
    g = _ints(y.shape, seed + 1)
    dx = BACKWARD[variant](g, s, reverse)
    for b in range(shape[0]):
        assert np.array_equal(FORWARD[variant](x[b : b + 1], s, reverse), y[b : b + 1])
        assert np.array_equal(BACKWARD[variant](g[b : b + 1], s, reverse), dx[b : b + 1])


@pytest.mark.parametrize(
    "dtype", [np.int8, np.uint16, np.int64, np.float16, np.float32, np.float64, np.complex128, bool]
)
def test_any_dtype_bit_exact(dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 16, 4, 6)) * 50).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating):
        x.reshape(-1)[:4] = [np.nan, np.inf, -0.0, np.finfo(dtype).tiny]
    for variant in (REORG3D, OLD):
        for reverse in (False, True):
            y = FORWARD[variant](x, 2, reverse)
            assert y.dtype == x.dtype
            back = BACKWARD[variant](y, 2, reverse)
            assert back.tobytes() == x.tobytes()


@FAST
@given(layer_cases(variant=REORG3D, reverse=False), st.integers(0, 2**32 - 1))
def test_reorg3d_round_trips_through_dcr_depth_to_space(case, seed):
    _, _, s, shape = case
    x = _ints(shape, seed)
    y = reorg3d_forward(x, s)
    assert np.array_equal(_depth_to_space_dcr(y, s), x)
    assert np.array_equal(reorg_old_forward(y, s, reverse=True), x)  # old [reorg] reverse=1 is that mapping
    assert np.array_equal(reorg3d_backward(y, s), x)


def test_stride_one_is_identity():
    x = _ints((2, 3, 4, 5), 0)
    for variant in (REORG3D, OLD):
        for reverse in (False, True):
            assert np.array_equal(FORWARD[variant](x, 1, reverse), x)
            assert np.array_equal(BACKWARD[variant](x, 1, reverse), x)


# ----------------------------------------------------------------------------------------------------------------
# The math, as spec/reorg.md states it


def _space_to_depth_dcr(x, s):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // s, s, w // s, s).transpose(0, 3, 5, 1, 2, 4).reshape(n, c * s * s, h // s, w // s)


def _depth_to_space_dcr(x, s):
    n, c, h, w = x.shape
    return x.reshape(n, s, s, c // (s * s), h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // (s * s), h * s, w * s)


def _depth_to_space_crd(x, s):
    n, c, h, w = x.shape
    return x.reshape(n, c // (s * s), s, s, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (s * s), h * s, w * s)


def to_pixel_unshuffle_order(c, s):
    """Channel index into [reorg3d]'s output for each pixel_unshuffle channel p: (p % s**2) * C + p // s**2."""
    p = np.arange(c * s * s)
    return (p % (s * s)) * c + p // (s * s)


def to_reorg3d_order(c, s):
    """Channel index into pixel_unshuffle's output for each [reorg3d] channel k: (k % C) * s**2 + k // C."""
    k = np.arange(c * s * s)
    return (k % c) * (s * s) + k // c


@FAST
@given(layer_cases(variant=REORG3D, reverse=False), st.integers(0, 2**32 - 1))
def test_reorg3d_is_space_to_depth(case, seed):
    _, _, s, shape = case
    x = _ints(shape, seed)
    y = reorg3d_forward(x, s)
    assert y.shape == (shape[0], shape[1] * s * s, shape[2] // s, shape[3] // s)
    assert np.array_equal(y, _space_to_depth_dcr(x, s))


@FAST
@given(layer_cases(variant=REORG3D, reverse=False), st.integers(0, 2**32 - 1))
def test_reorg3d_index_formula(case, seed):
    _, _, s, (n, c, h, w) = case
    x = _ints((n, c, h, w), seed)
    y = reorg3d_forward(x, s)
    b, ch, dy, dx, j, i = np.meshgrid(
        np.arange(n), np.arange(c), np.arange(s), np.arange(s), np.arange(h // s), np.arange(w // s), indexing="ij"
    )
    assert np.array_equal(y[b, (dy * s + dx) * c + ch, j, i], x[b, ch, j * s + dy, i * s + dx])


@FAST
@given(layer_cases(variant=REORG3D, reverse=True), st.integers(0, 2**32 - 1))
def test_reorg3d_reverse_formula(case, seed):
    _, _, s, (n, c, h, w) = case
    x = _ints((n, c, h, w), seed)
    y = reorg3d_forward(x, s, reverse=True)
    assert y.shape == (n, c // (s * s), h * s, w * s)
    # DCR DepthToSpace of the input buffer reinterpreted with the *output* shape, reinterpreted back.
    reinterpreted = x.reshape(n, c // (s * s), h * s, w * s)
    assert np.array_equal(y, _depth_to_space_dcr(reinterpreted, s).reshape(y.shape))
    # The same as one reshape/transpose.
    single = x.reshape(n, s, s, c // s**4, h * s, w * s).transpose(0, 3, 4, 1, 5, 2).reshape(y.shape)
    assert np.array_equal(y, single)


@pytest.mark.parametrize("s, shape", [(2, (1, 1, 4, 4)), (2, (2, 3, 4, 6)), (3, (1, 2, 6, 3))])
def test_reorg3d_reverse_is_not_the_inverse(s, shape):
    x = np.arange(int(np.prod(shape))).reshape(shape)
    y = reorg3d_forward(x, s)  # C*s*s channels: reverse=1 needs C*s*s % s**4 == 0
    if y.shape[1] % s**4:
        with pytest.raises(DarkspecError):
            reorg3d_forward(y, s, reverse=True)
    else:
        assert reorg3d_forward(y, s, reverse=True).shape == x.shape
        assert not np.array_equal(reorg3d_forward(y, s, reverse=True), x)
    assert np.array_equal(reorg3d_backward(y, s), x)
    # With C a multiple of s**2 the round trip is defined and still wrong.
    x4 = np.arange(s * s * 2 * s * 2 * s).reshape(1, s * s, 2 * s, 2 * s)
    back = reorg3d_forward(reorg3d_forward(x4, s), s, reverse=True)
    assert back.shape == x4.shape and not np.array_equal(back, x4)


@FAST
@given(layer_cases(variant=OLD, reverse=False), st.integers(0, 2**32 - 1))
def test_reorg_old_forward_formula(case, seed):
    _, _, s, (n, c, h, w) = case
    x = _ints((n, c, h, w), seed)
    y = reorg_old_forward(x, s)
    assert y.shape == (n, c * s * s, h // s, w // s)
    single = x.reshape(n, c // (s * s), h, s, w, s).transpose(0, 3, 5, 1, 2, 4).reshape(y.shape)
    assert np.array_equal(y, single)
    # Reinterpret with s**2 fewer channels, SpaceToDepth, reinterpret with the declared output shape.
    big = x.reshape(n, c // (s * s), h * s, w * s)
    assert np.array_equal(y, reorg3d_forward(big, s).reshape(y.shape))


def test_reorg_old_forward_differs_from_reorg3d():
    x = np.arange(2 * 8 * 4 * 4).reshape(2, 8, 4, 4)
    assert not np.array_equal(reorg_old_forward(x, 2), reorg3d_forward(x, 2))


def test_reorg_old_yolov2_passthrough_shape():
    x = np.arange(64 * 26 * 26, dtype=np.float32).reshape(1, 64, 26, 26)
    y = reorg_old_forward(x, 2)
    assert y.shape == (1, 256, 13, 13) == reorg_old_output_shape(x.shape, 2, False)
    assert np.array_equal(y, reorg3d_forward(x.reshape(1, 16, 52, 52), 2).reshape(1, 256, 13, 13))


@FAST
@given(layer_cases(variant=OLD, reverse=True), st.integers(0, 2**32 - 1))
def test_reorg_old_reverse_is_dcr_depth_to_space(case, seed):
    _, _, s, (n, c, h, w) = case
    x = _ints((n, c, h, w), seed)
    y = reorg_old_forward(x, s, reverse=True)
    assert np.array_equal(y, _depth_to_space_dcr(x, s))
    assert np.array_equal(y, reorg3d_backward(x, s))
    if n > 0 and s > 1 and c // (s * s) > 1:
        distinct = np.arange(x.size).reshape(x.shape)
        assert not np.array_equal(reorg_old_forward(distinct, s, True), _depth_to_space_crd(distinct, s))


# ----------------------------------------------------------------------------------------------------------------
# Errors


def _raises(code, call, setting=None):
    with pytest.raises(DarkspecError) as info:
        call()
    err = info.value
    assert err.code == code
    if setting is not None:
        assert err.setting == setting
    text = str(err)
    assert err.setting in text and repr(err.value) in text and err.allowed in text and f"[{code}]" in text
    return err


@pytest.mark.parametrize("stride", [0, -1, -2, 1.5, 2.0, True, "2", None])
def test_error_stride(stride):
    x = np.zeros((1, 16, 4, 4))
    for variant in (REORG3D, OLD):
        for reverse in (False, True):
            _raises("reorg-bad-stride", lambda: FORWARD[variant](x, stride, reverse), "stride")
            _raises("reorg-bad-stride", lambda: OUTPUT_SHAPE[variant](x.shape, stride, reverse), "stride")


@pytest.mark.parametrize("reverse", ["1", None, 1.0])
def test_error_reverse(reverse):
    _raises("reorg-bad-reverse", lambda: reorg3d_forward(np.zeros((1, 16, 2, 2)), 2, reverse), "reverse")


def test_reverse_any_nonzero_integer_is_reverse():
    x = _ints((1, 16, 2, 2), 3)
    assert np.array_equal(reorg3d_forward(x, 2, 2), reorg3d_forward(x, 2, True))
    assert np.array_equal(reorg_old_forward(x, 2, np.int32(1)), reorg_old_forward(x, 2, True))


@pytest.mark.parametrize("shape", [(16, 4, 4), (1, 1, 16, 4, 4), (1, 0, 4, 4), (1, 4, 0, 4), (1, 4, 4, 0)])
def test_error_shape(shape):
    for variant in (REORG3D, OLD):
        _raises("reorg-bad-shape", lambda: FORWARD[variant](np.zeros(shape), 1))
        _raises("reorg-bad-shape", lambda: OUTPUT_SHAPE[variant](shape, 1))
    _raises("reorg-bad-shape", lambda: reorg3d_output_shape((1, 4.5, 4, 4), 1))


def test_empty_batch_is_allowed():
    x = np.zeros((0, 4, 4, 4), dtype=np.float32)
    assert reorg3d_forward(x, 2).shape == (0, 16, 2, 2)
    assert reorg_old_backward(np.zeros((0, 16, 2, 2)), 2).shape == (0, 4, 4, 4)


@pytest.mark.parametrize("c", [1, 4, 15, 17, 20, 24, 35])
def test_error_reorg3d_reverse_channels(c):
    x = np.zeros((1, c, 2, 2))
    err = _raises("reorg3d-reverse-channels", lambda: reorg3d_forward(x, 2, True), "channels")
    assert err.value == c and "16" in err.allowed
    _raises("reorg3d-reverse-channels", lambda: reorg3d_output_shape(x.shape, 2, True), "channels")
    assert ("SIGFPE" in err.reason) == (c < 16)
    assert ("twice" in err.reason) == (c >= 16 and (c // 4) % 4 != 0)
    assert ("ignores" in err.reason) == (c >= 16 and (c // 4) % 4 == 0)
    # reverse=0 has no condition on C.
    assert reorg3d_forward(x, 2).shape == (1, 4 * c, 1, 1)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("c", [1, 2, 3, 6, 10])
def test_error_reorg_old_channels(c, reverse):
    x = np.zeros((1, c, 4, 4))
    err = _raises("reorg-old-channels", lambda: reorg_old_forward(x, 2, reverse), "channels")
    assert err.value == c and "4" in err.allowed
    assert ("SIGFPE" in err.reason) == (c < 4)
    assert ("reads some input elements twice" in err.reason) == (c > 4 and not reverse)
    assert ("past the buffer's end" in err.reason) == (c > 4 and reverse)


@pytest.mark.parametrize("variant", [REORG3D, OLD])
@pytest.mark.parametrize(
    "shape, setting", [((1, 4, 5, 4), "height"), ((1, 4, 4, 3), "width"), ((1, 4, 1, 4), "height")]
)
def test_error_indivisible_size(variant, shape, setting):
    err = _raises("reorg-size-not-divisible", lambda: FORWARD[variant](np.zeros(shape), 2), setting)
    assert "multiple of stride=2" in err.allowed
    _raises("reorg-size-not-divisible", lambda: OUTPUT_SHAPE[variant](shape, 2, False), setting)
    # reverse=1 multiplies the size: any H and W is fine.
    big = (1, 16, shape[2], shape[3])
    assert FORWARD[variant](np.zeros(big), 2, True).shape == (1, 4, 2 * shape[2], 2 * shape[3])


@pytest.mark.parametrize(
    "variant, reverse, delta_shape",
    [
        (REORG3D, False, (1, 6, 2, 2)),
        (REORG3D, True, (1, 4, 3, 4)),
        (OLD, False, (1, 6, 2, 2)),
        (OLD, True, (1, 1, 4, 5)),
    ],
)
def test_error_delta_shape(variant, reverse, delta_shape):
    _raises("reorg-bad-delta-shape", lambda: BACKWARD[variant](np.zeros(delta_shape), 2, reverse), "delta.shape")


def test_error_order():
    _raises("reorg-bad-shape", lambda: reorg3d_forward(np.zeros((2, 2, 2)), 0, "x"))
    _raises("reorg-bad-stride", lambda: reorg3d_forward(np.zeros((1, 1, 3, 2)), 0, "x"))
    _raises("reorg-bad-reverse", lambda: reorg_old_forward(np.zeros((1, 2, 5, 4)), 2, "x"))
    _raises("reorg-old-channels", lambda: reorg_old_forward(np.zeros((1, 2, 5, 4)), 2))
    _raises("reorg-size-not-divisible", lambda: reorg_old_forward(np.zeros((1, 4, 5, 3)), 2), "height")


def test_backward_refuses_what_forward_refuses():
    # The input that this delta would come from has 4 channels: [reorg3d] reverse=1 needs 16.
    _raises("reorg3d-reverse-channels", lambda: reorg3d_backward(np.zeros((1, 1, 4, 4)), 2, True))
    _raises("reorg-old-channels", lambda: reorg_old_backward(np.zeros((1, 8, 2, 2)), 2, False))


# ----------------------------------------------------------------------------------------------------------------
# What Darknet silently does where darkspec refuses (shown on the transcription)


@pytest.mark.parametrize("shape, s", [((1, 2, 5, 4), 2), ((2, 3, 4, 5), 2), ((2, 1, 7, 8), 3)])
def test_reorg3d_indivisible_darknet_reads_flat_prefix(shape, s):
    n, c, h, w = shape
    hh, ww = h // s * s, w // s * s
    x = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
    y = _darknet_layer(REORG3D, x, s, False)
    prefix = x.reshape(-1)[: n * c * hh * ww].reshape(n, c, hh, ww)
    assert np.array_equal(y, _space_to_depth_dcr(prefix, s))
    assert not np.array_equal(y, _space_to_depth_dcr(x[:, :, :hh, :ww], s))  # not a crop


@pytest.mark.parametrize("shape, s", [((1, 2, 5, 4), 2), ((2, 3, 4, 5), 2)])
def test_reorg3d_indivisible_darknet_backward_leaves_tail(shape, s):
    n, c, h, w = shape
    kept = n * c * (h // s * s) * (w // s * s)
    x = np.zeros(shape, dtype=np.float32)
    delta = np.arange(1, n * c * s * s * (h // s) * (w // s) + 1, dtype=np.float32).reshape(
        n, c * s * s, h // s, w // s
    )
    prev = np.full(shape, -7.0, dtype=np.float32)
    _, dx = _darknet_layer(REORG3D, x, s, False, delta, prev)
    flat = dx.reshape(-1)
    assert np.all(flat[kept:] == -7.0) and np.all(flat[:kept] > 0)
    assert np.array_equal(flat[:kept].reshape(n, c, h // s * s, w // s * s), _depth_to_space_dcr(delta, s))


@pytest.mark.parametrize("shape", [(1, 4, 5, 4), (1, 4, 4, 3)])
def test_reorg_old_indivisible_darknet_writes_past_output(shape):
    x = np.ones(shape, dtype=np.float32)
    with pytest.raises(IndexError):
        _darknet_layer(OLD, x, 2, False)


class _Log:
    def __init__(self):
        self.pairs = []

    def __setitem__(self, index, value):
        self.pairs.append((index, value))


class _Identity:
    def __getitem__(self, index):
        return index


def _large_indices(dims, n, s):
    """The large-tensor flat index reorg_cpu pairs with each small-tensor index (the scalar transcription's map)."""
    log = _Log()
    _darknet_reorg_cpu(_Identity(), *dims, n, s, 1, log)  # forward=1: out[large] = x[small]
    return np.array([large for large, _ in log.pairs])


def _is_permutation(indices, size):
    return indices.size == size and indices.max() < size and np.unique(indices).size == size


@pytest.mark.parametrize("s, c", [(2, 20), (2, 24), (3, 90), (3, 100)])
def test_reorg3d_reverse_channels_not_multiple_darknet_is_not_a_permutation(s, c):
    n, h, w = 2, 2, 3
    q = c // (s * s)  # the channels that [reorg3d] reverse=1 hands to reorg_cpu
    assert q % (s * s) != 0
    large = _large_indices((w * s, h * s, q), n, s)
    size = n * q * h * s * w * s  # the output buffer
    counts = np.bincount(large, minlength=size)
    assert counts[:size].min() == 0 and counts.max() >= 2  # some outputs never written, some twice


@pytest.mark.parametrize("s, c", [(2, 17), (2, 35), (3, 83)])
def test_reorg3d_reverse_channels_darknet_reads_flat_prefix(s, c):
    # C/stride**2 is still a multiple of stride**2: a permutation, but of the first N*(C//s**2)*s**2*H*W input elements.
    n, h, w = 2, 1, 2
    q = c // (s * s)
    assert q % (s * s) == 0 and c % s**4 != 0
    x = np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)
    y = _darknet_layer(REORG3D, x, s, True)
    prefix = x.reshape(-1)[: n * q * s * s * h * w].reshape(n, q * s * s, h, w)
    assert np.array_equal(y, reorg3d_forward(prefix, s, reverse=True))


@pytest.mark.parametrize("s, c", [(2, 5), (2, 6), (2, 11), (3, 10), (3, 20)])
def test_reorg_old_channels_not_multiple_darknet_is_not_a_permutation(s, c):
    n = 2
    # reverse=0 gathers: out[small] = x[large]. Some input elements are read twice, others never.
    h, w = s, 2 * s
    reads = _large_indices((w, h, c), n, s)
    counts = np.bincount(reads, minlength=n * c * h * w)
    assert reads.max() < n * c * h * w and counts.min() == 0 and counts.max() >= 2
    # reverse=1 scatters: out[large] = x[small] into N*(C//s**2)*s**2*H*W elements: some twice or past the end.
    for h, w in ((1, 1), (2, 3)):
        writes = _large_indices((w, h, c), n, s)
        size = n * (c // (s * s)) * s * s * h * w
        assert writes.max() >= size or np.unique(writes).size < writes.size
        if writes.max() >= size:
            with pytest.raises(IndexError):
                _darknet_layer(OLD, np.zeros((n, c, h, w), dtype=np.float32), s, True)


def test_darknet_divides_by_zero_below_the_channel_minimum():
    with pytest.raises(ZeroDivisionError):
        _darknet_layer(REORG3D, np.zeros((1, 15, 2, 2), dtype=np.float32), 2, True)
    with pytest.raises(ZeroDivisionError):
        _darknet_layer(OLD, np.zeros((1, 3, 2, 2), dtype=np.float32), 2, True)


# ----------------------------------------------------------------------------------------------------------------
# ONNX oracle: the node test cases that the onnx package ships for SpaceToDepth and DepthToSpace.


def _onnx_node_cases(op_type: str, module: str):
    """The (inputs, outputs, attributes) of the onnx package's node test cases for one operator.

    The ``expect`` calls of ``onnx.backend.test.case.node.<module>`` run when that module is imported and register
    the cases (models and data, built in memory) in the package's list of node test cases; importing just that
    module avoids importing every operator's cases. ``*_expanded`` duplicates (same data) are skipped.
    """
    pytest.importorskip("onnx", reason="the ONNX oracle needs the onnx package (pip install darkspec[oracles])")
    import onnx.helper

    node_pkg = importlib.import_module("onnx.backend.test.case.node")
    importlib.import_module(f"onnx.backend.test.case.node.{module}")
    registry = getattr(node_pkg, "_NodeTestCases", None)
    if registry is None:  # pragma: no cover - an onnx without the in-memory registry
        registry = node_pkg.collect_testcases(op_type)
    cases = []
    for case in registry:
        node = case.model.graph.node[0]
        if node.op_type != op_type or case.name.endswith("_expanded"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"DCR")
        attrs["mode"] = mode.decode() if isinstance(mode, bytes) else mode
        for inputs, outputs in case.data_sets:
            cases.append((case.name, np.asarray(inputs[0]), np.asarray(outputs[0]), attrs))
    assert cases, f"the installed onnx has no node test cases for {op_type}"
    return cases


def test_onnx_space_to_depth_cases():
    cases = _onnx_node_cases("SpaceToDepth", "spacetodepth")
    assert any(attrs["mode"] == "DCR" for _, _, _, attrs in cases)
    for name, x, y, attrs in cases:
        s = attrs["blocksize"]
        ours = reorg3d_forward(x, s)
        if attrs["mode"] == "DCR":
            assert np.array_equal(ours, y), name
        else:  # CRD: the pixel_unshuffle channel order
            assert attrs["mode"] == "CRD"
            assert np.array_equal(ours[:, to_pixel_unshuffle_order(x.shape[1], s)], y), name
            if x.shape[1] > 1:
                assert not np.array_equal(ours, y), name


def test_onnx_depth_to_space_cases():
    cases = _onnx_node_cases("DepthToSpace", "depthtospace")
    modes = {attrs["mode"] for _, _, _, attrs in cases}
    assert "DCR" in modes
    for name, x, y, attrs in cases:
        s = attrs["blocksize"]
        old_reverse = reorg_old_forward(x, s, reverse=True)
        if attrs["mode"] == "DCR":
            assert np.array_equal(old_reverse, y), name
            assert np.array_equal(reorg3d_backward(x, s), y), name  # the inverse of [reorg3d] reverse=0
            assert np.array_equal(reorg3d_forward(y, s), x), name
        else:
            assert attrs["mode"] == "CRD"
            assert not np.array_equal(old_reverse, y), name  # Darknet's old reverse is not CRD
            assert np.array_equal(reorg3d_backward(x[:, to_reorg3d_order(y.shape[1], s)], s), y), name


@pytest.mark.parametrize("shape, s", [((2, 3, 6, 4), 2), ((1, 2, 3, 9), 3), ((1, 5, 4, 4), 4)])
def test_onnx_reference_evaluator_space_to_depth(shape, s):
    pytest.importorskip("onnx", reason="the ONNX oracle needs the onnx package (pip install darkspec[oracles])")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    n, c, h, w = shape
    out = (n, c * s * s, h // s, w // s)
    graph = helper.make_graph(
        [helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=s)],
        "s2d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
    )
    x = _ints(shape, 5, np.float32)
    (y,) = ReferenceEvaluator(helper.make_model(graph)).run(None, {"x": x})
    assert np.array_equal(reorg3d_forward(x, s), y)


# ----------------------------------------------------------------------------------------------------------------
# PyTorch oracle: pixel_unshuffle / pixel_shuffle.


@pytest.mark.parametrize("shape, s", [((2, 3, 4, 6), 2), ((1, 5, 6, 3), 3), ((2, 1, 4, 4), 2), ((1, 2, 8, 4), 4)])
def test_reorg3d_vs_pixel_unshuffle_channel_permutation(shape, s):
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install darkspec[oracles])")
    c = shape[1]
    x = _ints(shape, 11, np.float32)
    pu = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x), s).numpy()
    ours = reorg3d_forward(x, s)
    assert pu.shape == ours.shape
    k = np.arange(c * s * s)
    assert np.array_equal(ours, pu[:, (k % c) * s * s + k // c])
    assert np.array_equal(pu, ours[:, (k % (s * s)) * c + k // (s * s)])
    regrouped = ours.reshape(shape[0], s * s, c, *ours.shape[2:]).transpose(0, 2, 1, 3, 4).reshape(pu.shape)
    assert np.array_equal(pu, regrouped)
    assert np.array_equal(ours, pu[:, to_reorg3d_order(c, s)])
    assert np.array_equal(pu, ours[:, to_pixel_unshuffle_order(c, s)])
    if c > 1:
        assert not np.array_equal(ours, pu)


@pytest.mark.parametrize("shape, s", [((2, 8, 2, 3), 2), ((1, 18, 2, 1), 3), ((1, 4, 2, 2), 2)])
def test_pixel_shuffle_is_crd_not_darknet(shape, s):
    torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch (pip install darkspec[oracles])")
    c_out = shape[1] // (s * s)
    y = _ints(shape, 13, np.float32)
    ps = torch.nn.functional.pixel_shuffle(torch.from_numpy(y), s).numpy()
    assert np.array_equal(ps, _depth_to_space_crd(y, s))
    ours = reorg_old_forward(y, s, reverse=True)  # == reorg3d_backward(y, s): DCR
    assert np.array_equal(ours, reorg3d_backward(y, s))
    # pixel_shuffle of the channels put in pixel_unshuffle order is Darknet's DCR result.
    reordered = torch.from_numpy(np.ascontiguousarray(y[:, to_pixel_unshuffle_order(c_out, s)]))
    assert np.array_equal(torch.nn.functional.pixel_shuffle(reordered, s).numpy(), ours)
    assert np.array_equal(ours, ps) == (c_out == 1)  # the two orders agree only with one output channel
