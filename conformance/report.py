"""The conformance matrix: a terminal table and a JSON report, from the suite's results (the JUnit XML comes
from pytest, which runs the suite: darkspec.conformance.plugin)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tabulate import tabulate

import darkspec
from darkspec.conformance.suite import PROFILES, BackendReport, all_capabilities
from darkspec.provenance import git_revision

PASS, FAIL, UNSUPPORTED, UNAVAILABLE, ERROR = "pass", "FAIL", "unsupported", "unavailable", "ERROR"
KNOWN = "known difference"
NOT_RUN = "not run"


def _columns():
    """op/dialect/pass labels in a stable order."""
    return list(dict.fromkeys(c.label() for c in all_capabilities()))


#: The check that has its own column per backend: the refusals of bad calls; the other checks share one.
REFUSALS = "refusals"


def cell(report: BackendReport, label: str, refusals: bool = False) -> str:
    """One matrix cell: pass (checks run), FAIL (failed/run), unsupported, unavailable, ERROR (the backend broke
    the protocol before any check could run), or not run (declared, but left out by a selection); ``+ known
    difference`` (or only that) where the backend computes some cases differently by its own account, listed with
    the measured error under the table. ``refusals``: the refusals check's cell, else the other checks'."""
    if report.error:
        return ERROR
    if report.unavailable:
        return UNAVAILABLE
    results = [r for r in report.results if r.capability.label() == label and (r.check == REFUSALS) == refusals]
    claimed = [r for r in results if not r.known_difference]
    known = KNOWN if len(claimed) < len(results) else ""
    if not claimed:
        declared = any(c.label() == label for c in report.backend.capabilities())
        return known or (NOT_RUN if declared else UNSUPPORTED)
    examples = sum(r.examples for r in claimed)
    failures = sum(r.failures for r in claimed)
    verdict = f"{FAIL} {failures}/{examples}" if failures else f"{PASS} ({examples})"
    return f"{verdict} + {known}" if known else verdict


def known_difference_line(backend_name: str, results) -> str:
    """What the backend really computed where it is known to differ, over results of one capability and reason
    (golden and properties): how many cases differ, the largest error measured, the first failure."""
    results = list(results)
    c, reason = results[0].capability, results[0].known_difference
    examples, failures = sum(r.examples for r in results), sum(r.failures for r in results)
    measured = [r for r in results if r.worst]
    worst = max(measured, key=lambda r: r.worst_abs).worst if measured else ""
    first = next((r.first_failure for r in results if r.first_failure), "")
    text = f"{backend_name} {c.label()} {c.dtype}: {KNOWN}: {reason}: {failures}/{examples} cases differ"
    if worst:
        text += f"; worst: {worst}"
    if first and first != worst:
        text += f"; first: {first}"
    return text


def _known_groups(report: BackendReport) -> list[list]:
    groups: dict[tuple, list] = {}
    for result in report.results:
        if result.known_difference:
            groups.setdefault((result.capability, result.known_difference), []).append(result)
    return list(groups.values())


def table(reports: list[BackendReport], golden_problems=()) -> str:
    rows = [[label, *(cell(r, label) for r in reports), *(cell(r, label, refusals=True) for r in reports)]
            for label in _columns()]
    headers = ["op/dialect/pass", *(r.backend.name for r in reports),
               *(f"{r.backend.name} {REFUSALS}" for r in reports)]
    text = tabulate(rows, headers=headers)
    notes = [f"golden: {problem}" for problem in golden_problems]
    notes += [f"{r.backend.name}: unavailable: {r.unavailable}" for r in reports if r.unavailable]
    notes += [f"{r.backend.name}: ERROR: {r.error}" for r in reports if r.error]
    for report in reports:
        notes += [known_difference_line(report.backend.name, group) for group in _known_groups(report)]
        for result in report.results:
            if not result.passed:
                notes.append(f"{report.backend.name} {result.capability.label()} {result.capability.dtype} "
                             f"({result.check}): {result.failures}/{result.examples} failed; first: "
                             f"{result.first_failure}")
    return "\n".join([text, *notes])


def json_report(reports: list[BackendReport], profile: str, golden_problems=()) -> dict:
    return {
        "suite": "darkspec",
        "suite_version": darkspec.__version__,
        "git_revision": git_revision(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": {"name": profile, "examples_per_property": PROFILES[profile]},
        "platform": {"python": platform.python_version(), "machine": platform.machine(),
                     "system": platform.platform(), "numpy": np.__version__},
        "golden_problems": list(golden_problems),
        "backends": [
            {
                "name": r.backend.name,
                "available": not r.unavailable,
                "reason": r.unavailable,
                "error": r.error,
                "version": None if r.unavailable or r.error else r.backend.version(),
                "declared": [] if r.unavailable or r.error else [
                    {"op": c.op, "dialect": c.dialect, "dtype": c.dtype, "pass": c.pass_, "device": c.device}
                    for c in sorted(r.backend.capabilities())],
                "matrix": {label: cell(r, label) for label in _columns()},
                "refusals": {label: cell(r, label, refusals=True) for label in _columns()},
                "results": [
                    {"op": x.capability.op, "dialect": x.capability.dialect, "dtype": x.capability.dtype,
                     "pass": x.capability.pass_, "device": x.capability.device, "check": x.check,
                     "examples": x.examples, "failures": x.failures, "first_failure": x.first_failure or None,
                     "known_difference": x.known_difference or None, "worst": x.worst or None}
                    for x in r.results],
            }
            for r in reports
        ],
    }


def write_reports(reports: list[BackendReport], profile: str, directory: Path, golden_problems=()) -> Path:
    """conformance.json in ``directory`` (the JUnit XML comes from pytest's --junitxml)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "conformance.json"
    json_path.write_text(json.dumps(json_report(reports, profile, golden_problems), indent=1) + "\n")
    return json_path
