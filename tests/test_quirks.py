"""The quirks of spec/quirks.md: each off by default, on only by name, a misspelt name refused, the CPU quirks absent
from the darknet-gpu dialect, and the fast-path quirk against the recordings that show Darknet's bug."""

from pathlib import Path

import numpy as np
import pytest

from darkspec.conformance import recordings as rec
from darkspec.errors import DarkspecError
from darkspec.reference import shortcut
from darkspec.reference.dialects import Quirk, parse_quirks
from darkspec.reference.network import parse_network
from darkspec.reference.shortcut import ShortcutParams

from conftest import GOLDEN

RECORDINGS = GOLDEN / "darknet-vectors" / "darknet-alexeyab"
REAL_CFGS = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"

FASTPATH = {"cpu-fastpath-input-dims"}
RELU6_ZERO = {"cpu-relu6-zero"}
UNEVALUATED = {"shortcut-unevaluated-activations"}
NON_PJREDDIE = ["darknet-cpu", "darknet-gpu", "darknet-inference", "exact"]
TRAINING = ["darknet-cpu", "darknet-gpu", "exact"]


def f32(values, shape):
    return np.asarray(values, np.float32).reshape(shape)


# A [shortcut] of 4 channels (1x1) fed by a from layer whose *input* has 4 channels but whose output has 1: the fast
# path is chosen although the from layer is narrower (A = 1 < S = 4), batch 2.
NARROW_X = f32(range(8), (2, 4, 1, 1))
NARROW_FROM = f32([100, 200], (2, 1, 1, 1))
NARROW_FROM_INPUT = [(4, 1, 1)]
NARROW_PRN = [[100, 1, 2, 3], [204, 5, 6, 7]]  # each sample's from element added to its first element

# A [shortcut] of 2 channels fed by a from layer that widens 2 channels to 4 (A = 4 > S = 2), batch 2.
WIDE_X = f32([0, 1, 2, 3], (2, 2, 1, 1))
WIDE_FROM = f32([10, 20, 30, 40, 50, 60, 70, 80], (2, 4, 1, 1))
WIDE_FROM_INPUT = [(2, 1, 1)]
WIDE_PRN = [[10, 21], [52, 63]]  # x + the first 2 channels of the same sample

RELU6 = ShortcutParams(activation="relu6")
RELU6_X = f32([-1, 3, 7, 5], (1, 4, 1, 1))
RELU6_FROM = np.zeros_like(RELU6_X)


def narrow(dialect="darknet-cpu", quirks=frozenset(), **kwargs):
    return shortcut.forward(NARROW_X, [NARROW_FROM], dialect=dialect, quirks=quirks,
                            from_input_shapes=NARROW_FROM_INPUT, **kwargs).reshape(2, 4)


def wide(dialect="darknet-cpu", quirks=frozenset()):
    return shortcut.forward(WIDE_X, [WIDE_FROM], dialect=dialect, quirks=quirks,
                            from_input_shapes=WIDE_FROM_INPUT).reshape(2, 2)


def relu6(dialect="darknet-cpu", quirks=frozenset()):
    return shortcut.forward(RELU6_X, [RELU6_FROM], params=RELU6, dialect=dialect, quirks=quirks).reshape(-1)


def relu6_backward(dialect="darknet-cpu", quirks=frozenset()):
    return shortcut.backward(RELU6_X, [RELU6_FROM], None, np.ones_like(RELU6_X), params=RELU6, dialect=dialect,
                             quirks=quirks)


def code_of(call):
    with pytest.raises(DarkspecError) as raised:
        call()
    return raised.value.code


# --- off by default -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", NON_PJREDDIE)
def test_without_cpu_fastpath_input_dims_the_prn_rule_applies(dialect):
    assert narrow(dialect).tolist() == NARROW_PRN
    assert wide(dialect).tolist() == WIDE_PRN


def test_without_cpu_relu6_zero_relu6_is_computed_in_shortcut():
    assert relu6().tolist() == [0, 3, 6, 5]  # min(max(x, 0), 6)


@pytest.mark.parametrize("name", ["hard_mish", "normalize_channels", "normalize_channels_softmax",
                                  "normalize_channels_softmax_maxval"])
def test_without_shortcut_unevaluated_activations_they_are_refused(name):
    params = ShortcutParams(activation=name)
    assert code_of(lambda: shortcut.forward(RELU6_X, [RELU6_FROM], params=params)) == "activation-not-evaluated"


# --- names ----------------------------------------------------------------------------------------------------


def test_quirks_are_given_by_name_or_by_value():
    assert parse_quirks(["cpu-relu6-zero", Quirk.CPU_FASTPATH_INPUT_DIMS]) == {Quirk.CPU_RELU6_ZERO,
                                                                             Quirk.CPU_FASTPATH_INPUT_DIMS}
    assert relu6(quirks={Quirk.CPU_RELU6_ZERO}).tolist() == relu6(quirks=RELU6_ZERO).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("call", [
    lambda quirks: parse_quirks(quirks),
    lambda quirks: shortcut.forward(RELU6_X, [RELU6_FROM], quirks=quirks),
    lambda quirks: shortcut.backward(RELU6_X, [RELU6_FROM], None, np.ones_like(RELU6_X), quirks=quirks),
    lambda quirks: shortcut.forward(RELU6_X, [RELU6_FROM], dialect="darknet-gpu", quirks=quirks),
], ids=["parse_quirks", "forward", "backward", "forward-darknet-gpu"])
def test_a_misspelt_quirk_is_refused(call):
    assert code_of(lambda: call({"cpu-relu6-zero", "cpu-fastpath"})) == "unknown-quirk"


# --- cpu-fastpath-input-dims ----------------------------------------------------------------------------------


def test_fastpath_adds_the_flat_buffers_and_marks_the_read_past_the_from_buffer_undefined():
    out = narrow(quirks=FASTPATH).reshape(-1)
    assert out[:2].tolist() == [0 + 100, 1 + 200]  # x[j] + from[j], j over the whole batch
    assert np.isnan(out[2:]).all()  # past the from buffer's 2 elements


def test_fastpath_with_a_wider_from_layer_is_right_for_sample_0_only():
    out = wide(quirks=FASTPATH)
    assert out[0].tolist() == WIDE_PRN[0]
    assert out[1].tolist() == [2 + 30, 3 + 40]  # sample 1 adds elements S..2S-1: sample 0's channels 2 and 3


def test_fastpath_with_batch_1_and_a_wider_from_layer_is_right():
    x, add = WIDE_X[:1], WIDE_FROM[:1]
    on = shortcut.forward(x, [add], quirks=FASTPATH, from_input_shapes=WIDE_FROM_INPUT)
    assert np.array_equal(on, shortcut.forward(x, [add]))


@pytest.mark.parametrize("case", ["from-input-shape-not-given", "from-input-shape-differs", "weighted", "two-froms"])
def test_fastpath_needs_one_unweighted_from_whose_input_shape_is_the_shortcuts(case):
    kwargs = dict(quirks=FASTPATH, from_input_shapes=NARROW_FROM_INPUT)
    froms, prn = [NARROW_FROM], NARROW_PRN
    if case == "from-input-shape-not-given":
        kwargs["from_input_shapes"] = None
    elif case == "from-input-shape-differs":
        kwargs["from_input_shapes"] = [(1, 1, 1)]
    elif case == "weighted":  # raw weights of 1 add like no weights
        kwargs.update(weights=np.ones(2, np.float32), params=ShortcutParams(weights_type="per_feature"))
    else:
        froms, prn = [NARROW_FROM, NARROW_FROM], [[200, 1, 2, 3], [404, 5, 6, 7]]
        kwargs["from_input_shapes"] = NARROW_FROM_INPUT * 2
    out = shortcut.forward(NARROW_X, froms, **kwargs)
    assert out.reshape(2, 4).tolist() == prn


def test_fastpath_backward_takes_the_factor_on_the_fast_forward_and_then_follows_the_prn_rule():
    x = f32([1, 2, -50, -60], (2, 2, 1, 1))
    add = f32([1, 2, 30, 40, 100, 100, 100, 100], (2, 4, 1, 1))
    delta = np.ones_like(x)
    params = ShortcutParams(activation="relu")  # sample 1: PRN gives 50, 40 (> 0); the fast path -20, -20 (< 0)
    on = shortcut.backward(x, [add], None, delta, params=params, quirks=FASTPATH, from_input_shapes=WIDE_FROM_INPUT)
    off = shortcut.backward(x, [add], None, delta, params=params, from_input_shapes=WIDE_FROM_INPUT)
    assert on.delta.reshape(2, 2).tolist() == [[1, 1], [0, 0]]
    assert off.delta.reshape(2, 2).tolist() == [[1, 1], [1, 1]]
    assert np.array_equal(on.input_deltas[0], on.delta)
    assert on.input_deltas[1].reshape(2, 4).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]  # d where s < min(S, A)


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-inference", "exact"])
def test_fastpath_applies_in_every_dialect_but_darknet_gpu_and_pjreddie(dialect):
    assert np.isnan(narrow(dialect, FASTPATH)).sum() == 8 - 2  # all outputs but the from buffer's 2 elements


def test_cpu_quirks_are_dropped_in_darknet_gpu():
    assert narrow("darknet-gpu", FASTPATH).tolist() == NARROW_PRN
    assert wide("darknet-gpu", FASTPATH | RELU6_ZERO).tolist() == WIDE_PRN
    assert relu6("darknet-gpu", RELU6_ZERO | FASTPATH).tolist() == [0, 3, 6, 5]
    assert relu6_backward("darknet-gpu", RELU6_ZERO).delta.reshape(-1).tolist() == [0, 1, 0, 1]


def test_pjreddie_ignores_the_fastpath_quirk():
    def run(quirks):
        return shortcut.forward(NARROW_X, [NARROW_FROM], dialect="pjreddie", quirks=quirks,
                                from_input_shapes=NARROW_FROM_INPUT)

    assert np.array_equal(run(FASTPATH), run(frozenset()))


# --- the recordings of the fast path --------------------------------------------------------------------------


def recorded_case(name):
    recording = rec.load_recording(RECORDINGS / f"{name}.npz")
    net = parse_network(recording.cfg)
    layer = net.layers[-1]
    from_input_shapes = [net.layers[i].input_shape for i in layer.op.from_layers]
    kwargs = dict(params=layer.op.params, quirks=FASTPATH, from_input_shapes=from_input_shapes)
    return recording.arrays, kwargs


def test_fastpath_reproduces_recording_fastpath_from_fewer_channels():
    a, kwargs = recorded_case("fastpath_from_fewer_channels")
    assert kwargs["from_input_shapes"] == [(4, 2, 2)] and a["from0"].shape == (1, 1, 2, 2)
    out = shortcut.forward(a["x"], [a["from0"]], **kwargs)
    undefined = np.isnan(out).reshape(-1)
    assert undefined.tolist() == [False] * 4 + [True] * 12  # past the from buffer's 4 elements
    assert np.array_equal(out.reshape(-1)[:4], a["output"].reshape(-1)[:4])
    # What Darknet read there is heap memory: one value near -1.8e36, and a rerun with a perturbed heap differs.
    read_past = a["output"].reshape(-1)[undefined]
    assert -1.9e36 < read_past.min() < -1.7e36
    perturbed = a["perturbed__output"]
    assert np.array_equal(perturbed[:4], a["output"].reshape(-1)[:4])
    assert (perturbed[undefined] != read_past).any()

    grads = shortcut.backward(a["x"], [a["from0"]], None, a["delta"], **kwargs)
    assert np.array_equal(grads.delta, a["delta_after_gradient"])  # linear: factor 1, NaN or not
    assert np.array_equal(a["dx_init"] + grads.input_deltas[0], a["dx"])
    assert np.array_equal(a["dfrom0_init"] + grads.input_deltas[1], a["dfrom0"])


def test_fastpath_reproduces_recording_fastpath_equal_shapes():
    a, kwargs = recorded_case("fastpath_equal_shapes")
    assert kwargs["from_input_shapes"] == [a["x"].shape[1:]] and a["x"].shape[0] == 2
    out = shortcut.forward(a["x"], [a["from0"]], **kwargs)
    assert np.array_equal(out, a["output"])  # one addition and leaky's one product: no rounding to differ on
    assert np.array_equal(out, shortcut.forward(a["x"], [a["from0"]], params=kwargs["params"]))  # well defined
    grads = shortcut.backward(a["x"], [a["from0"]], None, a["delta"], **kwargs)
    assert np.array_equal(grads.delta, a["delta_after_gradient"])
    assert np.array_equal(a["dx_init"] + grads.input_deltas[0], a["dx"])
    assert np.array_equal(a["dfrom0_init"] + grads.input_deltas[1], a["dfrom0"])


@pytest.mark.skipif(not REAL_CFGS.is_dir(), reason="the shared real-cfg folder is not beside the project")
def test_yolov3_tiny_prn_shortcuts_22_and_25_take_the_fast_path_and_are_wrong_from_sample_1():
    net = parse_network((REAL_CFGS / "yolov3-tiny-prn.cfg").read_text())
    fast = [layer for layer in net.layers if layer.type == "shortcut" and len(layer.shortcut.from_layers) == 1
            and net.layers[layer.shortcut.from_layers[0]].input_shape == layer.input_shape]
    assert [(layer.index, layer.shortcut.from_layers) for layer in fast] == [(22, (8,)), (25, (8,))]
    source = net.layers[8]
    assert fast[0].input_shape == source.input_shape == (128, 26, 26) and source.output_shape == (256, 26, 26)

    rng = np.random.default_rng(0)
    x = rng.integers(-8, 8, (2, *fast[0].input_shape)).astype(np.float32)
    add = rng.integers(-8, 8, (2, *source.output_shape)).astype(np.float32)
    on = shortcut.forward(x, [add], quirks=FASTPATH, from_input_shapes=[source.input_shape])
    off = shortcut.forward(x, [add])
    assert np.array_equal(on[0], off[0])
    assert not np.array_equal(on[1], off[1])
    assert np.array_equal(on[1], x[1] + add[0, 128:])  # sample 1 adds sample 0's channels 128..255


# --- cpu-relu6-zero -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-inference", "exact"])
def test_cpu_relu6_zero_gives_zero(dialect):
    assert relu6(dialect, RELU6_ZERO).tolist() == [0, 0, 0, 0]


def test_cpu_relu6_zero_backward_factor_is_zero_in_darknet_cpu():
    grads = relu6_backward("darknet-cpu", RELU6_ZERO)
    assert not grads.delta.any()
    assert not any(d.any() for d in grads.input_deltas)


# --- shortcut-unevaluated-activations -------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-gpu"])
def test_hard_mish_gives_zero_and_a_zero_backward_factor_in_the_darknet_dialects(dialect):
    params = ShortcutParams(activation="hard_mish")
    out = shortcut.forward(RELU6_X, [RELU6_FROM], params=params, dialect=dialect, quirks=UNEVALUATED)
    grads = shortcut.backward(RELU6_X, [RELU6_FROM], None, np.ones_like(RELU6_X), params=params, dialect=dialect,
                              quirks=UNEVALUATED)
    assert not out.any() and not grads.delta.any()


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-gpu"])
@pytest.mark.parametrize("name", ["normalize_channels", "normalize_channels_softmax",
                                  "normalize_channels_softmax_maxval"])
def test_normalize_channels_give_zero_and_their_backward_is_refused_in_the_darknet_dialects(name, dialect):
    params = ShortcutParams(activation=name)
    out = shortcut.forward(RELU6_X, [RELU6_FROM], params=params, dialect=dialect, quirks=UNEVALUATED)
    assert not out.any()
    assert code_of(lambda: shortcut.backward(RELU6_X, [RELU6_FROM], None, np.ones_like(RELU6_X), params=params,
                                             dialect=dialect, quirks=UNEVALUATED)) == "activation-gradient-aborts"


# --- the GPU weight gradient where a warp straddles the end of a from layer ------------------------------------


def test_darknet_gpu_weight_gradient_sums_every_term_of_a_from_layer_shorter_than_the_output():
    """S = 45, A = 27: Darknet's first warp (s = 0..31) straddles s = A; the reference sums every term s < A."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 3, 3)).astype(np.float32)
    add = rng.standard_normal((1, 3, 3, 3)).astype(np.float32)
    delta = rng.standard_normal(x.shape).astype(np.float32)
    weights = np.array([1.0, 2.0], np.float32)
    params = ShortcutParams(weights_type="per_feature", weights_normalization="relu")
    grads = shortcut.backward(x, [add], weights, delta, params=params, dialect="darknet-gpu")
    what = weights.astype(np.float64) / (1e-4 + weights.sum())
    d = delta.reshape(-1).astype(np.float64)
    expected = [(d * x.reshape(-1)).sum() * what[0], (d[:27] * add.reshape(-1)).sum() * what[1]]  # relu: times what
    np.testing.assert_allclose(grads.weight_updates, expected, rtol=1e-6)


@pytest.mark.parametrize("activation, quirk", [("relu6", "cpu-relu6-zero"),
                                               ("hard_mish", "shortcut-unevaluated-activations")])
def test_a_zeroing_quirk_zeroes_the_exact_gradient_too(activation, quirk):
    """exact is the derivative of what the forward computed: a quirk that makes the output 0 makes it 0."""
    x = np.array([-1.0, 0.5, 3.0, 7.0], np.float64).reshape(1, 1, 2, 2)
    params = ShortcutParams(activation=activation)
    grads = shortcut.backward(x, [], None, np.ones_like(x), params, "exact", quirks={quirk})
    assert not grads.delta.any() and not grads.input_deltas[0].any()
