"""The throughput matrix (darkspec.bench): what it checks before timing, its outputs, compare mode, the bytes rule.

Nothing here asserts a speed: figures depend on the machine. One quick run uses a tiny size; every other test
works on a timer that returns fixed durations or on reports built by hand.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import replace

import numpy as np
import pytest

from darkspec.backends.reference import ReferenceBackend
from darkspec.bench import cases, cli, contenders, matrix, report
from darkspec.bench.cases import Case, bytes_moved
from darkspec.bench.timing import Timer
from darkspec.errors import DarkspecError

TINY = (1, 16, 8, 8)
TORCH = contenders.import_torch()
needs_torch = pytest.mark.skipif(TORCH is None, reason="torch is not importable: no PyTorch baselines")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    status = cli.run(quick=True, sizes=["1x16x8x8"], output=output, out=out)
    return status, out.getvalue(), output


def test_the_quick_profile_prints_and_writes_every_case_of_every_contender(quick_run):
    status, text, output = quick_run
    assert status == 0
    for header in ("contender", "ms median [p20, p80]", "GB/s", "% copy", "first call s", "machine:", "spread"):
        assert header in text
    data = json.loads((output / cli.JSON_NAME).read_text())
    assert data["schema"] == matrix.SCHEMA and data["profile"]["sizes"] == [list(TINY)]
    assert data["machine"]["cpu_model"] and data["machine"]["llc_bytes"] > 0 and data["allocator"]
    reference = {r["key"] for r in data["results"] if r["backend"] == "reference"}
    assert reference == {c.key for c in cases.QUICK_CASES}
    for r in data["results"]:
        assert r["error"] is None, (r["backend"], r["key"], r["error"])
        t = r["time"]
        assert 0 < t["p20_s"] <= t["median_s"] <= t["p80_s"] and t["repeats"] == len(t["samples_s"]) >= 5
        assert r["gbps"] == pytest.approx(r["bytes"] / t["median_s"] / 1e9)
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy"]["gbps"])
        assert r["first_call_s"] > 0
    if data["charts"]["reason"] is None:
        assert data["charts"]["files"] and all((output / f).read_bytes()[:4] == b"\x89PNG"
                                               for f in data["charts"]["files"])
    else:
        assert "darkspec[bench]" in data["charts"]["reason"]


def test_the_run_leaves_subnormal_floats_alone(quick_run):
    """Loading libdarknet.so (built with -Ofast) turns on flush-to-zero; the bench restores the environment."""
    tiny = np.finfo(np.float32).smallest_subnormal
    assert tiny * np.float32(1.0) > 0


@needs_torch
def test_the_torch_baselines_compute_what_the_reference_computes(quick_run):
    """Each baseline passed the check against the reference before it was timed (a failure shows as an error)."""
    _, _, output = quick_run
    data = json.loads((output / cli.JSON_NAME).read_text())
    names = {(r["backend"], r["key"]) for r in data["results"] if r["kind"] == "baseline" and r["gbps"]}
    for case in cases.QUICK_CASES:
        assert (contenders.TORCH_EAGER, case.key) in names and (contenders.TORCH_COMPILE, case.key) in names


# --------------------------------------------------------------------------------------------------------------
# Only what conforms is timed.


class FixedTimer(Timer):
    """A device whose op calls take 2 ms and whose copy takes 1 ms: every ratio is known in advance."""

    name, device = "fixed", "fake-device"

    def time_call(self, run, i):
        result = run(i)
        return 0.001 if isinstance(result, str) else 0.002

    def copy_call(self, nbytes, sets):
        return lambda i: "copied"


class TimedReference(ReferenceBackend):
    name = "timed"

    def bench_timer(self):
        return FixedTimer()


class SkipsWork(ReferenceBackend):
    """Returns an output of the right shape without computing it: it would be the fastest of all."""

    name = "skips-work"

    def shortcut_forward(self, x, froms, weights, **settings):
        return np.zeros_like(x)


class Raises(ReferenceBackend):
    name = "raises"

    def reorg_forward(self, x, stride, reverse, old):
        raise RuntimeError("kernel launch failed")


PROFILE = replace(cases.PROFILES["quick"], sizes=(TINY,), warmup=1, min_repeats=3, max_repeats=3)


def measure(backends, **options):
    return matrix.run_matrix(backends, PROFILE, baselines=False, darknet=False, **options)


def test_a_backend_supplies_its_own_timer_and_copy_baseline():
    data = measure([TimedReference()])
    assert data["backends"][0]["timer"] == "fixed"
    assert len(data["results"]) == len(cases.QUICK_CASES)
    for r in data["results"]:
        assert r["timer"] == "fixed" and r["time"]["median_s"] == 0.002 and r["time"]["repeats"] == 3
        assert r["copy"]["median_s"] == 0.001 and r["pct_of_copy"] == pytest.approx(50.0)


def test_a_backend_that_gets_it_wrong_gets_no_figure_only_the_failure():
    data = measure([SkipsWork(), ReferenceBackend()])
    wrong = [r for r in data["results"] if r["backend"] == "skips-work" and r["pass"] == "forward"
             and r["op"] == "shortcut"]
    assert wrong and all(r["gbps"] is None and r["time"].get("median_s") is None for r in wrong)
    assert all(r["error"].startswith("wrong result, not timed: output:") for r in wrong)
    assert all(r["gbps"] for r in data["results"] if r["backend"] == "reference")
    assert "wrong result, not timed" in "\n".join(report.notes(data))


def test_a_failing_backend_is_reported_in_its_cell_not_raised():
    data = measure([Raises()])
    broken = [r for r in data["results"] if r["op"] != "shortcut"]
    assert broken and all("kernel launch failed" in r["error"] for r in broken)
    assert all(r["error"] is None for r in data["results"] if r["op"] == "shortcut")
    assert "kernel launch failed" in "\n".join(report.notes(data)) and "error" in report.table(data)


def test_sizes_that_an_op_refuses_are_skipped_with_the_reason():
    profile = replace(PROFILE, sizes=((1, 4, 7, 8),))
    data = matrix.run_matrix([ReferenceBackend()], profile, baselines=False, darknet=False,
                             case_filter=lambda c: c.op != "shortcut")
    assert data["results"] == [] and {s["key"] for s in data["skipped"]} == {c.key for c in cases.QUICK_CASES
                                                                            if c.op != "shortcut"}
    assert all("reorg-size-not-divisible" in s["reason"] for s in data["skipped"])


# --------------------------------------------------------------------------------------------------------------
# Compare mode.


def _report_of(*rows):
    results = [{"backend": b, "key": "k", "label": "op", "shape": [1, 2, 3, 4], "dtype": "float32",
                "case_threads": 1, "gbps": None if t is None else 1.0,
                "time": {} if t is None else {"median_s": t, "spread": s},
                "copy": {"median_s": 1.0, "spread": 0.0}} for b, t, s in rows]
    return {"results": results}


def test_compare_flags_a_slowdown_beyond_the_spread_and_not_one_within_it():
    old = _report_of(("a", 1.0, 0.1), ("b", 1.0, 0.1), ("c", 1.0, 0.1))
    new = _report_of(("a", 1.3, 0.1), ("b", 1.05, 0.1), ("c", 0.5, 0.1))
    verdicts = {c.backend: c.verdict for c in report.compare_reports(old, new)}
    assert verdicts == {"a": "regression", "b": "same", "c": "faster"}


def test_a_backend_or_case_that_vanished_or_now_fails_is_a_regression():
    old = _report_of(("gone", 1.0, 0.1), ("fails", 1.0, 0.1), ("same", 1.0, 0.1))
    new = _report_of(("fails", None, 0.0), ("same", 1.0, 0.1), ("added", 1.0, 0.1))
    changes = {c.backend: c for c in report.compare_reports(old, new)}
    assert {b: c.verdict for b, c in changes.items()} == {"fails": "failed", "same": "same", "added": "new",
                                                         "gone": "missing"}
    assert [b for b, c in changes.items() if report.is_regression(c)] == ["fails", "gone"]


def test_compare_relative_to_copy_forgives_a_machine_that_is_slower_as_a_whole():
    old, new = _report_of(("a", 1.0, 0.05)), _report_of(("a", 2.0, 0.05))
    new["results"][0]["copy"]["median_s"] = 2.0
    assert report.compare_reports(old, new)[0].verdict == "regression"
    assert report.compare_reports(old, new, relative_to_copy=True)[0].verdict == "same"


def test_compare_mode_exit_status_only_with_fail_on_regression(quick_run, tmp_path):
    _, _, output = quick_run
    saved = json.loads((output / cli.JSON_NAME).read_text())
    vanished = copy.deepcopy(saved)
    vanished["results"] = [r for r in vanished["results"] if r["backend"] != "reference"]
    current = tmp_path / "current.json"
    current.write_text(json.dumps(vanished))
    options = dict(compare_with=output / cli.JSON_NAME, current=current, out=io.StringIO())
    assert cli.run(**options) == 0
    text = io.StringIO()
    assert cli.run(**{**options, "out": text}, fail_on_regression=True) == 1
    assert "MISSING" in text.getvalue()


def test_compare_refuses_a_file_that_is_not_a_bench_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(DarkspecError, match="bad-baseline"):
        report.load_report(bad)


# --------------------------------------------------------------------------------------------------------------
# Options and the bytes rule.


def test_sizes_cases_and_threads_are_checked():
    assert cases.parse_size("8x256x52x52") == (8, 256, 52, 52)
    for bad in ("8x256x52", "8x256x0x52", "axbxcxd"):
        with pytest.raises(DarkspecError, match="bad-size"):
            cases.parse_size(bad)
    assert cli.main(["--size", "1x2x3"]) == 2
    assert cli.main(["--quick", "--case", "no-such-case"]) == 2
    assert cli.main(["--quick", "--threads", "0"]) == 2


def test_rotation_sets_cover_twice_the_cache_within_the_bounds():
    profile = cases.PROFILES["full"]
    assert cases.rotation_sets(10 << 20, profile, 100 << 20) == 16
    assert cases.rotation_sets(100 << 20, profile, 100 << 20) == 2
    assert cases.rotation_sets(1 << 30, profile, 100 << 20) == 2


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float64", 8)])
def test_bytes_moved_formulas(dtype, itemsize):
    shape = (2, 3, 4, 5)
    t = 2 * 3 * 4 * 5
    assert bytes_moved(Case("shortcut", "forward", 1), shape, dtype) == 3 * t * itemsize
    assert bytes_moved(Case("shortcut", "forward", 3, "per_channel", "softmax"), shape, dtype) == \
        (5 * t + 4 * 3) * itemsize
    # backward, linear, no weights: the output's gradient read, two input gradients written
    assert bytes_moved(Case("shortcut", "backward", 1), shape, dtype) == 3 * t * itemsize
    # a non-linear activation reads the output too; weights read x and the froms
    assert bytes_moved(Case("shortcut", "backward", 1, activation="leaky"), shape, dtype) == 4 * t * itemsize
    assert bytes_moved(Case("shortcut", "backward", 2, "per_feature", "relu", "mish"), shape, dtype) == \
        (2 * t + 3 * t + 3 + 3 * t + 3) * itemsize
    assert bytes_moved(Case("shortcut", "update", 2, "per_channel"), shape, dtype) == 4 * 9 * itemsize
    assert bytes_moved(Case("reorg3d", "forward"), shape, dtype) == 2 * t * itemsize


def test_every_case_key_is_unique_and_the_full_profile_covers_the_issue():
    keys = [c.key for c in cases.FULL_CASES]
    assert len(keys) == len(set(keys))
    full = cases.FULL_CASES
    assert {c.activation for c in full} >= {"linear", "leaky", "mish", "logistic"}
    assert {c.weights_type for c in full} == {"none", "per_feature", "per_channel"}
    assert {c.n_from for c in full if c.op == "shortcut"} == {1, 2, 3, 4}
    assert {(c.op, c.pass_) for c in full} == {("shortcut", "forward"), ("shortcut", "backward"),
                                               ("shortcut", "update"), ("reorg3d", "forward"), ("reorg", "forward")}
    sizes = cases.PROFILES["full"].sizes
    assert sizes[0] == (1, 64, 13, 13) and sizes[-1] == (16, 256, 76, 76)
    assert cases.PROFILES["full"].threads == (1, 2)
