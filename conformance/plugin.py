"""The pytest plugin (entry point ``pytest11``: ``darkspec``): the conformance suite as pytest items.

``pytest --darkspec-backend NAME`` (a registered name or ``package.module:Class``; repeatable) collects one item per
backend, declared capability and check, with node ids that read like the matrix::

    shortcut/darknet-cpu/float32/backward/properties[torch]
    shortcut/darknet-cpu/float32/backward/golden[torch]
    shortcut/darknet-cpu/float32/backward/refusals[torch]

so that ``-k``, ``-x``, ``--lf``, ``--junitxml`` and ``-n auto`` (pytest-xdist) work as usual. Around them:

- ``golden/gate``: the golden folders checked against their manifests (the shipped ones and each
  ``--darkspec-golden DIR``); each problem names the file and the reason;
- ``backend/load[NAME]``, ``backend/availability[NAME]``, ``backend/protocol[NAME]``: a named backend that cannot
  be loaded fails, one that cannot run here is skipped with the reason, one whose ``capabilities()`` breaks the
  protocol fails.

Each item runs one check function of :mod:`darkspec.conformance.suite` behind the guard. A crash (segfault, abort)
of the backend ends only the pytest-xdist worker running it: xdist reports that item failed and starts a new worker.
A hang ends at the per-item limit (``--darkspec-timeout``): an alarm in the process running the item, and under
xdist pytest-timeout's thread method a little later for a hang the alarm cannot interrupt (inside C code), which
ends that worker like a crash. At the end the matrix is printed
and, with ``--darkspec-report-dir``, the JSON report written there.
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.reports import CollectReport

from darkspec.backends.base import Capability
from darkspec.backends.registry import UnavailableBackend, discover, load
from darkspec.conformance import golden as gold
from darkspec.conformance.guard import BackendFault, GuardedBackend
from darkspec.conformance.report import table, write_reports
from darkspec.conformance.suite import PROFILES, BackendReport, CheckResult, check_golden, golden_capabilities, \
    run_checks, run_refusals
from darkspec.errors import DarkspecError
from darkspec.folders import check_writable

#: Seconds one item may run before it counts as hung (``ci`` profile on a slow machine stays far below).
DEFAULT_TIMEOUT = 600.0
#: Seconds after the limit at which pytest-timeout ends a worker whose hang the alarm could not interrupt.
BACKSTOP = 30.0
CHECKS = ("properties", "golden", "refusals")
_CHECK_ID = re.compile(r"^(?P<op>[^/]+)/(?P<dialect>[^/]+)/(?P<dtype>[^/@]+)(?:@(?P<device>[^/]+))?/(?P<pass_>[^/]+)/"
                       r"(?P<check>[^/\[]+)\[(?P<backend>.+)\]$")
_BACKEND_ID = re.compile(r"^backend/(?P<what>[a-z]+)\[(?P<backend>.+)\]$")
GATE_ID = "golden/gate"


def check_id(backend: str, capability: Capability, check: str) -> str:
    device = "" if capability.device == "cpu" else f"@{capability.device}"
    return f"{capability.op}/{capability.dialect}/{capability.dtype}{device}/{capability.pass_}/{check}[{backend}]"


def pytest_addoption(parser):
    group = parser.getgroup("darkspec", "darkspec conformance suite")
    group.addoption("--darkspec-backend", action="append", default=[], metavar="NAME",
                    help="run the conformance suite on this backend: a registered name or package.module:Class "
                    "(repeatable)")
    group.addoption("--darkspec-all-backends", action="store_true",
                    help="run it on every built-in and registered backend (those that cannot run here are skipped)")
    group.addoption("--darkspec-profile", choices=list(PROFILES), default="ci",
                    help="hypothesis examples per property check: " +
                    ", ".join(f"{name} {count}" for name, count in PROFILES.items()))
    group.addoption("--darkspec-golden", action="append", default=[], metavar="DIR", type=Path,
                    help="a folder of your own recordings (with its manifest.json), on top of the shipped ones")
    group.addoption("--darkspec-no-golden", action="store_true", help="no golden cases, the property checks only")
    group.addoption("--darkspec-only", action="append", default=[], metavar="OP/DIALECT/PASS",
                    help="only these capabilities (repeatable; each part may be * for any)")
    group.addoption("--darkspec-dtype", action="append", default=[], metavar="DTYPE",
                    help="only capabilities in this dtype (repeatable)")
    group.addoption("--darkspec-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"an item running longer has hung and fails (default {DEFAULT_TIMEOUT:g})")
    group.addoption("--darkspec-report-dir", type=Path, default=None, metavar="DIR",
                    help="write the JSON report (conformance.json) there")
    group.addoption("--darkspec-suite-only", action="store_true",
                    help="collect no test files, only the conformance items (what `darkspec conformance` runs)")


def pytest_configure(config):
    if not (config.getoption("darkspec_backend") or config.getoption("darkspec_all_backends")):
        return
    report_dir = config.getoption("darkspec_report_dir")
    if report_dir is not None:
        try:
            check_writable(report_dir, "--darkspec-report-dir")
        except DarkspecError as error:
            raise pytest.UsageError(str(error)) from None
    for check in CHECKS:
        config.addinivalue_line("markers", f"{check}: the {check} check of a darkspec conformance item")
    config.pluginmanager.register(Conformance(config), "darkspec-conformance")


def pytest_ignore_collect(collection_path, config):
    return True if config.getoption("darkspec_suite_only") else None


@dataclass
class Loaded:
    """One backend of the run, as this process loaded it: guarded, or why it cannot run."""

    name: str
    backend: GuardedBackend
    not_loaded: str | None = None
    unavailable: str | None = None
    error: str | None = None


class Conformance:
    """The run: its backends, golden gate and settings, the items, and (on the controller) the results."""

    def __init__(self, config):
        self.config = config
        self.profile = config.getoption("darkspec_profile")
        self.timeout = config.getoption("darkspec_timeout")
        self.report_dir = config.getoption("darkspec_report_dir")
        self.only = [tuple(spec.split("/")) for spec in config.getoption("darkspec_only")]
        self.dtypes = config.getoption("darkspec_dtype")
        self._golden_dirs = [] if config.getoption("darkspec_no_golden") else \
            [gold.shipped(), *config.getoption("darkspec_golden")]
        self._gate = None
        self._backends = None
        #: node id -> (outcome, the check's results as the item reported them or None, its failure's last line)
        self.outcomes: dict[str, tuple[str, list[dict] | None, str]] = {}

    # --- what the run checks -------------------------------------------------------------------------------------

    @property
    def gate(self) -> gold.Gate:
        if self._gate is None:
            self._gate = gold.gate(self._golden_dirs)
        return self._gate

    @property
    def backends(self) -> list[Loaded]:
        if self._backends is None:
            named = self.config.getoption("darkspec_backend")
            found = [(spec, load(spec)) for spec in named] if named else [(b.name, b) for b in discover()]
            self._backends = [self._load(spec, backend, explicit=bool(named)) for spec, backend in found]
        return self._backends

    @staticmethod
    def _load(spec, backend, explicit) -> Loaded:
        guarded = GuardedBackend(backend)
        loaded = Loaded(guarded.name, guarded)
        if explicit and isinstance(backend, UnavailableBackend):
            loaded.not_loaded = backend.availability()
            return loaded
        try:
            loaded.unavailable = guarded.availability()
            if not loaded.unavailable:
                guarded.capabilities()
                guarded.quirks()
        except BackendFault as fault:
            loaded.error = str(fault)
        return loaded

    def selected(self, capability: Capability) -> bool:
        def matches(spec):
            wanted = (capability.op, capability.dialect, capability.pass_)
            return len(spec) == 3 and all(part in ("*", value) for part, value in zip(spec, wanted))
        return (not self.only or any(matches(spec) for spec in self.only)) and \
            (not self.dtypes or capability.dtype in self.dtypes)

    def run_check(self, loaded: Loaded, capability: Capability, check: str) -> list[CheckResult]:
        """The check's results: the claimed cases', then one per known difference the backend names."""
        if check == "properties":
            return run_checks(loaded.backend, capability, PROFILES[self.profile])
        if check == "refusals":
            return [run_refusals(loaded.backend, capability)]
        return check_golden(loaded.backend, capability, self.gate.recordings)

    # --- collection --------------------------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session, config, items):
        ours = [GateItem.from_parent(session, name=GATE_ID, nodeid=GATE_ID, run=self)]
        for loaded in self.backends:
            ours += self._items(session, loaded)
        items += ours
        # reported as collected, so that pytest's counts (collected, deselected, selected) include them
        config.hook.pytest_collectreport(report=CollectReport("darkspec", "passed", None, ours))

    def _items(self, session, loaded: Loaded):
        for what, problem in (("load", loaded.not_loaded), ("protocol", loaded.error),
                              ("availability", loaded.unavailable)):
            if problem:
                name = f"backend/{what}[{loaded.name}]"
                return [BackendItem.from_parent(session, name=name, nodeid=name, problem=problem,
                                                skip=what == "availability")]
        golden = golden_capabilities(self.gate.recordings)
        items = []
        for capability in sorted(loaded.backend.capabilities()):
            if not self.selected(capability):
                continue
            for check in CHECKS:
                if check == "golden" and (capability.op, capability.dialect, capability.dtype) not in golden:
                    continue
                name = check_id(loaded.name, capability, check)
                item = CheckItem.from_parent(session, name=name, nodeid=name, run=self, loaded=loaded,
                                             capability=capability, check=check)
                if _under_xdist(self.config):  # the backstop for a hang inside C code: ends the worker
                    item.add_marker(pytest.mark.timeout(self.timeout + BACKSTOP, method="thread"))
                items.append(item)
        return items

    # --- results (on the controller: every item's report comes here, a crashed worker's too) -------------------

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            properties = dict(report.user_properties)
            self.outcomes[report.nodeid] = (report.outcome, properties.get("darkspec"),
                                            _last_line(report.longreprtext))

    def pytest_terminal_summary(self, terminalreporter):
        if _under_xdist(self.config) or self.config.option.collectonly:
            return
        reports = self.backend_reports()
        terminalreporter.write_sep("=", "darkspec conformance matrix")
        terminalreporter.write_line(table(reports, self.gate.problems))
        if self.report_dir is not None:
            json_path = write_reports(reports, self.profile, self.report_dir, self.gate.problems)
            terminalreporter.write_line(f"report: {json_path}")

    def backend_reports(self) -> list[BackendReport]:
        reports = []
        for loaded in self.backends:
            report = BackendReport(loaded.backend, unavailable=loaded.unavailable or loaded.not_loaded,
                                   error=loaded.error)
            for nodeid, (outcome, data, last_line) in self.outcomes.items():
                match = _CHECK_ID.match(nodeid)
                if not match or match["backend"] != loaded.name:
                    continue
                parts = match.groupdict()
                capability = Capability(parts["op"], parts["dialect"], parts["dtype"], parts["pass_"],
                                        parts["device"] or "cpu")
                if data is not None:
                    report.results += [CheckResult(capability, parts["check"], **result) for result in data]
                elif outcome == "failed":  # no result came back: the worker crashed, or the item hung
                    report.results.append(CheckResult(capability, parts["check"], 1, 1, last_line))
            reports.append(report)
        return reports


def _under_xdist(config) -> bool:
    return hasattr(config, "workerinput")


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


class CheckFailed(Exception):
    """A check's own failure: reported as its message, without a traceback into the suite."""


class CheckHung(BaseException):
    """An item ran past its limit. A BaseException, so that neither the guard nor hypothesis takes it for the
    backend's answer (hypothesis would run the example again, and hang again)."""


@contextmanager
def time_limit(seconds: float):
    """Raise CheckHung in this thread after ``seconds`` (where the platform has SIGALRM and this is the main
    thread; elsewhere only the xdist backstop applies)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CheckHung(f"hung: no result within {seconds:g} s (--darkspec-timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class DarkspecItem(pytest.Item):
    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (CheckFailed, CheckHung)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, self.name


class CheckItem(DarkspecItem):
    def __init__(self, *, run: Conformance, loaded: Loaded, capability: Capability, check: str, **kwargs):
        super().__init__(**kwargs)
        self.run, self.loaded, self.capability, self.check = run, loaded, capability, check
        self.add_marker(getattr(pytest.mark, check))

    def runtest(self):
        with time_limit(self.run.timeout):
            results = self.run.run_check(self.loaded, self.capability, self.check)
        self.user_properties.append(("darkspec", [
            {"examples": r.examples, "failures": r.failures, "first_failure": r.first_failure,
             "known_difference": r.known_difference, "worst": r.worst, "worst_abs": r.worst_abs} for r in results]))
        if not any(r.examples for r in results):
            pytest.skip("no golden case compares this pass")
        for result in results:  # a known difference passes: its measured error is listed under the matrix
            if not result.passed:
                raise CheckFailed(f"{result.failures}/{result.examples} cases failed; first: {result.first_failure}")


class GateItem(DarkspecItem):
    def __init__(self, *, run: Conformance, **kwargs):
        super().__init__(**kwargs)
        self.run = run

    def runtest(self):
        if self.run.gate.problems:
            raise CheckFailed("\n".join(self.run.gate.problems))


class BackendItem(DarkspecItem):
    def __init__(self, *, problem: str, skip: bool, **kwargs):
        super().__init__(**kwargs)
        self.problem, self.skip = problem, skip

    def runtest(self):
        if self.skip:
            pytest.skip(f"unavailable: {self.problem}")
        raise CheckFailed(self.problem)
