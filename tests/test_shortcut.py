"""The [shortcut] reference against the statements of spec/shortcut.md."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from darkspec.conformance.strategies import shortcut_cases, values
from darkspec.errors import DarkspecError
from darkspec.reference import shortcut
from darkspec.reference.dialects import Dialect
from darkspec.reference.shortcut import Normalization, ShortcutParams, UpdateParams, WeightsType

PER_CHANNEL_SOFTMAX = ShortcutParams(weights_type="per_channel", weights_normalization="softmax")


def pad_slice_sum(x, froms, what):
    """The PRN rule written channel by channel: each input adds into the first min(C, C_i) channels."""
    channels = x.shape[1]
    out = x * what[0].reshape(1, -1, 1, 1) if what is not None else x.copy()
    for i, add in enumerate(froms, start=1):
        c = min(channels, add.shape[1])
        term = add[:, :c] * what[i][:c].reshape(1, -1, 1, 1) if what is not None else add[:, :c]
        out[:, :c] += term
    return out


# --- weights ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_type, expected", [("none", 0), ("per_feature", 3), ("per_channel", 15)])
def test_weight_count_is_slots_times_per_input(weights_type, expected):
    assert shortcut.weight_count(weights_type, n_from=2, channels=5) == expected


def test_initial_weights_are_exactly_one():
    assert np.array_equal(shortcut.initial_weights("per_channel", 2, 4), np.ones(12, np.float32))


def test_weight_layout_is_slot_major():
    """Flat index slot * L + k: slot 0 is the previous layer, then the from layers in cfg order."""
    x = np.zeros((1, 2, 1, 1), np.float32)
    froms = [np.ones((1, 2, 1, 1), np.float32), 2 * np.ones((1, 2, 1, 1), np.float32)]
    weights = np.array([0, 0, 10, 20, 100, 200], np.float32)
    params = ShortcutParams(weights_type="per_channel")
    out = shortcut.forward(x, froms, weights, params)
    assert out.reshape(-1).tolist() == [1 * 10 + 2 * 100, 1 * 20 + 2 * 200]


# --- normalization ----------------------------------------------------------------------------------------


def test_softmax_eps_is_added_after_the_max_subtraction():
    """exp(w - m) / (eps + sum exp(w - m)): with m = 50 the eps still weighs against exp(0) = 1, not exp(50)."""
    table = np.array([[50.0], [50.0]], np.float64)
    what = shortcut.normalize_weights(table, Normalization.SOFTMAX, relu_floor=None)
    assert np.array_equal(what, np.full((2, 1), 1.0 / ((1e-4 + 1.0) + 1.0)))


@given(st.data())
def test_softmax_is_invariant_to_a_constant_shift(data):
    table = data.draw(values(np.float64, (3, 2), bound=20))
    shift = data.draw(st.integers(-30, 30))
    a = shortcut.normalize_weights(table, Normalization.SOFTMAX, relu_floor=None)
    b = shortcut.normalize_weights(table + shift, Normalization.SOFTMAX, relu_floor=None)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)


@given(st.data())
def test_relu_normalized_weights_sum_to_at_most_one(data):
    table = data.draw(values(np.float32, (4, 3)))
    for floor in (None, shortcut.RELU_FLOOR):
        what = shortcut.normalize_weights(table, Normalization.RELU, relu_floor=floor)
        assert np.all(what >= 0)
        assert np.all(what.astype(np.float64).sum(axis=0) <= 1 + 4 * np.finfo(np.float32).eps)


def test_relu_floor_only_in_gpu_and_inference():
    """CPU: a weight <= 0 contributes 0. GPU and folded inference: it is clamped up to 0.001."""
    x = np.ones((1, 1, 1, 1), np.float32)
    froms = [np.ones((1, 1, 1, 1), np.float32)]
    weights = np.array([-1.0, 1.0], np.float32)
    params = ShortcutParams(weights_type="per_feature", weights_normalization="relu")
    cpu = shortcut.forward(x, froms, weights, params, Dialect.DARKNET_CPU)
    gpu = shortcut.forward(x, froms, weights, params, Dialect.DARKNET_GPU)
    inference = shortcut.forward(x, froms, weights, params, Dialect.DARKNET_INFERENCE)
    assert cpu.item() == np.float32(1) / (np.float32(1e-4) + np.float32(1))
    expected = (np.float32(1e-3) + np.float32(1)) / (np.float32(1e-4) + np.float32(1e-3) + np.float32(1))
    assert gpu.item() == pytest.approx(expected, rel=1e-6)
    assert inference.item() == pytest.approx(expected, rel=1e-6)


def test_folded_weights_replace_the_normalization():
    weights = np.array([0.5, -2.0, 3.0], np.float32)
    params = ShortcutParams(weights_type="per_feature", weights_normalization="softmax")
    folded = shortcut.fold_weights(weights, params, n_from=2)
    raw = ShortcutParams(weights_type="per_feature", weights_normalization="none")
    x, froms = np.full((1, 1, 2, 2), 2, np.float32), [np.ones((1, 1, 2, 2), np.float32)] * 2
    assert np.array_equal(shortcut.forward(x, froms, weights, params, Dialect.DARKNET_INFERENCE),
                          shortcut.forward(x, froms, folded, raw, Dialect.DARKNET_CPU))


# --- forward properties -------------------------------------------------------------------------------------


@given(values(np.float32, (2, 3, 2, 2)))
def test_without_from_inputs_the_output_is_the_activation_of_the_input(x):
    out = shortcut.forward(x, [], None, ShortcutParams(activation="leaky"))
    assert np.array_equal(out, np.where(x > 0, x, (0.1 * x.astype(np.float64)).astype(np.float32)))


@given(shortcut_cases(same_channels=False))
def test_flat_prn_rule_equals_first_channels_for_equal_spatial_sizes(case):
    dialect = Dialect.DARKNET_CPU
    what = None
    if case.weights is not None:
        table = case.weights.reshape(len(case.froms) + 1, -1)
        what = shortcut.normalize_weights(table, case.params.weights_normalization, relu_floor=None)
        what = np.broadcast_to(what, (what.shape[0], case.x.shape[1])) if what.shape[1] == 1 else what
    out = shortcut.forward(case.x, case.froms, case.weights, case.params, dialect)
    np.testing.assert_array_equal(out, pad_slice_sum(case.x, case.froms, what))


@given(shortcut_cases(weights_type=WeightsType.PER_FEATURE, dtype=np.float64))
def test_per_feature_equals_per_channel_with_repeated_weights(case):
    channels = case.x.shape[1]
    repeated = np.repeat(case.weights, channels)
    per_channel = ShortcutParams(weights_type="per_channel",
                                 weights_normalization=case.params.weights_normalization)
    a = shortcut.forward(case.x, case.froms, case.weights, case.params)
    b = shortcut.forward(case.x, case.froms, repeated, per_channel)
    np.testing.assert_array_equal(a, b)


@given(shortcut_cases(dtype=np.float64, max_from=3), st.randoms(use_true_random=False))
def test_permuting_inputs_with_their_weights_changes_nothing(case, random):
    order = list(range(len(case.froms)))
    random.shuffle(order)
    froms = [case.froms[i] for i in order]
    weights = case.weights
    if weights is not None:
        table = weights.reshape(len(case.froms) + 1, -1)
        weights = np.concatenate([table[:1], table[1:][order]]).reshape(-1)
    a = shortcut.forward(case.x, case.froms, case.weights, case.params)
    b = shortcut.forward(case.x, froms, weights, case.params)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_batch_samples_are_independent():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    froms = [rng.standard_normal((1, 5, 2, 2)).astype(np.float32)]
    weights = rng.standard_normal(6).astype(np.float32)
    single = shortcut.forward(x, froms, weights, PER_CHANNEL_SOFTMAX)
    double = shortcut.forward(np.concatenate([x, x]), [np.concatenate([froms[0]] * 2)], weights, PER_CHANNEL_SOFTMAX)
    assert np.array_equal(double[0], single[0]) and np.array_equal(double[1], single[0])


# --- backward -----------------------------------------------------------------------------------------------


def _objective(case, x, froms, weights):
    """sum(delta * output): its gradient is what backward returns, in Darknet's sign convention."""
    out = shortcut.forward(x, froms, weights, case.params, Dialect.EXACT)
    return float((case.delta * out).sum())


def _central_difference(f, array, step=1e-6):
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        plus, minus = array.copy(), array.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (f(plus) - f(minus)) / (2 * step)
    return grad


@pytest.mark.parametrize("activation", ["linear", "leaky", "logistic", "mish", "swish", "tanh"])
@given(data=st.data())
def test_exact_dialect_matches_finite_differences(activation, data):
    case = data.draw(shortcut_cases(dtype=np.float64, activation=activation, away_from_kinks=True, max_from=2))
    if case.weights is not None and case.params.weights_normalization == Normalization.SOFTMAX:
        top_two = np.sort(case.weights.reshape(len(case.froms) + 1, -1), axis=0)[-2:]
        assume(np.all(top_two[1] - top_two[0] > 1e-3))  # the max is a kink where two weights tie
    if activation == "leaky":
        assume(np.all(np.abs(shortcut.forward(case.x, case.froms, case.weights, ShortcutParams(
            case.params.weights_type, case.params.weights_normalization))) > 1e-3))
    grads = shortcut.backward(case.x, case.froms, case.weights, case.delta, case.params, Dialect.EXACT)
    np.testing.assert_allclose(
        grads.input_deltas[0], _central_difference(lambda v: _objective(case, v, case.froms, case.weights), case.x),
        rtol=1e-5, atol=1e-6)
    for i, add in enumerate(case.froms):
        def f(v, i=i):
            return _objective(case, case.x, [v if j == i else a for j, a in enumerate(case.froms)], case.weights)
        np.testing.assert_allclose(grads.input_deltas[i + 1], _central_difference(f, add), rtol=1e-5, atol=1e-6)
    if case.weights is not None:
        expected = _central_difference(lambda w: _objective(case, case.x, case.froms, w), case.weights)
        np.testing.assert_allclose(grads.weight_updates, expected, rtol=1e-5, atol=1e-6)


def test_darknet_cpu_weight_gradient_is_delta_times_input():
    """Not the derivative: the normalization's Jacobian is left out, for every normalization."""
    x = np.full((1, 1, 1, 2), 2.0, np.float32)
    froms = [np.full((1, 1, 1, 2), 3.0, np.float32)]
    delta = np.ones((1, 1, 1, 2), np.float32)
    for normalization in ("none", "relu", "softmax"):
        params = ShortcutParams(weights_type="per_feature", weights_normalization=normalization)
        grads = shortcut.backward(x, froms, np.array([-1.0, 0.5], np.float32), delta, params, Dialect.DARKNET_CPU)
        assert grads.weight_updates.tolist() == [4.0, 6.0]


def test_darknet_gpu_weight_gradient_is_the_diagonal_surrogate():
    x = np.full((1, 1, 1, 2), 2.0, np.float32)
    froms = [np.full((1, 1, 1, 2), 3.0, np.float32)]
    delta = np.ones((1, 1, 1, 2), np.float32)
    weights = np.array([0.0, 0.0], np.float32)
    softmax = ShortcutParams(weights_type="per_feature", weights_normalization="softmax")
    grads = shortcut.backward(x, froms, weights, delta, softmax, Dialect.DARKNET_GPU)
    what = 1 / (2 + 1e-4)
    np.testing.assert_allclose(grads.weight_updates, [4 * what * (1 - what), 6 * what * (1 - what)], rtol=1e-6)
    relu = ShortcutParams(weights_type="per_feature", weights_normalization="relu")
    grads = shortcut.backward(x, froms, weights, delta, relu, Dialect.DARKNET_GPU)
    floored = 1e-3 / (2e-3 + 1e-4)
    np.testing.assert_allclose(grads.weight_updates, [4 * floored, 6 * floored], rtol=1e-6)


@given(shortcut_cases())
def test_input_deltas_follow_the_prn_rule(case):
    grads = shortcut.backward(case.x, case.froms, case.weights, case.delta, case.params, Dialect.DARKNET_CPU)
    for add, contribution in zip(case.froms, grads.input_deltas[1:]):
        c = min(case.x.shape[1], add.shape[1])
        assert contribution.shape == add.shape
        assert not contribution[:, c:].any()


def test_cpu_weight_updates_accumulate_in_darknet_order():
    """Each weight's terms are added one by one into the initial accumulator, not summed first."""
    big, small = np.float32(2 ** 24), np.float32(1)
    x = np.array([small, small], np.float32).reshape(1, 1, 1, 2)
    delta = np.ones_like(x)
    params = ShortcutParams(weights_type="per_feature", weights_normalization="none")
    grads = shortcut.backward(x, [], np.array([1.0], np.float32), delta, params, Dialect.DARKNET_CPU,
                              weight_updates=np.array([big], np.float32))
    assert grads.weight_updates[0] == big  # (2^24 + 1) + 1 rounds back to 2^24 each time


# --- update -------------------------------------------------------------------------------------------------


def test_cpu_update_has_decay_and_no_clipping():
    w, wu = np.array([2.0], np.float32), np.array([5.0], np.float32)
    hyper = UpdateParams(learning_rate=0.1, momentum=0.9, decay=0.01, batch=2)
    new_w, new_wu = shortcut.update(w, wu, hyper, Dialect.DARKNET_CPU)
    accumulated = np.float32(5.0) + np.float32(-0.01) * np.float32(2) * np.float32(2.0)
    assert new_w[0] == np.float32(2.0) + np.float32(0.1) / np.float32(2) * accumulated
    assert new_wu[0] == accumulated * np.float32(0.9)


def test_gpu_update_clips_has_no_decay_and_repairs_nan():
    w, wu = np.array([2.0, np.nan], np.float32), np.array([5.0, np.inf], np.float32)
    hyper = UpdateParams(learning_rate=0.1, momentum=0.9, decay=0.01, batch=2)
    new_w, new_wu = shortcut.update(w, wu, hyper, Dialect.DARKNET_GPU)
    assert new_w.tolist() == [np.float32(2.0) + np.float32(0.05) * np.float32(1), np.float32(0.5)]
    assert new_wu.tolist() == [np.float32(0.9), 0.0]


def test_gpu_update_is_skipped_during_burn_in():
    w, wu = np.array([2.0], np.float32), np.array([5.0], np.float32)
    hyper = UpdateParams(learning_rate=0.1, momentum=0.9, decay=0.0, batch=1, burn_in=100, burnin_update=2,
                         iteration=150)
    new_w, new_wu = shortcut.update(w, wu, hyper, Dialect.DARKNET_GPU)
    assert new_w.tolist() == [2.0] and new_wu.tolist() == [5.0]


# --- pjreddie -----------------------------------------------------------------------------------------------


def test_pjreddie_larger_source_is_subsampled():
    x = np.zeros((1, 1, 2, 2), np.float32)
    add = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    out = shortcut.forward(x, [add], None, ShortcutParams(), Dialect.PJREDDIE)
    assert out.reshape(-1).tolist() == [0, 2, 8, 10]


def test_pjreddie_smaller_source_is_scattered_sparsely():
    x = np.zeros((1, 1, 4, 4), np.float32)
    add = np.ones((1, 1, 2, 2), np.float32)
    out = shortcut.forward(x, [add], None, ShortcutParams(), Dialect.PJREDDIE)
    assert out[0, 0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_pjreddie_alpha_scales_the_whole_previous_delta():
    x = np.ones((1, 2, 1, 1), np.float32)
    add = np.ones((1, 1, 1, 1), np.float32)
    params = ShortcutParams(alpha=0.5, beta=2.0)
    out = shortcut.forward(x, [add], None, params, Dialect.PJREDDIE)
    assert out.reshape(-1).tolist() == [2.5, 1.0]  # channel 1 has no from input: it keeps 1 * x, not alpha * x
    grads = shortcut.backward(x, [add], None, np.ones_like(x), params, Dialect.PJREDDIE)
    assert grads.input_deltas[0].reshape(-1).tolist() == [0.5, 0.5]
    assert grads.input_deltas[1].reshape(-1).tolist() == [2.0]


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, code", [
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [np.ones((1, 1, 4, 4), np.float32)]),
     "spatial-mismatch"),
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [np.ones((1, 1, 2, 2), np.float64)]),
     "bad-dtype"),
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [np.ones((2, 1, 2, 2), np.float32)]),
     "bad-shape"),
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [], np.array([np.nan], np.float32),
                              ShortcutParams(weights_type="per_feature")), "weights-not-finite"),
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [], np.ones(3, np.float32),
                              ShortcutParams(weights_type="per_feature")), "weights-size"),
    (lambda: ShortcutParams(weights_type="per_pixel"), "unknown-weights-type"),
    (lambda: ShortcutParams(weights_normalization="sigmoid"), "unknown-weights-normalization"),
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [], dialect="darknet"), "unknown-dialect"),
    (lambda: shortcut.forward(np.ones((1, 1, 2, 2), np.float32), [], params=ShortcutParams(activation="hard_mish")),
     "activation-not-evaluated"),
    (lambda: shortcut.backward(np.ones((1, 1, 2, 2), np.float32), [], None, np.ones((1, 1, 2, 2), np.float32),
                               dialect=Dialect.DARKNET_INFERENCE), "pass-not-in-dialect"),
])
def test_bad_input_gets_a_clear_error(call, code):
    with pytest.raises(DarkspecError) as raised:
        call()
    assert raised.value.code == code
    assert "allowed:" in str(raised.value)
