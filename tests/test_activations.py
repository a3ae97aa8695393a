"""Darknet's activations: reference/activations.py against calculus, against itself and against real Darknet.

spec/activations.md names these tests as the evidence for its statements.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from darkspec.conformance.recordings import CRASH_AFTER_FORWARD, load_recording
from darkspec.errors import DarkspecError
from darkspec.reference.activations import (
    ALEXEYAB_NAMES,
    GRADIENT_ABORTS,
    HANKAI_NAMES,
    PJREDDIE_NAMES,
    SHORTCUT_UNEVALUATED,
    activate,
    check_name,
    darknet_gradient,
    derivative,
)
from darkspec.reference.dialects import Quirk

RECORDINGS = Path(__file__).resolve().parents[1] / "golden" / "darknet-vectors"

NORMALIZE = ("normalize_channels", "normalize_channels_softmax", "normalize_channels_softmax_maxval")
ELEMENTWISE = tuple(name for name in ALEXEYAB_NAMES if name not in NORMALIZE)

#: Where Darknet's gradient is not the derivative, on its CPU and on its GPU.
NOT_DERIVATIVE = {False: {"gelu"}, True: {"gelu", "revleaky"}}

#: The points where each activation's derivative jumps (stair: every integer).
KINKS = {
    "leaky": (0,), "revleaky": (0,), "relu": (0,), "relu6": (0, 6), "elu": (0,), "selu": (0,), "relie": (0,),
    "ramp": (0,), "plse": (-4, 4), "hardtan": (-1, 1), "lhtan": (0, 1), "hard_mish": (-2, 0),
    "stair": tuple(range(-20, 21)),
}

#: Which argument Darknet's gradient reads: the output y, the pre-activation x, both, or neither.
GRADIENT_READS = {name: "y" for name in ELEMENTWISE} | {
    "linear": "neither", "swish": "both", "mish": "x", "hard_mish": "x",
}

X_RANGE = st.floats(-20, 20)
#: Multiples of 1/64 in [-20, 20]: every kink above is on this grid, and no point off a kink is close to one.
X_GRID = st.integers(-20 * 64, 20 * 64).map(lambda m: m / 64)


def _arrays(dtype, elements):
    return hnp.arrays(dtype, st.integers(1, 16), elements=elements)


# --- calculus -----------------------------------------------------------------------------------------------------
# The property tests loop over the names inside one example: drawing the example is what costs time.


@given(x=_arrays(np.float64, X_RANGE))
def test_derivative_matches_finite_differences(x):
    for name in ELEMENTWISE:
        # Away from the kinks by far more than the step; there a central difference is good to ~1e-10.
        smooth = x[np.all(np.abs(x[:, None] - np.array(KINKS.get(name, (np.inf,)))) > 1e-3, axis=1)]
        h = 1e-6 * np.maximum(1, np.abs(smooth))
        step = (smooth + h) - (smooth - h)
        slope = (activate(name, smooth + h) - activate(name, smooth - h)) / step
        np.testing.assert_allclose(derivative(name, smooth), slope, rtol=1e-7, atol=1e-9, err_msg=name)


@given(x=_arrays(np.float64, X_GRID))
def test_darknet_gradient_is_derivative(x):
    for gpu in (False, True):
        for name in (n for n in ELEMENTWISE if n not in NOT_DERIVATIVE[gpu]):
            at = np.concatenate([x, KINKS.get(name, ())])  # at a kink: derivative() takes Darknet's value
            gradient = darknet_gradient(name, activate(name, at), at, gpu=gpu)
            # atol: a gradient of y (1 - y, 1 - y^2, ...) inherits y's float64 rounding, ~1e-16, as an absolute error.
            np.testing.assert_allclose(gradient, derivative(name, at), rtol=1e-9, atol=1e-12, err_msg=f"{name} {gpu=}")


@pytest.mark.parametrize(
    "name, x, value",
    [
        ("leaky", 0, 0.1), ("revleaky", 0, 0.1), ("relu", 0, 0), ("relu6", 0, 0), ("relu6", 6, 0), ("elu", 0, 1),
        ("selu", 0, 1.0507), ("relie", 0, 0.01), ("ramp", 0, 0.1), ("plse", -4, 0.125), ("plse", 4, 0.125),
        ("hardtan", -1, 0), ("hardtan", 1, 0), ("lhtan", 0, 0.001), ("lhtan", 1, 0.001), ("stair", -1, 0),
        ("stair", 0, 0), ("stair", 1, 0), ("stair", 2, 0), ("hard_mish", -2, 0), ("hard_mish", 0, 1),
    ],
)
def test_derivative_at_kinks(name, x, value):
    x = np.float64(x)
    assert derivative(name, x) == value
    assert darknet_gradient(name, activate(name, x), x) == value


def test_gelu_gradient_is_not_derivative():
    x = np.array([-3.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    y = activate("gelu", x)
    gradient = darknet_gradient("gelu", y, x)
    # It is the derivative evaluated at the output (its constant 0.0356774 for 0.035677 costs < 1e-6) ...
    np.testing.assert_allclose(gradient, derivative("gelu", y), rtol=1e-6)
    # ... which is not the derivative at the input: at x = -1 not even its sign.
    assert not np.any(np.isclose(gradient, derivative("gelu", x), rtol=1e-3))
    assert derivative("gelu", -1.0) < 0 < darknet_gradient("gelu", activate("gelu", -1.0), -1.0)
    # They agree where y = x: at 0, and where gelu has become the identity.
    for x in (0.0, 10.0):
        assert darknet_gradient("gelu", activate("gelu", x), x) == derivative("gelu", x)


@given(delta=st.floats(-1e3, 1e3, width=32), x=st.floats(-1e3, 1e3, width=32))
def test_revleaky_gpu_gradient_divides(delta, x):
    x = np.float32(x)
    y = activate("revleaky", x)
    expected_cpu = np.float32(1 if x > 0 else 0.1)
    assert darknet_gradient("revleaky", y, x) == expected_cpu
    factor = darknet_gradient("revleaky", y, x, gpu=True)
    assert factor == (1 if x > 0 else 10)
    # The GPU divides the delta by the CPU factor; multiplying by 1 / 0.1 is that, up to the product's last bit.
    divided = np.float32(delta) / expected_cpu
    assert abs(np.float32(delta) * factor - divided) <= np.spacing(abs(divided))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_gradient_argument(name):
    x = np.linspace(-8, 8, 65)  # every piece of every activation
    y = activate(name, x)
    gradient = darknet_gradient(name, y, x)
    nan = np.full_like(x, np.nan)
    with np.errstate(invalid="ignore"):
        reads_y = not np.array_equal(darknet_gradient(name, nan, x), gradient, equal_nan=True)
        reads_x = not np.array_equal(darknet_gradient(name, y, nan), gradient, equal_nan=True)
    reads = {(True, False): "y", (False, True): "x", (True, True): "both", (False, False): "neither"}
    assert reads[reads_y, reads_x] == GRADIENT_READS[name]


def test_extreme_inputs_stay_finite():
    x = np.array([-1e4, -800.0, -100.0, -30.0, 30.0, 100.0, 800.0, 1e4])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for name in ELEMENTWISE:
            y = activate(name, x)
            assert np.all(np.isfinite(y)), name
            assert np.all(np.isfinite(derivative(name, x))), name
            assert np.all(np.isfinite(darknet_gradient(name, y, x))), name
    # Where Darknet's float32 (elu, selu) or double (pjreddie's tanh) arithmetic overflows to NaN.
    assert activate("elu", 100.0) == 100.0
    assert activate("selu", 100.0) == 105.07
    assert activate("tanh", 400.0) == 1.0


def test_pjreddie_loggy_and_tanh_are_its_own_expressions():
    tiny = np.float32(1.0747393e-14)
    e = np.exp(2.0 * np.float64(tiny))
    assert activate("tanh", tiny, "pjreddie") == np.float32((e - 1) / (e + 1))
    assert activate("tanh", tiny, "pjreddie") != activate("tanh", tiny)  # the cancellation pjreddie's results show
    assert activate("loggy", tiny, "pjreddie") == np.float32(2 / (1 + np.exp(-np.float64(tiny))) - 1)
    assert np.isnan(activate("tanh", np.float32(400.0), "pjreddie"))
    x = np.linspace(-3, 3, 13, dtype=np.float32)
    for name in ("loggy", "tanh"):
        np.testing.assert_allclose(activate(name, x, "pjreddie"), activate(name, x), rtol=1e-6, atol=1e-7)


def test_stair_rounds_as_darknet_does():
    """Found live against pjreddie's Darknet: x - floor(x) is rounded in float32 before floor(x/2) is added."""
    x = np.array([-2.1494786e-14, -2.5, 0.75, 3.25], np.float32)
    assert activate("stair", x).tolist() == [0.0, -1.5, 0.0, 1.25]
    assert activate("stair", x.astype(np.float64))[0] != 0  # in double, 1 - 2.1e-14 is not rounded to 1


# --- dtypes -------------------------------------------------------------------------------------------------------


@given(x=_arrays(np.float32, st.floats(-30, 30, width=32)))
def test_float32_is_float64_rounded_once(x):
    for name in ELEMENTWISE:
        y = activate(name, x)
        results = {
            "activate": (y, activate(name, x.astype(np.float64))),
            "derivative": (derivative(name, x), derivative(name, x.astype(np.float64))),
            "darknet_gradient": (darknet_gradient(name, y, x), darknet_gradient(name, y.astype(np.float64), x)),
        }
        if name == "stair":  # evaluated in the input's dtype, as Darknet does (test_stair_rounds_as_darknet_does)
            del results["activate"]
        for function, (single, double) in results.items():
            assert single.dtype == np.float32 and double.dtype == np.float64
            assert single.shape == x.shape
            np.testing.assert_array_equal(single, double.astype(np.float32), err_msg=f"{function} {name}")


def test_other_inputs_come_back_as_float64():
    assert activate("relu", [1, -2]).dtype == np.float64
    assert derivative("tanh", 0.5).dtype == np.float64
    assert activate("leaky", np.float16(-1)).dtype == np.float64


# --- names --------------------------------------------------------------------------------------------------------


def test_library_name_tables():
    assert len(set(ALEXEYAB_NAMES)) == len(ALEXEYAB_NAMES) == 23
    assert len(set(PJREDDIE_NAMES)) == len(PJREDDIE_NAMES) == 14
    assert set(HANKAI_NAMES) == set(ALEXEYAB_NAMES)
    assert set(ALEXEYAB_NAMES) - set(PJREDDIE_NAMES) == {
        "revleaky", "relu6", "gelu", "swish", "mish", "hard_mish", *NORMALIZE
    }


@pytest.mark.parametrize(
    "library, names", [("alexeyab", ALEXEYAB_NAMES), ("pjreddie", PJREDDIE_NAMES), ("hank-ai", HANKAI_NAMES)]
)
def test_check_name_per_library(library, names):
    for name in names:
        assert check_name(name, library) == name
    for name in sorted(set(ALEXEYAB_NAMES) - set(names)) + ["lineer", "ReLU", ""]:
        with pytest.raises(DarkspecError) as error:
            check_name(name, library)
        assert (error.value.setting, error.value.value, error.value.code) == ("activation", name, "unknown-activation")
        assert error.value.allowed == ", ".join(names)


def test_check_name_unknown_library():
    with pytest.raises(DarkspecError) as error:
        check_name("relu", "darknet")
    assert error.value.code == "unknown-library"
    assert error.value.allowed == "alexeyab, pjreddie, hank-ai"


@pytest.mark.parametrize(
    "call",
    [
        lambda name: activate(name, 1.0),
        lambda name: derivative(name, 1.0),
        lambda name: darknet_gradient(name, 1.0, 1.0),
        lambda name: darknet_gradient(name, 1.0, 1.0, gpu=True),
    ],
)
@pytest.mark.parametrize("name", ["lineer", "ReLU", "", None])
def test_unknown_name_is_refused(call, name):
    with pytest.raises(DarkspecError) as error:
        call(name)
    assert (error.value.setting, error.value.value, error.value.code) == ("activation", name, "unknown-activation")
    assert error.value.allowed == ", ".join(ALEXEYAB_NAMES)
    assert "activation" in str(error.value) and repr(name) in str(error.value)


@pytest.mark.parametrize("name", NORMALIZE)
def test_normalize_channels_have_no_elementwise_form(name):
    for function in (activate, derivative):
        with pytest.raises(DarkspecError) as error:
            function(name, 1.0)
        assert error.value.code == "activation-not-elementwise"
    for gpu in (False, True):
        with pytest.raises(DarkspecError) as error:
            darknet_gradient(name, 1.0, 1.0, gpu=gpu)
        assert error.value.code == "activation-gradient-aborts"


def test_shortcut_name_sets():
    assert SHORTCUT_UNEVALUATED == {"hard_mish", *NORMALIZE}
    assert GRADIENT_ABORTS == set(NORMALIZE)
    assert Quirk("cpu-relu6-zero") and Quirk("shortcut-unevaluated-activations")


# --- real Darknet -------------------------------------------------------------------------------------------------

#: Recordings whose pre-activation is exactly x + from0 (+ from1), added in float32 in that order: no weights,
#: alpha = beta = 1, equal shapes (_pre_activation checks this).
SUMMED = [
    "darknet-alexeyab/act_relu", "darknet-alexeyab/act_swish", "darknet-alexeyab/bad_activation_typo",
    "darknet-pjreddie/pj_act_hardtan", "darknet-pjreddie/pj_act_lhtan", "darknet-pjreddie/pj_act_loggy",
    "darknet-pjreddie/pj_act_ramp", "darknet-pjreddie/pj_act_relie", "darknet-pjreddie/pj_act_tanh",
    "darknet-pjreddie/pj_bad_activation_typo", "darknet-pjreddie/pj_equal_abs_index_logistic",
    "darknet-pjreddie/pj_equal_leaky_b2", "darknet-pjreddie/pj_equal_linear",
]

#: Forward, in float32 ulps of the recorded output. pjreddie computes in double and rounds once, as darkspec does:
#: at most the 1 ulp by which two roundings of nearly the same value can differ. AlexeyAB computes in float32, swish
#: four roundings deep (expf, 1 + e, the division, the product), each at most half an ulp, plus darkspec's own.
FORWARD_ULPS = {"pjreddie": 1, "alexeyab": 3}
#: delta * factor, in float32 ulps of |delta| * max(1, |y|). Darknet computes the factor in float32 as a difference
#: of terms no larger than max(1, |y|) (1 - y*y, 2 (1 - t) t, y + s (1 - y)), so its error is absolute at that scale,
#: not relative to the factor (test_recorded_gradients_are_float32_expressions); 1 ulp for that, 1 for the products.
GRADIENT_ULPS = 2


def _recording(case):
    return load_recording(RECORDINGS / f"{case}.npz")


def _pre_activation(recording):
    arrays = recording.arrays
    assert arrays.get("weights", np.empty(0)).size == 0
    assert recording.params.get("alpha", 1) == recording.params.get("beta", 1) == 1
    pre = arrays["x"]
    for i in range(len(recording.params["from_abs"])):
        assert arrays[f"from{i}"].shape == pre.shape
        pre = pre + arrays[f"from{i}"]
    return pre


def _ulps(ours, recorded, scale):
    """|ours - recorded| in float32 ulps at the magnitude |scale|."""
    spacing = np.spacing(np.abs(scale).astype(np.float32)).astype(np.float64)
    return np.abs(ours.astype(np.float64) - recorded.astype(np.float64)) / spacing


@pytest.mark.parametrize("case", SUMMED)
def test_matches_darknet_recordings(case):
    recording = _recording(case)
    arrays = recording.arrays
    name = recording.params["activation"]
    pre = _pre_activation(recording)
    out = activate(name, pre)
    assert out.dtype == np.float32
    assert _ulps(out, arrays["output"], arrays["output"]).max() <= FORWARD_ULPS[recording.library]
    y = arrays["output"]  # Darknet's backward reads its own output
    delta = arrays["delta"]
    ours = delta * darknet_gradient(name, y, pre)
    assert _ulps(ours, arrays["delta_after_gradient"], delta * np.maximum(1, np.abs(y))).max() <= GRADIENT_ULPS


def _pjreddie_loggy_float32(y, arrays):
    t = ((y.astype(np.float64) + 1) / 2).astype(np.float32)  # (y + 1.) / 2. in double, kept in a float
    return np.float32(2) * (np.float32(1) - t) * t


#: Darknet's factor evaluated as Darknet does: in float32, in its order. swish reads the sigmoid its forward kept.
FLOAT32_FACTORS = {
    "darknet-pjreddie/pj_act_tanh": lambda y, arrays: np.float32(1) - y * y,
    "darknet-pjreddie/pj_act_loggy": _pjreddie_loggy_float32,
    "darknet-alexeyab/act_swish": lambda y, arrays: y + arrays["activation_input"] * (np.float32(1) - y),
}


@pytest.mark.parametrize("case", sorted(FLOAT32_FACTORS))
def test_recorded_gradients_are_float32_expressions(case):
    arrays = _recording(case).arrays
    factor = FLOAT32_FACTORS[case](arrays["output"], arrays)
    np.testing.assert_array_equal(arrays["delta"] * factor, arrays["delta_after_gradient"])
    if case.endswith("pj_act_tanh"):
        # 1 - y*y near |y| = 1 cancels: measured against the result itself the error is hundreds of ulps.
        pre = _pre_activation(_recording(case))
        ours = arrays["delta"] * darknet_gradient("tanh", arrays["output"], pre)
        assert _ulps(ours, arrays["delta_after_gradient"], arrays["delta_after_gradient"]).max() > 100


@pytest.mark.parametrize("case", ["darknet-alexeyab/bad_activation_typo", "darknet-pjreddie/pj_bad_activation_typo"])
def test_darknet_uses_relu_for_unknown_names(case):
    recording = _recording(case)
    written = re.findall(r"^activation=(\S+)", recording.cfg, re.M)[-1]
    assert (written, recording.params["activation"]) == ("lineer", "relu")
    np.testing.assert_array_equal(recording.arrays["output"], activate("relu", _pre_activation(recording)))
    with pytest.raises(DarkspecError, match="lineer"):
        check_name(written, recording.library)


def _sum_somewhere_above(arrays, bound):
    """Whether the weighted sum exceeds ``bound`` (<= 0) somewhere. These cases weight their inputs by softmax-
    normalized weights, a normalization this file does not replay; but those weights are positive and add up to just
    under 1, so where all three inputs exceed such a bound, so does the sum."""
    return np.any(np.minimum(np.minimum(arrays["x"], arrays["from0"]), arrays["from1"]) > bound)


def test_relu6_is_zero_in_alexeyab_cpu_shortcut():
    arrays = _recording("darknet-alexeyab/act_relu6").arrays
    # relu6 of a positive sum is positive; AlexeyAB's CPU activate() has no relu6 case and gives 0 everywhere.
    assert _sum_somewhere_above(arrays, 0)
    assert not np.any(arrays["output"])
    # Its gradient is right: relu6's gradient of the output 0 is 0 (relu6's gradient reads y only).
    unused_x = np.full_like(arrays["output"], np.nan)
    gradient = darknet_gradient("relu6", arrays["output"], unused_x)
    np.testing.assert_array_equal(arrays["delta_after_gradient"], arrays["delta"] * gradient)


@pytest.mark.parametrize(
    "case, bound",
    # Above the bound the activation is not 0 (hard_mish vanishes on (-2, inf) only at 0; normalize_channels* of a
    # positive value are positive), yet Darknet's output is 0 everywhere.
    [("act_hard_mish", -2), ("act_normalize_channels", 0), ("act_normalize_channels_softmax_maxval", 0)],
)
def test_shortcut_unevaluated_activations_give_zero(case, bound):
    recording = _recording(f"darknet-alexeyab/{case}")
    arrays = recording.arrays
    assert recording.params["activation"] in SHORTCUT_UNEVALUATED
    assert _sum_somewhere_above(arrays, bound) and not np.any(arrays["output"])
    if "delta_after_gradient" in arrays:  # hard_mish: the backward's factor is 0 too
        assert np.all(arrays["delta"] != 0) and not np.any(arrays["delta_after_gradient"])


@pytest.mark.parametrize("case", ["act_normalize_channels", "act_normalize_channels_softmax_maxval"])
def test_normalize_channels_backward_aborts(case):
    recording = _recording(f"darknet-alexeyab/{case}")
    assert recording.params["activation"] in GRADIENT_ABORTS
    assert recording.status == CRASH_AFTER_FORWARD
    assert recording.params["run"]["stages_completed"][-1] == "stage_forward_done"
    assert "gradient()" in recording.params["run"]["stderr_tail"]
