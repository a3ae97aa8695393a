"""The conformance suite: every capability a backend declares, checked against the reference.

Two kinds of check feed each capability (op, dialect, dtype, pass):
- a property check: hypothesis draws cases for the capability and the backend's result is compared with the
  reference's on each (``tolerance_for``; permutations bit-exact);
- the golden cases (Darknet recordings and reference regression cases), replayed through the backend.

A capability the backend does not declare is reported as unsupported, never run and never counted as passed.

A case the backend names as a known difference (``Backend.known_difference``), and every case of a capability it
only probes (``Backend.probes``), is run too but counted apart: a known-difference result per reason, with the
backend's actual result (the largest error measured, or what it raised). It never fails the run; it answers "can I
run this layer there?".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy

from darkspec.backends.base import REORG_DIALECT, Backend, Capability, OpCase, capability_grid
from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance.compare import Comparison, Tolerance, compare, largest_magnitude
from darkspec.conformance.golden import Gate, gate
from darkspec.conformance.guard import BackendFault, GuardedBackend
from darkspec.conformance.ops import RECORDS, Call
from darkspec.conformance.vectors import FAIL, PASS_OF_CRASH, op_case, recording_dialect, replay
from darkspec.errors import DarkspecError
from darkspec.reference import contract

#: Examples per property check: quick is a smoke run, ci the default, thorough opt-in.
PROFILES = {"quick": 5, "ci": 25, "thorough": 300}

REFERENCE = ReferenceBackend()

#: Array names of a recording and the pass that produces them.
_UPDATE_ARRAYS = {"weights_after_update", "weight_updates_after_update"}


@dataclass
class CheckResult:
    """One check of one capability: how many examples ran, how many failed, and the first failure.

    With ``known_difference`` (the backend's reason), the cases the backend says it computes differently: how many
    of them differ, the worst measured comparison and the first failure; it is never a failure of the run."""

    capability: Capability
    check: str
    examples: int = 0
    failures: int = 0
    first_failure: str = ""
    known_difference: str = ""
    worst: str = ""
    worst_abs: float = -1.0

    @property
    def passed(self) -> bool:
        return self.failures == 0 or bool(self.known_difference)

    def add(self, problem: Comparison | str | None, where: str = ""):
        self.examples += 1
        if problem:
            self.failures += 1
            text = problem if isinstance(problem, str) else problem.describe()
            text = f"{where}: {text}" if where else text
            self.first_failure = self.first_failure or text
            if isinstance(problem, Comparison) and problem.max_abs > self.worst_abs:
                self.worst, self.worst_abs = text, problem.max_abs


@dataclass
class BackendReport:
    backend: Backend
    unavailable: str | None = None
    results: list[CheckResult] = field(default_factory=list)
    #: What failed the backend as a whole: its ``availability()`` or ``capabilities()`` broke the protocol.
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(not r.passed for r in self.results)


# --- property checks -------------------------------------------------------------------------------------------


def _first_problem(named_pairs, tolerance: Tolerance) -> Comparison | None:
    """The first of (name, expected, actual[, own tolerance]) that fails; None if all pass."""
    for name, expected, actual, *own in named_pairs:
        comparison = compare(name, expected, np.asarray(actual), own[0] if own else tolerance)
        if not comparison.passed:
            return comparison
    return None


def _check_shortcut_forward(backend, capability):
    def check(case):
        settings_ = dict(params=case.params, dialect=capability.dialect)
        expected = REFERENCE.shortcut_forward(case.x, case.froms, case.weights, **settings_)
        actual = backend.shortcut_forward(case.x, case.froms, case.weights, **settings_)
        tolerance = RECORDS["shortcut"].tolerance(case.x.dtype, largest_magnitude(case.x, *case.froms, expected))
        return _first_problem([("output", expected, actual)], tolerance)

    return check


def _check_shortcut_backward(backend, capability):
    def check(case):
        updates = None if case.weights is None else np.linspace(-1, 1, case.weights.size, dtype=case.weights.dtype)
        settings_ = dict(params=case.params, dialect=capability.dialect, weight_updates=updates)
        expected = REFERENCE.shortcut_backward(case.x, case.froms, case.weights, case.delta, **settings_)
        actual = backend.shortcut_backward(case.x, case.froms, case.weights, case.delta, **settings_)
        if len(actual.input_deltas) != len(expected.input_deltas):
            return f"{len(actual.input_deltas)} input deltas, expected {len(expected.input_deltas)}"
        pairs = [("delta_after_gradient", expected.delta, actual.delta)]
        pairs += [(f"input_deltas[{i}]", e, a) for i, (e, a) in enumerate(zip(expected.input_deltas,
                                                                                  actual.input_deltas))]
        dtype = case.x.dtype
        if expected.weight_updates is not None:
            pairs.append(("weight_updates", expected.weight_updates, actual.weight_updates,
                          sum_tolerance(dtype, expected.delta, [case.x, *case.froms], updates,
                                        expected.weight_updates)))
        magnitude = largest_magnitude(case.x, *case.froms, case.delta, expected.delta, *expected.input_deltas)
        return _first_problem(pairs, RECORDS["shortcut"].tolerance(dtype, magnitude))

    return check


def sum_tolerance(dtype, delta, inputs, initial, result) -> Tolerance:
    """A weight's gradient sums one term per element, and Darknet adds them one by one in the dtype: two orders of
    the same n terms may differ by up to n·ε·Σ|terms| (spec/tolerances.md). Σ|terms| <= Σ|delta|·max|input|; in
    ``exact`` the normalization's Jacobian scales the terms, which the result's own magnitude accounts for."""
    terms = (float(np.abs(delta).sum()) * largest_magnitude(*inputs) + largest_magnitude(initial)
             + largest_magnitude(result))
    count = delta.size
    return Tolerance(ulps=4, atol=count * float(np.finfo(dtype).eps) * terms)


def _check_shortcut_update(backend, capability):
    def check(case):
        expected = REFERENCE.shortcut_update(case.weights, case.weight_updates, case.hyper, capability.dialect)
        actual = backend.shortcut_update(case.weights, case.weight_updates, case.hyper, capability.dialect)
        tolerance = RECORDS["shortcut"].tolerance(case.weights.dtype,
                                                  largest_magnitude(case.weights, case.weight_updates, *expected))
        return _first_problem([("weights", expected[0], actual[0]), ("weight_updates", expected[1], actual[1])],
                              tolerance)

    return check


def _check_reorg(backend, capability):
    old = capability.op == "reorg"

    def check(case):
        if capability.pass_ == "forward":
            expected = REFERENCE.reorg_forward(case.x, case.stride, case.reverse, old)
            actual = backend.reorg_forward(case.x, case.stride, case.reverse, old)
        else:
            args = (case.delta, case.stride, case.reverse, old, case.previous_delta)
            expected, actual = REFERENCE.reorg_backward(*args), backend.reorg_backward(*args)
        tolerance = RECORDS[capability.op].tolerance(np.asarray(expected).dtype, largest_magnitude(expected))
        return _first_problem([(capability.pass_, expected, actual)], tolerance)

    return check


def _property_check(capability: Capability, backend) -> tuple[SearchStrategy, Callable]:
    """The op record's strategy of valid cases for the capability, and the comparison of one case."""
    if capability.op == "shortcut":
        check = {"forward": _check_shortcut_forward, "backward": _check_shortcut_backward,
                 "update": _check_shortcut_update}[capability.pass_](backend, capability)
    else:
        check = _check_reorg(backend, capability)
    return RECORDS[capability.op].cases(capability), check


def strategy_case(capability: Capability, case) -> OpCase:
    """A drawn case as the backend's :class:`OpCase`."""
    if capability.op == "shortcut":
        shapes = (case.x.shape, *(f.shape for f in case.froms)) if hasattr(case, "froms") else ()
        return OpCase("shortcut", capability.dialect, getattr(case, "params", None), shapes)
    return OpCase(capability.op, capability.dialect, input_shapes=(case.x.shape,), stride=case.stride,
                  reverse=bool(case.reverse))


def _reason(backend, capability: Capability, case: OpCase, probed: bool) -> str | None:
    reason = backend.known_difference(case)
    return reason or (f"{capability.label()} is not declared" if probed else None)


def run_checks(backend, capability: Capability, examples: int, probed: bool = False) -> list[CheckResult]:
    """Draw ``examples`` cases (derandomized: the same cases every run) and record every failure; nothing is
    shrunk, so the count is the count of failing draws. The first result holds the cases the backend claims; then
    one known-difference result per reason the backend gives (every case where ``probed``)."""
    strategy, check = _property_check(capability, backend)
    claimed = CheckResult(capability, "properties")
    known: dict[str, CheckResult] = {}

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        try:
            reason = _reason(backend, capability, strategy_case(capability, case), probed)
        except BackendFault as fault:
            claimed.add(str(fault))
            return
        try:
            problem = check(case)
        except BackendFault as fault:
            problem = str(fault)
        except Exception as error:  # a refusal where the reference computes, or the backend's own crash class
            problem = f"raised {type(error).__name__}: {error}"
        target = claimed if reason is None else known.setdefault(
            reason, CheckResult(capability, "properties", known_difference=reason))
        target.add(problem)

    run()
    return [claimed, *known.values()]


def run_property(backend, capability: Capability, examples: int) -> CheckResult:
    """The property check of the cases the backend claims (see :func:`run_checks`)."""
    return run_checks(backend, capability, examples)[0]


# --- refusals ----------------------------------------------------------------------------------------------------


def refusal_calls(backend, capability: Capability) -> list[tuple[str, str, Call]]:
    """(code, mistake, bad call) of every refusal the capability owes: the op record's error inputs that apply to
    its dialect and pass (and to the quirks the backend declares), and its valid call in each dtype of the contract
    that the backend does not declare for this op, dialect and pass (a dtype not declared is refused, not run)."""
    record = RECORDS[capability.op]
    calls = [(e.code, e.mistake, e.build(capability)) for e in record.errors_for(capability, backend.quirks())]
    for dtype in (*record.contract.dtypes, *record.contract.refused_dtypes):
        if backend.declared(capability.op, capability.dialect, dtype, capability.pass_) is None:
            calls.append(("bad-dtype", f"{dtype} inputs, which the backend does not declare",
                          record.valid_call(replace(capability, dtype=dtype))))
    return calls


def _arrays(value, name: str) -> dict[str, np.ndarray]:
    if isinstance(value, np.ndarray):
        return {name: value}
    if isinstance(value, (list, tuple)):
        return {f"{name}[{i}]": a for i, a in enumerate(value) if isinstance(a, np.ndarray)}
    return {}


def refusal_problem(backend, code: str, mistake: str, call: Call) -> str | None:
    """None if the backend refuses the bad call with ``DarkspecError(code)`` before writing anything (every input
    array unchanged), else what it did instead."""
    watched = {k: v for name, value in {**call.args, **call.settings}.items() for k, v in _arrays(value, name).items()}
    before = {name: a.copy() for name, a in watched.items()}
    try:
        getattr(backend, call.method)(*call.args.values(), **call.settings)
    except DarkspecError as error:
        if error.code != code:
            return f"{call.method} with {mistake}: refused with code {error.code!r}, the spec's is {code!r} ({error})"
    except BackendFault as fault:
        return f"{call.method} with {mistake}: {fault}, expected DarkspecError {code!r}"
    except Exception as error:  # BackendCrashed, or anything a backend outside the guard raises
        return f"{call.method} with {mistake}: raised {type(error).__name__}: {error}, expected DarkspecError {code!r}"
    else:
        return f"{call.method} with {mistake}: accepted, expected a refusal with DarkspecError {code!r}"
    changed = [name for name, a in watched.items() if a.tobytes() != before[name].tobytes()]
    if changed:
        return f"{call.method} with {mistake}: refused, but after writing into its input {', '.join(changed)}"
    return None


def run_refusals(backend, capability: Capability) -> CheckResult:
    """Every bad call the capability owes a refusal (``refusal_calls``), each one example of the check."""
    result = CheckResult(capability, "refusals")
    for code, mistake, call in refusal_calls(backend, capability):
        result.add(refusal_problem(backend, code, mistake, call))
    return result


# --- golden replays ---------------------------------------------------------------------------------------------


def _pass_of(array_name: str) -> str:
    if array_name in PASS_OF_CRASH:
        return PASS_OF_CRASH[array_name]
    if array_name == "output":
        return "forward"
    return "update" if array_name in _UPDATE_ARRAYS else "backward"


def run_golden(backend, recordings) -> list[CheckResult]:
    """Replay every golden case; a case counts once towards the capability of each pass it compares. A case that
    fails without a comparison (the backend raised, or returned no array) counts against its forward."""
    results: dict[tuple, CheckResult] = {}

    def add(capability, reason, problem, recording):
        if capability is not None:
            result = results.setdefault((capability, reason), CheckResult(capability, "golden",
                                                                          known_difference=reason or ""))
            result.add(problem, where=recording.name)

    for recording in recordings:
        try:
            case = op_case(recording)
            reason = None if case is None else backend.known_difference(case)
        except BackendFault as fault:
            add(_golden_capability(backend, recording, "output"), None, str(fault), recording)
            continue
        outcome = replay(recording, backend)
        problems: dict[Capability, Comparison | str | None] = {}
        for comparison in outcome.comparisons:
            capability = _golden_capability(backend, recording, comparison.name)
            if capability is not None and not problems.get(capability):
                problems[capability] = None if comparison.passed else comparison
        forward = _golden_capability(backend, recording, "output")
        if outcome.verdict == FAIL and not any(problems.values()) and forward is not None:
            problems[forward] = outcome.detail
        for capability, problem in problems.items():
            add(capability, reason, problem, recording)
    return list(results.values())


def _golden_capability(backend, recording, array_name) -> Capability | None:
    """The backend's declared capability (on its own device) that a recorded array checks, if any."""
    op, dialect, pass_ = recording.layer_type, _op_dialect(recording), _pass_of(array_name)
    known = op in contract.OPS and pass_ in contract.passes(op, dialect)
    return backend.declared(op, dialect, "float32", pass_) if known else None


def _op_dialect(recording) -> str:
    return recording_dialect(recording)[0].value if recording.layer_type == "shortcut" else REORG_DIALECT


def golden_capabilities(recordings) -> set[tuple[str, str, str]]:
    """The (op, dialect, dtype) that golden cases exist for: the recordings are float32."""
    return {(r.layer_type, _op_dialect(r), "float32") for r in recordings}


def check_golden(backend: GuardedBackend, capability: Capability, recordings) -> list[CheckResult]:
    """The golden check of one capability: the cases of its op and dialect, replayed through the passes up to its
    own (a backend that fails in backward does not fail its forward's check); the claimed cases' result, and one
    per known difference the backend names."""
    op, dialect = capability.op, capability.dialect
    passes = contract.passes(op, dialect)
    earlier = {c for c in backend.capabilities() if (c.op, c.dialect, c.dtype, c.device) ==
               (op, dialect, capability.dtype, capability.device)
               and passes.index(c.pass_) <= passes.index(capability.pass_)}
    cases = [r for r in recordings if (r.layer_type, _op_dialect(r)) == (op, dialect)]
    return [r for r in run_golden(backend.limited_to(earlier), cases) if r.capability == capability]


# --- the whole suite --------------------------------------------------------------------------------------------


def all_capabilities() -> list[Capability]:
    """Every capability some backend could declare: every op, dialect, dtype and pass of the contract."""
    return sorted(capability_grid())


def run_suite(backend: Backend, profile: str = "ci", golden=(), stop_at_first_failure=False) -> BackendReport:
    """Every check of every capability the backend declares. ``golden`` is a run's :class:`Gate` or the golden
    folders to pass through it. Whatever the backend does, the result is a report (it stands behind a guard)."""
    backend = backend if isinstance(backend, GuardedBackend) else GuardedBackend(backend)
    report = BackendReport(backend)
    try:
        report.unavailable = backend.availability()
        if report.unavailable:
            return report
        declared = sorted(backend.capabilities())
        backend.quirks()
    except BackendFault as fault:
        report.error = str(fault)
        return report
    if not isinstance(golden, Gate):
        folders, golden = [str(d) for d in golden], gate(golden)
        if golden.problems:
            raise DarkspecError("golden", folders, "folders of readable recordings", code="bad-golden",
                                reason="; ".join(golden.problems))
    if golden.recordings:
        report.results += [r for r in run_golden(backend, golden.recordings) if r.capability in declared]
        if stop_at_first_failure and report.failed:
            return report
    try:
        probed = sorted(backend.probes() - set(declared))
    except BackendFault as fault:
        report.error = str(fault)
        return report
    for capability in [*declared, *probed]:
        claimed, *known = run_checks(backend, capability, PROFILES[profile], probed=capability in probed)
        report.results += [claimed, *known] if claimed.examples or not known else known
        if capability in declared:
            report.results.append(run_refusals(backend, capability))
        if stop_at_first_failure and report.failed:
            break
    return report
