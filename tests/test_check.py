"""darkspec check: the fusion layers of a cfg, their quirks and a verdict per runtime, each backed by a run
(spec/check.md). The known answers are pinned on the model cfgs of tests/data/cfg and their weighted variants."""

import json

import pytest

from darkspec.backends.base import Backend
from darkspec.backends.reference import ReferenceBackend
from darkspec.cli import main
from darkspec.conformance import check
from darkspec.conformance.mutants import MUTANTS, MutantBackend
from darkspec.errors import DarkspecError
from model_cfgs import CFG_DIR, model_names, model_text, weighted_variant

MUTANT = {mutant.name: mutant for mutant in MUTANTS}


@pytest.fixture(scope="module")
def runs():
    """One set of loaded backends and cached runs for the module (as one `darkspec check` has)."""
    return check.Runs()


def report_of(name, runs, text=None):
    return check.check_model(model_text(name) if text is None else text, name, runs=runs)


def verdicts(report, runtime):
    return {layer.layer.index: layer.verdicts[runtime].verdict for layer in report.layers}


def ran(verdict, backend="reference"):
    """The outcome of the run of one backend behind a verdict."""
    return next(run.outcome for run in verdict.runs if run.backend == backend)


def test_yolov3_tiny_prn_shortcuts_and_their_prn_relations(runs):
    report = report_of("yolov3-tiny-prn.cfg", runs)
    layers = {r.layer.index: r.layer for r in report.layers}
    assert list(layers) == [13, 16, 22, 24, 25]
    assert [i.layer for i in layers[22].inputs] == [21, 8] and [i.layer for i in layers[25].inputs] == [24, 8]
    assert [i.relation for i in layers[22].inputs] == ["previous", "wider"]
    assert all(i.relation == "equal" for index in (13, 16, 24) for i in layers[index].froms)
    assert layers[22].features() == {"activation": "leaky", "weights_type": "none", "weights_normalization": "none",
                                     "prn": ["wider"]}


def test_yolov3_tiny_prn_fast_path_makes_cpu_training_and_inference_differ_and_the_run_shows_it(runs):
    report = report_of("yolov3-tiny-prn.cfg", runs)
    quirks = {r.layer.index: [q.code for q in r.quirks] for r in report.layers}
    assert quirks == {13: [], 16: [], 22: ["cpu-fastpath-input-dims"], 24: [], 25: ["cpu-fastpath-input-dims"]}
    for runtime in ("darknet-cpu", "darknet-inference"):
        assert verdicts(report, runtime) == {13: "same", 16: "same", 22: "different", 24: "same", 25: "different"}
        prn = report.layers[2].verdicts[runtime]
        assert ran(prn) == "different" and not prn.disagrees
        assert prn.findings[0].spec == "spec/quirks.md#cpu-fastpath-input-dims"
    assert set(verdicts(report, "darknet-gpu").values()) == {"same"}  # the GPU has no fast path
    assert set(verdicts(report, "torch").values()) == {"same"}
    assert ran(report.layers[2].verdicts["torch"], "torch") == "same"
    assert report.model_verdict("darknet-cpu") == "different" and report.model_verdict("darknet-gpu") == "same"


def test_yolov3_tiny_prn_in_pjreddie_is_the_same_run_in_real_pjreddie_where_installed(runs):
    report = report_of("yolov3-tiny-prn.cfg", runs)
    assert set(verdicts(report, "pjreddie").values()) == {"same"}
    darknet = runs.backend("darknet")
    outcome = ran(report.layers[2].verdicts["pjreddie"], "darknet")
    assert outcome == ("not run" if darknet.availability() else "same")


#: The model cfgs OpenCV refuses, and why: [reorg3d] is an unknown layer type, pjreddie's strided shortcut asserts,
#: relu6 (in efficientnet-lite3's convolutions) is refused.
OPENCV_REFUSES = {"yolov4-sam-mish-csp-reorg-bfm.cfg": "no-reorg3d", "resnet50.cfg": "spatial-assert",
                  "efficientnet-lite3.cfg": "relu6-refused"}
#: The model cfgs pjreddie's Darknet refuses (sections only AlexeyAB has) or computes differently (activations it
#: replaces by relu: mish and swish in convolutions and shortcuts).
PJREDDIE_REFUSES = {"efficientnet_b0.cfg", "enet-coco.cfg", "yolov4-sam-mish-csp-reorg-bfm.cfg"}


@pytest.mark.parametrize("name", model_names())
def test_which_model_cfgs_opencv_and_pjreddie_refuse_and_why(name, runs):
    report = report_of(name, runs)
    opencv = {f.code for r in report.layers for f in r.verdicts["opencv"].findings}
    opencv |= {f.code for f in report.model_findings.get("opencv", [])}
    if name in OPENCV_REFUSES:
        assert report.model_verdict("opencv") == "refused" and OPENCV_REFUSES[name] in opencv
    else:
        assert report.model_verdict("opencv") == "same" and not opencv
    assert (report.model_verdict("pjreddie") == "refused") == (name in PJREDDIE_REFUSES)
    # where the opencv backend runs, OpenCV's own result agrees with the rule table; a run that did not happen says why
    for r in report.layers:
        verdict = r.verdicts["opencv"]
        assert not verdict.disagrees, (r.layer.index, verdict.runs)
        assert all(run.detail for run in verdict.runs if run.outcome == "not run")


def test_pjreddie_runs_relu_for_mish_and_swish(runs):
    report = report_of("yolov4.cfg", runs)
    (finding,) = report.model_findings["pjreddie"]
    assert finding.verdict == "different" and "mish" in finding.reason and finding.spec == "spec/cfg.md#activation"


def test_resnet50_is_pjreddies_cfg_alexeyab_refuses_its_strided_shortcuts_and_torch_runs_them(runs):
    report = report_of("resnet50.cfg", runs)
    assert report.library == "pjreddie"
    strided = [r.layer.index for r in report.layers if r.layer.alexeyab_refusal is not None]
    assert strided == [17, 33, 57]
    for runtime in ("darknet-cpu", "darknet-gpu", "darknet-inference"):
        assert report.model_verdict(runtime) == "refused"
        assert {i for i, v in verdicts(report, runtime).items() if v == "refused"} == set(strided)
    assert set(verdicts(report, "torch").values()) == {"same"}
    assert ran(report.layers[3].verdicts["torch"], "torch") == "same"


def test_yolov4_sam_reorg3d_layers(runs):
    report = report_of("yolov4-sam-mish-csp-reorg-bfm.cfg", runs)
    reorgs = [r for r in report.layers if r.layer.type == "reorg3d"]
    assert [r.layer.index for r in reorgs] == [125, 135, 155, 160, 180, 200]
    for r in reorgs:
        assert r.verdicts["darknet-cpu"].verdict == "same" and ran(r.verdicts["darknet-cpu"]) == "same"
        assert r.verdicts["pjreddie"].verdict == "refused" and r.verdicts["opencv"].verdict == "refused"
        assert ran(r.verdicts["torch"], "torch") == "same"


def test_yolov2_old_reorg_is_the_same_in_pjreddie_and_noted_as_not_space_to_depth(runs):
    report = report_of("yolov2.cfg", runs)
    (layer,) = report.layers
    assert layer.layer.type == "reorg" and layer.layer.reorg.stride == 2
    assert [q.code for q in layer.quirks] == ["reorg-old-permutation"]
    assert {name: v.verdict for name, v in layer.verdicts.items() if name not in ("opencv", "onnx", "cupy")} == \
        dict.fromkeys(("darknet-cpu", "darknet-gpu", "darknet-inference", "pjreddie", "torch"), "same")


#: Every model cfg with a [shortcut] that AlexeyAB's parser reads (resnet50's strided shortcuts it refuses).
WEIGHTED_MODELS = [name for name in model_names() if name not in ("resnet50.cfg", "yolov2.cfg", "yolov4-tiny.cfg",
                                                                   "yolov7-tiny.cfg", "yolov7.cfg")]


@pytest.mark.parametrize("name", WEIGHTED_MODELS)
def test_weighted_relu_variant_differs_on_the_gpu_and_at_inference_by_the_floor(name, runs):
    report = report_of(name, runs, weighted_variant(model_text(name), "per_channel", "relu"))
    shortcuts = [r for r in report.layers if r.layer.type == "shortcut"]
    assert shortcuts and all(r.layer.weighted for r in shortcuts)
    for r in shortcuts:
        v = r.verdicts
        assert v["darknet-cpu"].verdict == "same" and ran(v["darknet-cpu"]) == "same"
        for runtime in ("darknet-gpu", "darknet-inference"):  # the witness weights have a dead input
            assert v[runtime].verdict == "different" and ran(v[runtime]) == "different"
            assert [f.code for f in v[runtime].findings] == ["relu-floor"]
        assert v["pjreddie"].verdict == "different" and "weights-ignored" in {f.code for f in v["pjreddie"].findings}
        assert v["opencv"].verdict == "different"
        assert v["torch"].verdict == "same" and ran(v["torch"], "torch") == "same"
    assert "weights-shifted" in {f.code for f in report.model_findings["opencv"]}


def test_weighted_softmax_variant_is_the_same_on_every_alexeyab_path(runs):
    name = "yolov3-tiny-prn.cfg"
    report = report_of(name, runs, weighted_variant(model_text(name), "per_feature", "softmax"))
    for runtime in ("darknet-cpu", "darknet-gpu", "darknet-inference", "torch"):
        assert set(verdicts(report, runtime).values()) == {"same"}


def test_weights_without_normalization_are_refused_by_alexeyab_and_run_by_darkspec(runs):
    name = "yolov3-tiny-prn.cfg"
    text = model_text(name).replace("[shortcut]\n", "[shortcut]\nweights_type=per_feature\n")
    report = report_of(name, runs, text)
    for runtime in ("darknet-cpu", "darknet-gpu", "darknet-inference"):
        assert set(verdicts(report, runtime).values()) == {"refused"}
    assert set(verdicts(report, "torch").values()) == {"same"}


@pytest.mark.parametrize("name, text, layer_type, mutant", [
    ("yolov4-sam-mish-csp-reorg-bfm.cfg", None, "reorg3d", "pixel-unshuffle-order"),
    ("yolov3-tiny-prn.cfg", weighted_variant(model_text("yolov3-tiny-prn.cfg")), "shortcut", "weight-index-shifted"),
])
def test_a_broken_backend_is_shown_different_and_against_the_rule_table(name, text, layer_type, mutant):
    runs = check.Runs({"torch": MutantBackend(MUTANT[mutant])})
    report = report_of(name, runs, text)
    broken = [r.verdicts["torch"] for r in report.layers if r.layer.type == layer_type]
    assert broken and all(v.verdict == "different" and v.disagrees for v in broken)
    assert "disagrees with the rule table" in check.render(report)


class Crashing(Backend):
    name = "crashing"

    def shortcut_forward(self, *args, **kwargs):
        raise RuntimeError("segfault")


def test_a_backend_that_raises_is_reported_and_the_check_goes_on():
    report = report_of("yolov3-tiny-prn.cfg", check.Runs({"torch": Crashing()}))
    assert all(r.verdicts["torch"].verdict == "different" and r.verdicts["torch"].runs[0].outcome == "failed"
               for r in report.layers)
    assert set(verdicts(report, "darknet-gpu").values()) == {"same"}


class Counting(ReferenceBackend):
    def __init__(self):
        self.calls = 0

    def shortcut_forward(self, *args, **kwargs):
        self.calls += 1
        return super().shortcut_forward(*args, **kwargs)


def test_runs_are_cached_per_distinct_layer_configuration():
    counting = Counting()
    report = report_of("yolov3.cfg", check.Runs({"torch": counting}), None)
    configurations = {(r.layer.input_shape, tuple(i.shape for i in r.layer.froms), r.layer.from_input_matches)
                      for r in report.layers}
    assert len(report.layers) == 23 and counting.calls == len(configurations) < 23


def test_the_table_has_a_row_per_fusion_layer_a_column_per_runtime_and_the_notes(runs):
    text = check.render(report_of("yolov3-tiny-prn.cfg", runs))
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert all(rt.label in header for rt in check.RUNTIMES)
    assert "[1] AB CPU train, different:" in text and "spec/quirks.md#cpu-fastpath-input-dims" in text
    assert ("opencv: not run:" in text) == bool(runs.backend("opencv").availability())
    assert "same*" in text  # a verdict of the rule table alone is marked as such


def test_cli_table_json_and_fail_on(capsys):
    cfg = str(CFG_DIR / "yolov3-tiny-prn.cfg")
    assert main(["check", cfg]) == 0
    assert "cpu-fastpath-input-dims" in capsys.readouterr().out
    assert main(["check", cfg, "--fail-on", "different"]) == 1
    assert main(["check", cfg, "--fail-on", "refused"]) == 0
    assert main(["check", cfg, "--fail-on", "different", "--runtime", "darknet-gpu", "--runtime", "torch"]) == 0
    capsys.readouterr()
    assert main(["check", cfg, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["index"] for layer in data["layers"]] == [13, 16, 22, 24, 25]
    assert data["model"]["darknet-cpu"]["verdict"] == "different"
    layer = data["layers"][2]
    assert layer["inputs"][1] == {"slot": 1, "layer": 8, "shape": [256, 26, 26], "relation": "wider"}
    cpu = layer["runtimes"]["darknet-cpu"]
    assert cpu["verdict"] == cpu["rule_verdict"] == "different"
    assert cpu["runs"][0]["backend"] == "reference" and cpu["runs"][0]["outcome"] == "different"
    reorg = str(CFG_DIR / "yolov4-sam-mish-csp-reorg-bfm.cfg")
    assert main(["check", reorg, "--fail-on", "refused"]) == 1
    assert main(["check", reorg, "--fail-on", "refused", "--runtime", "darknet-cpu"]) == 0


def test_bad_input_gets_a_clear_error(capsys, tmp_path):
    assert main(["check", str(tmp_path / "missing.cfg")]) == 2
    assert "no-such-file" in capsys.readouterr().err
    assert main(["check", str(CFG_DIR / "yolov2.cfg"), "--runtime", "tensorrt"]) == 2
    assert "unknown-runtime" in capsys.readouterr().err
    broken = tmp_path / "broken.cfg"
    broken.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\n[shortcut]\nfrom=-5\n")
    assert main(["check", str(broken)]) == 2
    assert "from-out-of-range" in capsys.readouterr().err
    with pytest.raises(DarkspecError):
        check.select_runtimes(["opencv4"])


SMALL = "[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=4\n[convolutional]\nfilters=4\n"


def small_report(text, runs):
    return check.check_model(SMALL + text, "small.cfg", runs=runs)


def test_relu6_in_a_shortcut_is_zero_in_alexeyab_cpu_and_refused_by_opencv(runs):
    (layer,) = small_report("[shortcut]\nfrom=-2\nactivation=relu6\n", runs).layers
    assert [q.code for q in layer.quirks] == ["cpu-relu6-zero"]
    v = layer.verdicts
    assert v["darknet-cpu"].verdict == v["darknet-inference"].verdict == "different"
    assert ran(v["darknet-cpu"]) == "different"
    assert v["darknet-gpu"].verdict == "same" and v["torch"].verdict == "same"
    assert v["opencv"].verdict == "refused"


def test_hard_mish_in_a_shortcut_is_zero_on_every_alexeyab_path_and_refused_by_darkspecs_backends(runs):
    (layer,) = small_report("[shortcut]\nfrom=-2\nactivation=hard_mish\n", runs).layers
    assert [q.code for q in layer.quirks] == ["shortcut-unevaluated-activations"]
    v = layer.verdicts
    for runtime in ("darknet-cpu", "darknet-gpu", "darknet-inference"):
        assert v[runtime].verdict == "different" and ran(v[runtime]) == "different"
    assert v["torch"].verdict == "refused"


def test_reorg3d_reverse_is_noted_as_not_the_inverse(runs):
    (layer,) = small_report("[convolutional]\nfilters=16\n[reorg3d]\nstride=2\nreverse=1\n", runs).layers
    assert [q.code for q in layer.quirks] == ["reorg3d-reverse-not-inverse"]
    assert layer.verdicts["darknet-cpu"].verdict == "same" and layer.verdicts["torch"].verdict == "same"
