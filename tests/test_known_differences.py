"""Known differences: cases a backend says it computes differently, run and reported apart with the measured error
(spec/third-party.md#known-differences-in-the-matrix)."""

import json

import numpy as np

from darkspec.backends.base import Capability
from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance.report import KNOWN, cell, json_report, table
from darkspec.conformance.suite import run_suite
from darkspec.errors import DarkspecError
from darkspec.reference import shortcut
from darkspec.reference.shortcut import WeightsType

FORWARD = Capability("shortcut", "darknet-cpu", "float32", "forward")


class IgnoresWeights(ReferenceBackend):
    """Computes the unweighted sum whatever the weights, and says so."""

    name = "ignores-weights"

    def capabilities(self):
        return frozenset({FORWARD})

    def probes(self):
        return frozenset({Capability("reorg3d", "darknet", "float32", "forward")})

    def known_difference(self, case):
        if case.op == "shortcut" and case.params.weights_type != WeightsType.NONE:
            return "weights ignored"
        return None

    def shortcut_forward(self, x, froms, weights, *, params, dialect, quirks=frozenset(), **_):
        shortcut.check_call("forward", x, froms, weights, params, dialect, quirks)  # the spec's refusals
        if x.dtype != np.float32:
            raise DarkspecError("x.dtype", str(x.dtype), "float32", code="bad-dtype")
        unweighted = shortcut.ShortcutParams(activation=params.activation)
        return shortcut.forward(x, froms, None, unweighted, dialect)


def test_a_known_difference_is_measured_and_does_not_fail_the_run():
    report = run_suite(IgnoresWeights(), "ci")
    assert not report.failed
    assert cell(report, FORWARD.label()).startswith("pass (") and cell(report, FORWARD.label()).endswith(KNOWN)
    known = [r for r in report.results if r.known_difference == "weights ignored"]
    assert known and known[0].failures and known[0].worst.startswith("output: abs ")
    assert f"{KNOWN}: weights ignored: {known[0].failures}/{known[0].examples} cases differ; worst: output" \
        in table([report])


def test_a_probed_capability_is_only_a_known_difference():
    report = run_suite(IgnoresWeights(), "quick")
    assert cell(report, "reorg3d/darknet/forward") == KNOWN
    reasons = {r.known_difference for r in report.results if r.capability.op == "reorg3d"}
    assert reasons == {"reorg3d/darknet/forward is not declared"}  # the reference's reorg3d agrees: 0 differ
    assert all(r.failures == 0 for r in report.results if r.capability.op == "reorg3d")


def test_known_differences_are_in_the_json_report():
    report = run_suite(IgnoresWeights(), "quick")
    results = json.loads(json.dumps(json_report([report], "quick")))["backends"][0]["results"]
    assert any(r["known_difference"] == "weights ignored" and r["worst"] for r in results)


def test_a_claimed_case_computed_wrongly_still_fails():
    class Overclaiming(IgnoresWeights):
        def known_difference(self, case):
            return None

    report = run_suite(Overclaiming(), "quick")
    assert report.failed and cell(report, FORWARD.label()).startswith("FAIL")


def test_a_known_difference_that_is_not_a_reason_is_a_failure():
    class Broken(IgnoresWeights):
        def known_difference(self, case):
            return np.float32(5)

    report = run_suite(Broken(), "quick")
    assert report.failed
    assert any("known_difference() returned" in r.first_failure for r in report.results)


def test_the_bench_does_not_time_a_known_difference():
    from darkspec.bench.cases import Case
    from darkspec.bench.contenders import capability_for

    shape = (1, 4, 8, 8)
    weighted = Case("shortcut", "forward", n_from=1, weights_type="per_channel", normalization="softmax")
    assert capability_for(IgnoresWeights(), weighted, "float32", shape) is None
    assert capability_for(IgnoresWeights(), Case("shortcut", "forward", n_from=1), "float32", shape) == FORWARD
