"""The ONNX export (darkspec.export.onnx) and the onnxruntime backend (spec/third-party.md#onnx)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install darkspec[onnx]")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install darkspec[onnx]")

import onnx  # noqa: E402

from darkspec.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from darkspec.conformance import strategies  # noqa: E402
from darkspec.conformance.compare import compare, largest_magnitude, tolerance_for  # noqa: E402
from darkspec.errors import DarkspecError  # noqa: E402
from darkspec.export import onnx as export  # noqa: E402
from darkspec.reference import activations, contract, reorg, shortcut  # noqa: E402
from darkspec.reference.network import parse_network  # noqa: E402
from darkspec.reference.shortcut import Normalization, ShortcutParams, WeightsType  # noqa: E402

REAL_CFGS = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"
RUNTIME = OnnxRuntimeBackend()
TRAINING_FORWARDS = ("darknet-cpu", "darknet-gpu", "darknet-inference", "exact")
EVALUATED = contract.evaluated_activations("darknet-cpu")


def _run(model, x, froms):
    return RUNTIME.run(model, {"x": x, **{f"from{i}": f for i, f in enumerate(froms)}})


def _mismatch(case, dialect, model=None):
    """The comparison of the exported graph's output with the reference's, or None where it passes."""
    model = model or export.shortcut_model(case.params, [case.x.shape, *(f.shape for f in case.froms)],
                                           case.weights, dialect, case.x.dtype)
    expected = shortcut.forward(case.x, case.froms, case.weights, case.params, dialect)
    comparison = compare("output", expected, _run(model, case.x, case.froms),
                         tolerance_for(case.x.dtype, largest_magnitude(case.x, *case.froms, expected)))
    return None if comparison.passed else comparison


@pytest.mark.parametrize("dialect", TRAINING_FORWARDS)
@given(data=st.data())
def test_the_exported_shortcut_matches_the_reference_in_each_forward_dialect(dialect, data):
    case = data.draw(strategies.shortcut_cases(activation=data.draw(st.sampled_from(EVALUATED))))
    assert _mismatch(case, dialect) is None


@given(data=st.data())
def test_every_pjreddie_activation_exports(data):
    name = data.draw(st.sampled_from(activations.PJREDDIE_NAMES))
    assert _mismatch(data.draw(strategies.pjreddie_cases(activation=name)), "pjreddie") is None


def _softmax_case(channels=8, n_from=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4, 4, (1, channels, 3, 3)).astype(np.float32)
    froms = [rng.uniform(-4, 4, (1, channels, 3, 3)).astype(np.float32) for _ in range(n_from)]
    weights = rng.uniform(-2, 2, (n_from + 1) * channels).astype(np.float32)
    params = ShortcutParams(weights_type="per_channel", weights_normalization="softmax")
    return strategies.ShortcutCase(x, froms, weights, np.zeros_like(x), params)


def _stock_softmax_rows(g, weights, params, dialect, n_from):
    """What a converter writes: ONNX's own Softmax over the slots (no eps)."""
    table = g.const(weights.reshape(n_from + 1, -1, 1, 1), "weights")
    what = g.op("Softmax", table, axis=0)
    return [g.op("Slice", what, g.int64([s]), g.int64([s + 1]), g.int64([0])) for s in range(n_from + 1)]


def test_the_stock_softmax_op_is_outside_the_tolerance(monkeypatch):
    """The eps in Darknet's denominator makes every normalized weight about 1e-4 smaller than ONNX's Softmax gives:
    some 600-800·ε·M on these cases, where the tolerance is 4·ε·M. The plain-op graph passes on the same cases."""
    cases = [_softmax_case(seed=seed) for seed in range(5)]
    assert all(_mismatch(case, "darknet-cpu") is None for case in cases)
    monkeypatch.setattr(export, "_normalized_rows", _stock_softmax_rows)
    errors = []
    for case in cases:
        comparison = _mismatch(case, "darknet-cpu")
        assert comparison is not None
        magnitude = largest_magnitude(case.x, *case.froms)
        errors.append(comparison.max_abs / (np.finfo(np.float32).eps * magnitude))
    assert 300 < min(errors) and max(errors) < 1500, errors


def test_inference_folds_the_weights_at_export():
    case = _softmax_case()
    shapes = [case.x.shape, *(f.shape for f in case.froms)]
    folded = export.shortcut_model(case.params, shapes, case.weights, "darknet-inference")
    training = export.shortcut_model(case.params, shapes, case.weights, "darknet-cpu")
    assert {n.op_type for n in folded.graph.node} <= {"Mul", "Add", "Identity"}
    assert {"ReduceMax", "Exp", "Div"} <= {n.op_type for n in training.graph.node}
    assert "Softmax" not in {n.op_type for n in training.graph.node}


def test_the_gpu_graph_has_the_relu_floor():
    params = ShortcutParams(weights_type="per_feature", weights_normalization="relu")
    weights = np.array([0.0005, -1.0, 2.0], np.float32)
    x = np.ones((1, 2, 2, 2), np.float32)
    froms = [np.full((1, 2, 2, 2), 3, np.float32), np.full((1, 2, 2, 2), -5, np.float32)]
    for dialect in ("darknet-cpu", "darknet-gpu"):
        model = export.shortcut_model(params, [x.shape] * 3, weights, dialect)
        np.testing.assert_array_equal(_run(model, x, froms), shortcut.forward(x, froms, weights, params, dialect))
    assert not np.array_equal(shortcut.forward(x, froms, weights, params, "darknet-cpu"),
                              shortcut.forward(x, froms, weights, params, "darknet-gpu"))


def test_the_prn_rule_slices_and_concatenates():
    x = np.arange(4 * 4, dtype=np.float32).reshape(1, 4, 2, 2)
    froms = [np.ones((1, 2, 2, 2), np.float32), np.full((1, 6, 2, 2), 10, np.float32)]
    model = export.shortcut_model(ShortcutParams(), [x.shape, *(f.shape for f in froms)])
    np.testing.assert_array_equal(_run(model, x, froms), shortcut.forward(x, froms, None, ShortcutParams()))
    assert {"Slice", "Concat"} <= {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("old", [False, True])
@given(data=st.data())
def test_reorg_graphs_are_bit_exact(old, data):
    case = data.draw(strategies.reorg_cases(old=old))
    model = export.reorg_model(case.x.shape, case.stride, case.reverse, old, case.x.dtype)
    expected = (reorg.reorg_old_forward if old else reorg.reorg3d_forward)(case.x, case.stride, case.reverse)
    np.testing.assert_array_equal(RUNTIME.run(model, {"x": case.x}), expected)


@pytest.mark.parametrize("old, reverse, ops", [
    (False, False, ["SpaceToDepth"]),
    (False, True, ["Reshape", "DepthToSpace", "Reshape"]),
    (True, False, ["Reshape", "SpaceToDepth", "Reshape"]),
    (True, True, ["DepthToSpace"]),
])
def test_reorg_is_space_to_depth_or_depth_to_space_in_dcr_mode(old, reverse, ops):
    shape = (2, 16, 4, 4)
    model = export.reorg_model(shape, 2, reverse, old)
    assert [n.op_type for n in model.graph.node if n.op_type != "Identity"] == ops
    assert all(onnx.helper.get_attribute_value(a) == b"DCR" for n in model.graph.node for a in n.attribute
               if a.name == "mode")


def test_reorg_refusals_are_the_references():
    with pytest.raises(DarkspecError) as error:
        export.reorg_model((1, 3, 5, 4), 2)
    assert error.value.code == reorg.CODE_SIZE


@pytest.mark.parametrize("name", sorted(activations.SHORTCUT_UNEVALUATED))
def test_an_activation_onnx_cannot_express_is_refused_by_name(name):
    with pytest.raises(DarkspecError) as error:
        export.shortcut_model(ShortcutParams(activation=name), [(1, 2, 2, 2), (1, 2, 2, 2)])
    assert error.value.code == "onnx-activation-not-expressible" and name in str(error.value)


def test_bad_shortcut_input_gets_the_references_refusal():
    with pytest.raises(DarkspecError) as error:
        export.shortcut_model(ShortcutParams(weights_type="per_channel", weights_normalization="relu"),
                              [(1, 2, 2, 2), (1, 2, 2, 2)], np.ones(3, np.float32))
    assert error.value.code == "weights-size"


def test_every_model_passes_the_onnx_checker():
    for model in (export.shortcut_model(_softmax_case().params, [(1, 8, 3, 3)] * 3, np.ones(24, np.float32)),
                  export.reorg_model((1, 4, 2, 2), 2)):
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == export.OPSET


PRN_CFG = """
[net]
batch=2
width=8
height=8
channels=3

[convolutional]
filters=8
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=4
size=1
stride=1
pad=1
activation=leaky

[shortcut]
from=-2
weights_type=per_channel
weights_normalization=softmax
activation=linear

[reorg3d]
stride=2

[reorg]
stride=2
reverse=1
"""


def test_a_whole_cfg_exports_one_graph_per_fusion_layer():
    weights = {2: np.linspace(-1, 1, 8, dtype=np.float32)}
    models = export.cfg_models(PRN_CFG, weights)
    assert sorted(models) == [2, 3, 4]
    x, from0 = np.ones((2, 4, 8, 8), np.float32), np.full((2, 8, 8, 8), 2, np.float32)
    params = ShortcutParams(weights_type=WeightsType.PER_CHANNEL, weights_normalization=Normalization.SOFTMAX)
    np.testing.assert_allclose(_run(models[2], x, [from0]),
                               shortcut.forward(x, [from0], weights[2], params, "darknet-inference"), rtol=1e-6)
    assert [i.type.tensor_type.shape.dim[1].dim_value for i in models[3].graph.input] == [4]


@pytest.mark.skipif(not REAL_CFGS.is_dir(), reason="the real cfgs live beside the repository (shared/darknet-cfg)")
def test_real_cfgs_export_every_fusion_layer():
    exported = 0
    for path in sorted(REAL_CFGS.glob("*.cfg")):
        # resnet50.cfg is pjreddie's: its strided shortcuts follow pjreddie's spatial rule (tests/test_cfg.py)
        pjreddie = path.name == "resnet50.cfg"
        library, dialect = ("pjreddie", "pjreddie") if pjreddie else ("alexeyab", "darknet-inference")
        network = parse_network(path.read_text(), library)
        fusion = [layer.index for layer in network.layers if layer.type in ("shortcut", "reorg3d", "reorg")]
        models = export.cfg_models(path.read_text(), dialect=dialect, library=library, batch=1)
        assert sorted(models) == fusion, path.name
        exported += len(fusion)
    assert exported > 100


def test_the_backend_is_unavailable_with_the_fix_without_onnxruntime(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    reason = OnnxRuntimeBackend().availability()
    assert "onnxruntime" in reason and "pip install darkspec[onnx]" in reason


def test_the_backend_refuses_quirks():
    x = np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(DarkspecError) as error:
        RUNTIME.shortcut_forward(x, [x], None, params=ShortcutParams(), dialect="darknet-cpu",
                                 quirks=["cpu-relu6-zero"])
    assert error.value.code == "quirk-not-declared"
