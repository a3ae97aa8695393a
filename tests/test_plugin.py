"""The pytest plugin: `pytest --darkspec-backend NAME` in any directory, one item per backend x capability x check,
pytest's own selection and reports, and a crashing or hanging backend failing its own items only."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from darkspec.backends.base import Capability
from darkspec.backends.reference import ReferenceBackend

from conftest import matrix_rows, run_in

TESTS = Path(__file__).resolve().parent


class Small(ReferenceBackend):
    """[reorg3d] forward and backward in both dtypes of the contract (golden cases exist for float32)."""

    name = "small"

    def capabilities(self):
        return frozenset(Capability("reorg3d", "darknet", dtype, p) for dtype in ("float32", "float64")
                         for p in ("forward", "backward"))


class Crashes(Small):
    """Segfaults in backward, as a kernel reading a null pointer does."""

    name = "crashes"

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        import ctypes

        ctypes.string_at(0)


class Hangs(Small):
    """Never returns from backward."""

    name = "hangs"

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        import time

        while True:
            time.sleep(1)


class WrongForward(Small):
    name = "wrong-forward"

    def reorg_forward(self, x, stride, reverse, old):
        return np.flip(super().reorg_forward(x, stride, reverse, old))


CHECKS = {"float32": ("properties", "golden", "refusals"), "float64": ("properties", "refusals")}
SMALL_IDS = ["golden/gate"] + [f"reorg3d/darknet/{dtype}/{pass_}/{check}[small]" for dtype in CHECKS
                                 for pass_ in ("backward", "forward") for check in CHECKS[dtype]]


def pytest_in(directory, *args):
    """pytest run as a user runs it, in an empty directory outside the repository."""
    return run_in(directory, "pytest", *args)


def darkspec_in(directory, *args):
    return run_in(directory, "darkspec", *args)


def outcomes(junit: Path) -> dict[str, str]:
    """Each test case of a JUnit file by node id (JUnit writes its slashes as dots): passed, failure, error or
    skipped."""
    cases = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        cases[case.get("name").replace(".", "/")] = kinds[0] if kinds else "passed"
    return cases


def test_one_item_per_backend_capability_and_check(tmp_path):
    done = pytest_in(tmp_path, "--darkspec-backend", "test_plugin:Small", "--collect-only", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if "[" in line or line == "golden/gate"] == SMALL_IDS


def test_selection_junit_and_the_matrix(tmp_path):
    junit = tmp_path / "junit.xml"
    done = pytest_in(tmp_path, "--darkspec-backend", "test_plugin:Small", "--darkspec-profile", "quick",
                     "-k", "float32 and forward", f"--junitxml={junit}", "--darkspec-report-dir",
                     str(tmp_path / "reports"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(outcomes(junit)) == {f"reorg3d/darknet/float32/forward/{check}[small]"
                                    for check in ("properties", "golden", "refusals")}
    assert "darkspec conformance matrix" in done.stdout
    assert matrix_rows(done.stdout)["reorg3d/darknet/backward"] == ["not run", "not run"]  # checks, refusals
    report = json.loads((tmp_path / "reports" / "conformance.json").read_text())
    assert report["backends"][0]["matrix"]["reorg3d/darknet/forward"].startswith("pass")


def test_a_failing_check_reruns_alone_with_last_failed(tmp_path):
    first = pytest_in(tmp_path, "--darkspec-backend", "test_plugin:WrongForward", "--darkspec-profile", "quick")
    assert first.returncode == 1
    assert "FAILED reorg3d/darknet/float32/forward/properties[wrong-forward]" in first.stdout
    again = pytest_in(tmp_path, "--darkspec-backend", "test_plugin:WrongForward", "--darkspec-profile", "quick",
                      "--lf", "-x", "-v")
    ran = [line.split()[0] for line in again.stdout.splitlines() if line.endswith(("PASSED", "FAILED")) or
           " FAILED " in line or " PASSED " in line]
    assert again.returncode == 1
    assert ran and all("forward" in nodeid and "wrong-forward" in nodeid for nodeid in ran), again.stdout
    assert len(ran) == 1  # -x: the first failure ends the rerun


def test_a_crash_fails_its_item_only_and_the_run_goes_on(tmp_path):
    junit = tmp_path / "junit.xml"
    done = pytest_in(tmp_path, "--darkspec-backend", "test_plugin:Crashes", "--darkspec-backend", "test_plugin:Small",
                     "--darkspec-profile", "quick", "-n", "2", f"--junitxml={junit}",
                     "--darkspec-report-dir", str(tmp_path / "reports"))
    assert done.returncode == 1, done.stdout + done.stderr
    results = outcomes(junit)
    for dtype, check in [(dtype, check) for dtype in CHECKS for check in CHECKS[dtype]]:
        assert results.pop(f"reorg3d/darknet/{dtype}/backward/{check}[crashes]") in ("failure", "error")
    assert set(results.values()) == {"passed"} and len(results) == 1 + 5 + 10
    assert "crashed" in done.stdout
    report = json.loads((tmp_path / "reports" / "conformance.json").read_text())
    crashes, small = report["backends"]
    assert crashes["matrix"]["reorg3d/darknet/backward"].startswith("FAIL")
    assert crashes["matrix"]["reorg3d/darknet/forward"].startswith("pass")
    assert all(cell.startswith(("pass", "unsupported")) for cell in small["matrix"].values())


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_hang_fails_its_item_at_the_limit_and_the_run_goes_on(tmp_path, workers):
    junit = tmp_path / "junit.xml"
    done = pytest_in(tmp_path, "--darkspec-backend", "test_plugin:Hangs", "--darkspec-profile", "quick",
                     "--darkspec-timeout", "5", "-n", workers, "-k", "float32", f"--junitxml={junit}")
    assert done.returncode == 1, done.stdout + done.stderr
    results = outcomes(junit)
    for check in CHECKS["float32"]:
        assert results.pop(f"reorg3d/darknet/float32/backward/{check}[hangs]") in ("failure", "error")
    assert set(results.values()) == {"passed"} and len(results) == 3
    assert "hung: no result within 5 s (--darkspec-timeout)" in done.stdout


def test_a_backend_named_but_not_loadable_fails_its_item(tmp_path):
    done = pytest_in(tmp_path, "--darkspec-backend", "no_such_module_anywhere:Backend", "-q")
    assert done.returncode == 1
    assert "FAILED backend/load[no_such_module_anywhere:Backend]" in done.stdout
    assert "'no_such_module_anywhere', which is not installed" in done.stdout


def test_darkspec_conformance_runs_through_the_plugin(tmp_path):
    done = darkspec_in(tmp_path, "conformance", "--backend", "test_plugin:Small", "--backend", "reference",
                       "--profile", "quick", "--only", "reorg3d/*/*", "--dtype", "float32", "--workers", "2",
                       "--report-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "darkspec conformance matrix" in done.stdout
    rows = matrix_rows(done.stdout)
    assert [cell.split()[0] for cell in rows["reorg3d/darknet/forward"] + rows["reorg3d/darknet/backward"]] == \
        ["pass"] * 8  # two backends, checks and refusals
    cases = outcomes(tmp_path / "out" / "conformance.xml")
    assert "reorg3d/darknet/float32/forward/golden[reference]" in cases, cases
    assert not any("float64" in name or name.startswith("shortcut") for name in cases)
    report = json.loads((tmp_path / "out" / "conformance.json").read_text())
    assert [b["name"] for b in report["backends"]] == ["small", "reference"]
    assert not (tmp_path / ".pytest_cache").exists() and not (tmp_path / ".hypothesis").exists()
