"""The conformance harness: backend protocol, registry, suite, matrix and reports."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from darkspec.backends.base import Capability
from darkspec.backends.reference import ReferenceBackend
from darkspec.backends.registry import UnavailableBackend, discover, load
from darkspec.conformance.report import cell, json_report, table
from darkspec.conformance.suite import refusal_calls, refusal_problem, run_suite
from darkspec.errors import DarkspecError

from conftest import GOLDEN, matrix_rows, run_in

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "toy_backend"


class RaisingBackend(ReferenceBackend):
    """Declares the darknet-cpu forward and fails it by raising: a failure, never a crash of the suite."""

    name = "raising"

    def capabilities(self):
        return frozenset({Capability("shortcut", "darknet-cpu", "float32", "forward")})

    def shortcut_forward(self, x, froms, weights, **settings):
        raise RuntimeError("kernel launch failed")


def test_the_reference_passes_everything_it_declares():
    report = run_suite(ReferenceBackend(), "quick", [GOLDEN])
    assert not report.failed
    declared = {c.label() for c in ReferenceBackend().capabilities()}
    assert {r.capability.label() for r in report.results} == declared
    assert all(cell(report, label).startswith("pass") for label in declared)
    assert all(cell(report, label, refusals=True).startswith("pass") for label in declared)


class UncheckedBackend(ReferenceBackend):
    """Computes what the reference computes on valid inputs, and never refuses: runs whatever it is given."""

    name = "unchecked"

    def capabilities(self):
        return frozenset({Capability("shortcut", "darknet-cpu", "float32", "forward"),
                          Capability("reorg3d", "darknet", "float32", "forward")})

    def shortcut_forward(self, x, froms, weights, **settings):
        return np.zeros_like(np.asarray(x, dtype=np.float32))

    def reorg_forward(self, x, stride, reverse, old):
        return np.asarray(x)


def test_refusals_are_a_check_and_a_column_of_their_own():
    reference = run_suite(ReferenceBackend(), "quick", [])
    refusals = [r for r in reference.results if r.check == "refusals"]
    assert {r.capability for r in refusals} == ReferenceBackend().capabilities()
    assert all(r.examples >= 5 and r.passed for r in refusals)
    text = table([reference])
    assert "reference refusals" in text.splitlines()[0]
    assert json_report([reference], "quick")["backends"][0]["refusals"]["reorg/darknet/backward"].startswith("pass")


def test_a_backend_that_never_refuses_fails_the_refusal_check_for_each_bad_call():
    report = run_suite(UncheckedBackend(), "quick", [])
    failed = {r.capability.op: r for r in report.results if r.check == "refusals" and not r.passed}
    assert set(failed) == {"shortcut", "reorg3d"}
    assert "accepted" in failed["shortcut"].first_failure or "raised" in failed["shortcut"].first_failure
    # the float64 and float16 inputs it does not declare count too: a dtype not declared is refused, not run
    assert failed["shortcut"].failures >= 10
    assert cell(report, "shortcut/darknet-cpu/forward", refusals=True).startswith("FAIL")


def test_a_refusal_after_writing_into_an_input_fails():
    class Scribbler(ReferenceBackend):
        def reorg_backward(self, delta, stride, reverse, old, previous_delta):
            previous_delta[...] = 0  # what Darknet's delta buffer would hold before it noticed
            return super().reorg_backward(delta, stride, reverse, old, previous_delta)

    capability = Capability("reorg3d", "darknet", "float32", "backward")
    problems = [refusal_problem(Scribbler(), code, mistake, call)
                for code, mistake, call in refusal_calls(Scribbler(), capability)]
    assert all(p and "writing into its input previous_delta" in p for p in problems)


def test_golden_cases_count_towards_the_capabilities():
    report = run_suite(ReferenceBackend(), "quick", [GOLDEN])
    golden = {r.capability.label() for r in report.results if r.check == "golden"}
    assert {"shortcut/darknet-cpu/update", "shortcut/pjreddie/backward", "reorg3d/darknet/forward"} <= golden


def test_a_raising_backend_fails_its_capability_and_the_rest_is_unsupported():
    report = run_suite(RaisingBackend(), "quick", [GOLDEN])
    assert report.failed
    assert cell(report, "shortcut/darknet-cpu/forward").startswith("FAIL")
    assert cell(report, "shortcut/darknet-cpu/backward") == "unsupported"
    assert "kernel launch failed" in table([report])


def test_a_backend_that_cannot_run_here_is_listed_as_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setenv("DARKSPEC_DARKNET_LIB", "no-such-libdarknet.so")
    backends = {b.name: b for b in discover()}
    assert {"reference", "torch", "torch-cuda", "darknet", "cupy"} <= set(backends)
    report = run_suite(backends["darknet"], "quick")
    assert "DARKSPEC_DARKNET_LIB" in report.unavailable
    assert cell(report, "shortcut/darknet-cpu/forward") == "unavailable"


def test_load_reports_a_broken_plugin_instead_of_raising():
    backend = load("no_such_module_anywhere:Backend")
    assert isinstance(backend, UnavailableBackend)
    assert "'no_such_module_anywhere', which is not installed" in backend.availability()
    with pytest.raises(DarkspecError) as raised:
        load("not-a-spec")
    assert raised.value.code == "unknown-backend"


def test_reports_hold_versions_platform_and_every_result():
    reports = [run_suite(ReferenceBackend(), "quick"), run_suite(RaisingBackend(), "quick")]
    data = json_report(reports, "quick")
    assert data["suite"] == "darkspec" and data["git_revision"] and data["platform"]["numpy"] == np.__version__
    reference, raising = data["backends"]
    assert reference["available"] and reference["version"].startswith("darkspec")
    assert all(r["failures"] == 0 for r in reference["results"])
    assert raising["results"][0]["failures"] > 0 and "kernel launch failed" in raising["results"][0]["first_failure"]


def test_conformance_command_exits_non_zero_on_a_failing_backend(tmp_path):
    done = run_in(tmp_path, "darkspec", "conformance", "--backend", "test_conformance:RaisingBackend", "--profile",
                  "quick", "--report-dir", "out")
    assert done.returncode == 1, done.stdout + done.stderr
    assert matrix_rows(done.stdout)["shortcut/darknet-cpu/forward"][0].startswith("FAIL")
    assert (tmp_path / "out" / "conformance.json").exists()
    failures = ET.parse(tmp_path / "out" / "conformance.xml").getroot().iter("failure")
    assert any("kernel launch failed" in failure.get("message", "") for failure in failures)


def test_the_out_of_tree_example_backend_works_as_the_readme_says(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE)}
    done = subprocess.run(
        [sys.executable, "-m", "darkspec", "conformance", "--backend", "toy_backend:ToyBackend", "--profile", "quick",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {label: cells[0].split()[0] for label, cells in matrix_rows(done.stdout).items()}
    assert rows.pop("shortcut/darknet-cpu/forward") == "pass"
    assert set(rows.values()) == {"unsupported"}


def test_entry_point_backends_are_discovered(monkeypatch):
    """A package registers a backend under the entry-point group darkspec.backends."""
    from importlib.metadata import EntryPoint

    import darkspec.backends.registry as registry

    plugin = EntryPoint(name="raising", value="test_conformance:RaisingBackend", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [plugin] if group == registry.ENTRY_POINT_GROUP else [])
    found = {backend.name: backend for backend in discover()}
    assert isinstance(found["raising"], RaisingBackend)
    assert isinstance(load("raising"), RaisingBackend)
