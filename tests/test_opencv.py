"""OpenCV's Darknet importer as a backend, and what it computes (spec/third-party.md#opencv)."""

import builtins
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("cv2", reason="the opencv extra is not installed: pip install darkspec[opencv]")

from darkspec.backends.opencv_backend import ACTIVATIONS, OpenCVBackend, _inputs_cfg, _picker  # noqa: E402
from darkspec.conformance import strategies  # noqa: E402
from darkspec.conformance.compare import compare, largest_magnitude, tolerance_for  # noqa: E402
from darkspec.conformance.report import KNOWN, cell, table  # noqa: E402
from darkspec.conformance.suite import run_suite  # noqa: E402
from darkspec.errors import DarkspecError  # noqa: E402
from darkspec.reference import contract, reorg, shortcut  # noqa: E402
from darkspec.reference.network import parse_network  # noqa: E402
from darkspec.reference.shortcut import ShortcutParams  # noqa: E402
from darkspec.reference.weights import write_weights  # noqa: E402

from conftest import GOLDEN  # noqa: E402

OPENCV = OpenCVBackend()
REFUSED = tuple(n for n in contract.evaluated_activations("darknet-cpu") if n not in ACTIVATIONS)


def _inputs(seed=0, channels=(4, 4), size=(3, 3), batch=2):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-4, 4, (batch, c, *size)).astype(np.float32) for c in channels]


def _forward(x, froms, weights=None, dialect="darknet-cpu", **params):
    params = ShortcutParams(**params)
    return OPENCV.shortcut_forward(x, froms, weights, params=params, dialect=dialect)


@pytest.fixture(scope="module")
def report():
    return run_suite(OPENCV, "ci", [GOLDEN])


def test_opencv_passes_what_it_declares_and_reports_the_rest_as_known_differences(report):
    assert not report.failed, [r.first_failure for r in report.results if not r.passed]
    for capability in OPENCV.capabilities():
        assert cell(report, capability.label()).startswith("pass")
    assert cell(report, "reorg3d/darknet/forward") == KNOWN
    assert cell(report, "shortcut/darknet-cpu/backward") == "unsupported"


def test_each_known_difference_is_listed_with_what_opencv_really_computed(report):
    notes = table([report])
    known = [r for r in report.results if r.known_difference]
    assert {r.capability.op for r in known} == {"shortcut", "reorg", "reorg3d"}
    assert all(r.failures for r in known if "reverse=1" not in r.known_difference)
    assert "OpenCV ignores the weights" in notes and "worst: " in notes
    assert "Unknown layer type: reorg3d" in notes


def test_a_port_claiming_what_opencv_gets_wrong_fails_the_suite():
    class Overclaiming(OpenCVBackend):
        name = "opencv-overclaiming"

        def known_difference(self, case):
            return None

    assert run_suite(Overclaiming(), "quick", []).failed


@given(data=st.data())
def test_ordinary_shortcuts_and_the_prn_rule_are_bit_exact(data):
    case = data.draw(strategies.shortcut_cases(dtype=np.float32, weights_type="none", max_from=1))
    dialect = data.draw(st.sampled_from(["darknet-cpu", "darknet-gpu", "darknet-inference", "exact", "pjreddie"]))
    actual = _forward(case.x, case.froms, dialect=dialect)
    np.testing.assert_array_equal(actual, shortcut.forward(case.x, case.froms, None, case.params, dialect))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_activations_opencv_builds_are_within_the_tolerance(activation):
    x, source = _inputs(channels=(4, 6))
    expected = shortcut.forward(x, [source], None, ShortcutParams(activation=activation))
    comparison = compare("output", expected, _forward(x, [source], activation=activation),
                         tolerance_for(np.float32, largest_magnitude(x, source, expected)))
    assert comparison.passed, comparison.describe()


@pytest.mark.parametrize("activation", REFUSED)
def test_opencv_refuses_every_other_activation(activation):
    x, source = _inputs()
    with pytest.raises(DarkspecError) as error:
        _forward(x, [source], activation=activation)
    assert error.value.code == "opencv-refused" and f"Unsupported activation: {activation}" in str(error.value)


def test_with_two_from_layers_opencv_adds_only_the_first():
    x, first, second = _inputs(channels=(4, 4, 4))
    np.testing.assert_array_equal(_forward(x, [first, second]), shortcut.forward(x, [first], None))
    assert not np.array_equal(_forward(x, [first, second]), shortcut.forward(x, [first, second], None))


@pytest.mark.parametrize("weights_type, normalization", [("per_feature", "relu"), ("per_channel", "softmax")])
def test_opencv_ignores_the_weights(weights_type, normalization):
    x, source = _inputs()
    weights = np.linspace(-1, 2, shortcut.weight_count(weights_type, 1, 4), dtype=np.float32)
    actual = _forward(x, [source], weights, weights_type=weights_type, weights_normalization=normalization)
    np.testing.assert_array_equal(actual, shortcut.forward(x, [source], None))


def test_opencv_does_not_skip_a_shortcuts_weights_in_the_weights_file():
    """After a weighted [shortcut] OpenCV reads the next [convolutional]'s biases from the shortcut's weights: every
    later layer's parameters are shifted by the shortcut's weight count."""
    x, source = _inputs(channels=(3, 3), batch=1)
    cfg, blob, (from_layer, x_layer) = _inputs_cfg([source, x])
    cfg.add(f"[shortcut]\nfrom={from_layer}\nweights_type=per_feature\nweights_normalization=relu\n"
            "activation=linear\n", {"weights": np.array([0.25, 0.5], np.float32)})
    section, parameters = _picker(3, 0, 3, 1)  # the identity, biases 0
    parameters["biases"] = np.array([10, 20, 30], np.float32)
    cfg.add(section, parameters)
    network = parse_network(cfg.text())
    actual = OPENCV.run_cfg(cfg.text(), write_weights(network, cfg.weights), blob)

    fused = x + source  # OpenCV ignores the weights
    stream = np.concatenate([[0.25, 0.5], parameters["biases"], parameters["weights"].reshape(-1)])
    biases, kernel = stream[:3], stream[3:12].reshape(3, 3)  # what OpenCV reads as the last layer's parameters
    shifted = np.einsum("oc,bchw->bohw", kernel, fused) + biases[None, :, None, None]
    np.testing.assert_allclose(actual, shifted, rtol=1e-6, atol=1e-5)
    assert not np.allclose(actual, fused + parameters["biases"][None, :, None, None])


def test_the_old_reorg_forward_is_bit_exact_and_reverse_is_ignored():
    x = _inputs(channels=(8,), size=(4, 4))[0]
    np.testing.assert_array_equal(OPENCV.reorg_forward(x, 2, False, True), reorg.reorg_old_forward(x, 2, False))
    np.testing.assert_array_equal(OPENCV.reorg_forward(x, 2, True, True), reorg.reorg_old_forward(x, 2, False))
    assert reorg.reorg_old_forward(x, 2, True).shape == (2, 2, 8, 8)


def test_opencv_refuses_reorg3d():
    x = _inputs(channels=(4,), size=(4, 4))[0]
    with pytest.raises(DarkspecError) as error:
        OPENCV.reorg_forward(x, 2, False, False)
    assert error.value.code == "opencv-refused" and "Unknown layer type: reorg3d" in str(error.value)


def test_opencv_asserts_on_pjreddies_strided_shortcut():
    x, = _inputs(channels=(2,), size=(2, 2))
    larger, = _inputs(channels=(2,), size=(4, 4))
    with pytest.raises(DarkspecError) as error:
        _forward(x, [larger], dialect="pjreddie")
    assert error.value.code == "opencv-refused" and "getMemoryShapes" in str(error.value)


def test_opencv_refuses_beta_and_scales_all_of_x_by_alpha():
    x, fewer = _inputs(channels=(4, 2))
    with pytest.raises(DarkspecError, match="Non-zero beta"):
        _forward(x, [fewer], dialect="pjreddie", beta=2.0)
    actual = _forward(x, [fewer], dialect="pjreddie", alpha=0.5)
    expected = 0.5 * x
    expected[:, :2] += fewer
    np.testing.assert_array_equal(actual, expected)
    pjreddie = shortcut.forward(x, [fewer], None, ShortcutParams(alpha=0.5), "pjreddie")
    np.testing.assert_array_equal(pjreddie[:, 2:], x[:, 2:])  # pjreddie leaves x unscaled where from is not


def test_the_backend_is_unavailable_with_the_fix_without_cv2(monkeypatch):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ModuleNotFoundError("No module named 'cv2'", name="cv2")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    reason = OpenCVBackend().availability()
    assert "cv2" in reason and "pip install darkspec[opencv]" in reason and "<5" in reason


def test_an_opencv_without_the_darknet_importer_is_unavailable(monkeypatch):
    import cv2

    monkeypatch.delattr(cv2.dnn, "readNetFromDarknet")
    assert "has no cv2.dnn.readNetFromDarknet" in OpenCVBackend().availability()


def test_inputs_of_sizes_no_blob_can_hold_are_refused():
    x, = _inputs(channels=(2,), size=(4, 4))
    odd, = _inputs(channels=(2,), size=(6, 6))  # pjreddie's rule meets them 1:1; 6 is no multiple of 4
    with pytest.raises(DarkspecError) as error:
        _forward(x, [odd], dialect="pjreddie")
    assert error.value.code == "opencv-shape-unbuildable"


def test_the_spec_page_names_only_tests_that_exist():
    root = Path(__file__).resolve().parents[1]
    page = (root / "spec" / "third-party.md").read_text(encoding="utf-8")
    named = set(re.findall(r"::(test_\w+)", page))
    defined = {name for path in (root / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE)}
    assert len(named) > 20 and named <= defined, named - defined
