"""The backend under test cannot take the run down: probe backends, each broken in one way a port can be, fail
their own checks with a message that names the cause, and every other result and the reports survive."""

import hashlib
import json
import os

import numpy as np
import pytest

from darkspec.backends.base import Capability
from darkspec.backends.reference import ReferenceBackend
from darkspec.cli import main
from darkspec.conformance import recordings as rec
from darkspec.conformance.guard import BackendFault, GuardedBackend
from darkspec.conformance.report import ERROR, cell
from darkspec.conformance.golden import gate
from darkspec.conformance.suite import run_suite
from darkspec.conformance.vectors import FAIL, PASS, replay, run_vectors
from darkspec.errors import DarkspecError
from darkspec.folders import check_writable

from conftest import GOLDEN, run_in

VECTORS = GOLDEN / "darknet-vectors"
FASTPATH = VECTORS / "darknet-alexeyab" / "fastpath_from_fewer_channels.npz"
REORG = VECTORS / "darknet-alexeyab" / "reorg3d_fwd_s2_c1_4x4.npz"
PER_FEATURE = VECTORS / "darknet-alexeyab" / "grid_per_feature_softmax_n1.npz"


def declaring(*capabilities):
    """A reference backend that declares only the given (op, dialect, dtype, pass) capabilities."""
    class Declaring(ReferenceBackend):
        def capabilities(self):
            return frozenset(Capability(*c) for c in capabilities)
    return Declaring


CPU_SHORTCUT = [("shortcut", "darknet-cpu", "float32", p) for p in ("forward", "backward", "update")]
REORG3D = [("reorg3d", "darknet", "float32", p) for p in ("forward", "backward")]


class RaisesInUpdate(declaring(*CPU_SHORTCUT)):
    name = "raises-in-update"

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        raise RuntimeError("optimizer state lost")


class RaisesInReorgBackward(declaring(*REORG3D)):
    name = "raises-in-reorg-backward"

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        raise IndexError("scatter out of range")


class FlatDeltas(declaring(*CPU_SHORTCUT)):
    name = "flat-deltas"

    def shortcut_backward(self, x, froms, weights, delta, **settings):
        grads = super().shortcut_backward(x, froms, weights, delta, **settings)
        return type(grads)(grads.delta.reshape(-1), grads.input_deltas, grads.weight_updates)


class NoneDeltas(declaring(*CPU_SHORTCUT)):
    name = "none-deltas"

    def shortcut_backward(self, x, froms, weights, delta, **settings):
        grads = super().shortcut_backward(x, froms, weights, delta, **settings)
        return type(grads)(grads.delta, [None] * len(grads.input_deltas), grads.weight_updates)


class CapabilitiesRaise(ReferenceBackend):
    name = "capabilities-raise"

    def capabilities(self):
        raise KeyError("device table")


class Float64Output(declaring(("shortcut", "darknet-cpu", "float32", "forward"))):
    name = "float64-output"

    def shortcut_forward(self, x, froms, weights, **settings):
        return super().shortcut_forward(x.astype(np.float64), [f.astype(np.float64) for f in froms],
                                        None if weights is None else weights.astype(np.float64), **settings)


class ListOutput(declaring(("shortcut", "darknet-cpu", "float32", "forward"))):
    name = "list-output"

    def shortcut_forward(self, x, froms, weights, **settings):
        return super().shortcut_forward(x, froms, weights, **settings).tolist()


class ZeroesItsInputs(declaring(("shortcut", "darknet-cpu", "float32", "forward"))):
    name = "zeroes-inputs"

    def shortcut_forward(self, x, froms, weights, **settings):
        out = super().shortcut_forward(x, froms, weights, **settings)
        x[...] = 0
        return out


class AllNaN(declaring(("shortcut", "darknet-cpu", "float32", "forward"))):
    name = "all-nan"

    def shortcut_forward(self, x, froms, weights, **settings):
        return np.full_like(x, np.nan)


def first_failures(report) -> dict[str, str]:
    """The failures of the checks on valid inputs. (The probes' refusal checks fail as well, rightly: they refuse
    nothing, not even the float64 they do not declare; tests/test_conformance.py checks refusals.)"""
    return {f"{r.capability.label()} {r.check}": r.first_failure for r in report.results
            if not r.passed and r.check != "refusals"}


def test_a_backend_that_raises_in_update_fails_the_update_only():
    report = run_suite(RaisesInUpdate(), "quick", [GOLDEN])
    assert cell(report, "shortcut/darknet-cpu/update").startswith("FAIL")
    assert cell(report, "shortcut/darknet-cpu/forward").startswith("pass")
    assert cell(report, "shortcut/darknet-cpu/backward").startswith("pass")
    failures = first_failures(report)
    assert set(failures) == {"shortcut/darknet-cpu/update golden", "shortcut/darknet-cpu/update properties"}
    assert all("shortcut_update raised RuntimeError: optimizer state lost" in f for f in failures.values())


def test_a_backend_that_raises_in_reorg_backward_fails_the_backward_only():
    report = run_suite(RaisesInReorgBackward(), "quick", [GOLDEN])
    assert cell(report, "reorg3d/darknet/forward").startswith("pass")
    assert cell(report, "reorg3d/darknet/backward").startswith("FAIL")
    assert all("reorg_backward raised IndexError: scatter out of range" in f
               for f in first_failures(report).values())


@pytest.mark.parametrize("backend, cause", [
    (FlatDeltas(), "shortcut_backward returned delta of shape ("),
    (NoneDeltas(), "shortcut_backward returned NoneType as input_deltas[0], expected a numpy.ndarray of float32"),
])
def test_backward_deltas_of_the_wrong_shape_or_none_fail_the_backward(backend, cause):
    report = run_suite(backend, "quick", [GOLDEN])
    assert cell(report, "shortcut/darknet-cpu/backward").startswith("FAIL")
    assert cell(report, "shortcut/darknet-cpu/forward").startswith("pass")
    failures = first_failures(report)
    assert failures and all(cause in f for f in failures.values()), failures


def test_a_backend_whose_capabilities_raise_is_an_error_of_that_backend():
    report = run_suite(CapabilitiesRaise(), "quick")
    assert report.failed and cell(report, "shortcut/darknet-cpu/forward") == ERROR
    assert report.error == "capabilities raised KeyError: 'device table'"


@pytest.mark.parametrize("backend, cause", [
    (Float64Output(), "shortcut_forward returned the output in float64, expected float32"),
    (ListOutput(), "shortcut_forward returned list as the output, expected a numpy.ndarray of float32"),
    (ZeroesItsInputs(), "shortcut_forward changed its input x in place"),
])
def test_a_result_of_the_wrong_type_or_dtype_or_changed_inputs_fail(backend, cause):
    report = run_suite(backend, "quick", [GOLDEN])
    assert cell(report, "shortcut/darknet-cpu/forward").startswith("FAIL")
    failures = first_failures(report)
    assert set(failures) == {"shortcut/darknet-cpu/forward golden", "shortcut/darknet-cpu/forward properties"}
    assert all(cause in f for f in failures.values()), failures


def test_an_all_nan_output_fails_a_quirk_recording():
    """The elements cpu-fastpath-input-dims leaves undefined are the reference's, not the backend's NaNs."""
    assert replay(rec.load_recording(FASTPATH)).verdict == PASS
    result = replay(rec.load_recording(FASTPATH), AllNaN())
    assert result.verdict == FAIL
    assert result.worst().name == "output" and "got nan" in result.worst().describe()


def test_the_other_backends_results_and_the_reports_survive(tmp_path):
    done = run_in(tmp_path, "darkspec", "conformance", "--backend", "reference", "--backend",
                  "test_guard:CapabilitiesRaise", "--backend", "test_guard:RaisesInUpdate", "--profile", "quick",
                  "--report-dir", str(tmp_path))
    out = done.stdout
    assert done.returncode == 1
    report = json.loads((tmp_path / "conformance.json").read_text())
    reference, raising_capabilities, raising_update = report["backends"]
    assert all(result["failures"] == 0 for result in reference["results"]) and reference["results"]
    assert raising_capabilities["error"] == "capabilities raised KeyError: 'device table'"
    assert raising_update["matrix"]["shortcut/darknet-cpu/update"].startswith("FAIL")
    assert "capabilities-raise: ERROR: capabilities raised KeyError" in out
    assert (tmp_path / "conformance.xml").exists()


def test_a_backend_named_explicitly_that_cannot_be_loaded_is_a_non_zero_exit(tmp_path):
    done = run_in(tmp_path, "darkspec", "conformance", "--backend", "no_such_module_anywhere:Backend", "--profile",
                  "quick", "--no-golden", "--report-dir", str(tmp_path))
    assert done.returncode == 1
    assert "FAILED backend/load[no_such_module_anywhere:Backend]" in done.stdout
    assert "'no_such_module_anywhere', which is not installed" in done.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_an_unwritable_report_folder_is_refused_before_the_run(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(DarkspecError) as raised:
            check_writable(tmp_path / "reports")
    finally:
        tmp_path.chmod(0o700)
    assert raised.value.code == "report-dir-unwritable"


def test_a_report_folder_under_a_file_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status = main(["conformance", "--backend", "reference", "--report-dir", str(tmp_path / "file" / "reports")])
    assert status == 2
    err = capsys.readouterr().err
    assert "--report-dir=" in err and "[report-dir-unwritable]" in err


# --- broken recordings: each fails naming the file and what is wrong; the other recordings still replay ---------


def rewrite(path, target, drop=(), params=None, arrays=None):
    """A copy of the recording at ``path`` without the arrays ``drop``, with ``params`` and ``arrays`` merged in."""
    with np.load(path) as data:
        stored = {name: data[name] for name in data.files if name not in drop}
    if params is not None:
        stored["params_json"] = np.array(json.dumps({**json.loads(str(stored["params_json"])), **params}))
    stored.update(arrays or {})
    np.savez(target, **stored)
    return target


def listed(folder):
    """The folder with a manifest that lists every file as it is (the gate then judges the files themselves)."""
    entries = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in folder.glob("*.npz")}
    (folder / "manifest.json").write_text(json.dumps(entries))
    return folder


def truncated(path, target):
    target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return target


def not_a_zip(path, target):
    target.write_text("not a recording\n")
    return target


def without_status(path, target):
    params = {k: v for k, v in rec.load_recording(path).params.items() if k != "status"}
    return rewrite(path, target, arrays={"params_json": np.array(json.dumps(params))})


BROKEN = {
    "truncated": (truncated, "not a readable .npz"),
    "not-a-zip": (not_a_zip, "not a readable .npz"),
    "no-params-json": (lambda p, t: rewrite(p, t, drop=("params_json",)), "no params_json array"),
    "no-status": (without_status, "params_json lacks status"),
    "missing-array": (lambda p, t: rewrite(p, t, drop=("from0",)), "no array 'from0'"),
    "no-output": (lambda p, t: rewrite(p, t, drop=("output",)), "status ok but no array 'output'"),
    "unknown-dialect": (lambda p, t: rewrite(p, t, params={"dialect": "darknet-tpu"}),
                        "'darknet-tpu' is not a valid Dialect"),
    "unknown-status": (lambda p, t: rewrite(p, t, params={"status": "maybe"}), "status 'maybe' is none of"),
    "float64-array": (lambda p, t: rewrite(p, t, arrays={"x": np.zeros((1, 1, 1, 1))}), "array 'x' is float64"),
}


@pytest.mark.parametrize("breakage", BROKEN)
def test_a_broken_recording_fails_naming_the_file_and_the_rest_replays(tmp_path, breakage, capsys):
    make, cause = BROKEN[breakage]
    folder = tmp_path / "vectors"
    folder.mkdir()
    good = rewrite(PER_FEATURE, folder / "a_good.npz")
    broken = make(PER_FEATURE, folder / "b_broken.npz")
    status = run_vectors([folder])
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    assert lines[0].split()[:2] == [rec.load_recording(good).name, PASS]
    assert str(broken) in lines[1] and cause in lines[1] and " FAIL " in lines[1], lines[1]
    assert lines[-1] == "1 passed, 1 failed, 0 skipped"
    golden = gate([listed(folder)])
    if breakage == "missing-array":  # which arrays a case needs follows from its cfg: the replay finds it
        assert not golden.problems
        report = run_suite(ReferenceBackend(), "quick", golden)
        assert any(str(broken) in r.first_failure and cause in r.first_failure for r in report.results)
    else:
        assert [r.path for r in golden.recordings] == [good]
        assert len(golden.problems) == 1 and str(broken) in golden.problems[0] and cause in golden.problems[0]


def test_a_broken_golden_recording_fails_the_conformance_run_by_name(tmp_path):
    folder = tmp_path / "golden"
    folder.mkdir()
    rewrite(PER_FEATURE, folder / "good.npz")
    truncated(REORG, folder / "broken.npz")
    listed(folder)
    done = run_in(tmp_path, "darkspec", "conformance", "--backend", "reference", "--profile", "quick", "--only",
                  "shortcut/darknet-cpu/forward", "--golden", str(folder), "--report-dir", str(tmp_path / "reports"))
    out = done.stdout
    assert done.returncode == 1
    assert f"golden: {folder}/broken.npz: undecodable (not a readable .npz" in out
    report = json.loads((tmp_path / "reports" / "conformance.json").read_text())
    assert report["golden_problems"] and report["backends"][0]["matrix"]["shortcut/darknet-cpu/forward"] \
        .startswith("pass")


def test_the_guard_passes_refusals_on_and_names_a_raise():
    guarded = GuardedBackend(RaisesInUpdate())
    with pytest.raises(BackendFault, match="shortcut_update raised RuntimeError"):
        guarded.shortcut_update(np.ones(3, np.float32), np.ones(3, np.float32), None, "darknet-cpu")
    with pytest.raises(DarkspecError):
        guarded.reorg_forward(np.ones((1, 1, 3, 3), np.float32), 2, False, False)
