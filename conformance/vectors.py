"""``darkspec vectors``: replay Darknet recordings through a backend and compare every recorded array.

For each recording:
- a cfg that Darknet's parser refused must be refused by darkspec's parser too, or be accepted through a
  deliberate difference the spec names (``cfg.DELIBERATE_DIFFERENCES``);
- a cfg that Darknet ran must run the same here: forward, backward and update are compared array by array; where
  darkspec refuses it, the refusal must be a deliberate difference;
- a case where Darknet crashed must raise a ``DarkspecError`` at the same pass (or be refused at parse time).

The output is one line per case and a closing ``N passed, M failed, K skipped`` line. This is a stable interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np

from darkspec.backends.base import REORG_DIALECT, BackendCrashed, OpCase
from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance import recordings as rec
from darkspec.conformance.compare import Comparison, Tolerance, compare, largest_magnitude, tolerance_for
from darkspec.conformance.guard import BackendFault, GuardedBackend
from darkspec.errors import DarkspecError
from darkspec.reference.cfg import DELIBERATE_DIFFERENCES
from darkspec.reference.dialects import Dialect, Quirk
from darkspec.reference.network import Network, ReorgSection, parse_network
from darkspec.reference import activations
from darkspec.reference.shortcut import ShortcutParams, UpdateParams, WeightsType

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
#: The pass a recorded crash happened in.
PASS_OF_CRASH = {rec.CRASH_IN_FORWARD: "forward", rec.CRASH_AFTER_FORWARD: "backward"}

#: The dialect and quirks of the Darknet build each library's recordings come from (a recording may name its own
#: ``dialect`` and ``quirks`` in its parameters instead). The AlexeyAB recordings come from a CPU build.
RECORDING_DIALECTS = {
    "alexeyab": (
        Dialect.DARKNET_CPU,
        frozenset({Quirk.CPU_FASTPATH_INPUT_DIMS, Quirk.CPU_RELU6_ZERO, Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS}),
    ),
    "pjreddie": (Dialect.PJREDDIE, frozenset()),
}

EXACT = Tolerance.exact()
REFERENCE = ReferenceBackend()


def darknet_tolerance(recording: rec.Recording) -> Tolerance:
    """Against float32 Darknet (spec/tolerances.md#darknet-recordings): Darknet's -Ofast build rounds its sums and
    exp differently from the reference's correctly rounded ones; where a sum cancels, that error is small against
    its terms, not its result."""
    return tolerance_for(np.float32, largest_magnitude(*recording.arrays.values()))


@dataclass
class CaseResult:
    name: str
    verdict: str
    comparisons: list[Comparison] = field(default_factory=list)
    detail: str = ""

    def worst(self) -> Comparison | None:
        if not self.comparisons:
            return None
        failed = [c for c in self.comparisons if not c.passed]
        return (failed or sorted(self.comparisons, key=lambda c: (c.max_ulp, c.max_abs)))[-1]

    def line(self) -> str:
        worst = self.worst()
        text = f"{self.name:<48} {self.verdict}"
        if worst is not None:
            text += f"  worst {worst.describe()}"
        if self.detail:
            text += f"  ({self.detail})"
        return text


def recording_dialect(recording: rec.Recording):
    """The dialect and quirks to replay a recording in: its own, or those of the library that made it."""
    params = recording.params
    if "dialect" in params:
        try:
            return Dialect(params["dialect"]), frozenset(Quirk(q) for q in params.get("quirks", []))
        except ValueError as error:
            raise rec.RecordingError(recording.path, f"{error} (dialects: {', '.join(d.value for d in Dialect)}; "
                                     f"quirks: {', '.join(q.value for q in Quirk)})") from None
    if recording.library not in RECORDING_DIALECTS:
        raise rec.RecordingError(recording.path, f"library {recording.library!r} without a dialect: a recording "
                                 f"names its dialect, or comes from {' or '.join(RECORDING_DIALECTS)}")
    return RECORDING_DIALECTS[recording.library]


def _cfg_of(recording: rec.Recording) -> str:
    """The cfg whose semantics the arrays record: where the recording tool changed a setting after parsing, the
    cfg the parser refused holds that setting."""
    if recording.params.get("harness_env") and recording.params.get("rejected_cfg"):
        return recording.params["rejected_cfg"]["cfg"]
    return recording.cfg


def op_case(recording: rec.Recording) -> OpCase | None:
    """The recording's layer as an :class:`OpCase` (what ``Backend.known_difference`` judges); None where darkspec
    refuses its cfg or the layer is none of darkspec's ops."""
    dialect, _ = recording_dialect(recording)
    try:
        network = parse_network(_cfg_of(recording), "pjreddie" if dialect == Dialect.PJREDDIE else "alexeyab")
    except DarkspecError:
        return None
    layer = network.layers[-1] if network.layers else None
    if layer is None or layer.op is None:
        return None
    if isinstance(layer.op, ReorgSection):
        return OpCase(layer.type, REORG_DIALECT, input_shapes=((network.batch, *layer.input_shape),),
                      stride=layer.op.stride, reverse=layer.op.reverse)
    shapes = [(network.batch, *layer.input_shape)]
    shapes += [(network.batch, *network.layers[i].output_shape) for i in layer.op.from_layers]
    return OpCase("shortcut", dialect.value, layer.op.params, tuple(shapes))


def _deliberate(codes) -> str:
    return ", ".join(f"{code} ({DELIBERATE_DIFFERENCES[code]})" for code in codes)


def replay(recording: rec.Recording, backend=None) -> CaseResult:
    """Replay one recording through the backend (guarded: whatever the backend does is this case's verdict, and a
    recording that lacks what the replay needs is a failure naming the file)."""
    backend = backend if isinstance(backend, GuardedBackend) else GuardedBackend(backend or ReferenceBackend())
    try:
        return _replay(recording, backend)
    except BackendFault as fault:
        return CaseResult(recording.name, FAIL, detail=str(fault))
    except DarkspecError as error:  # a bad recording, or a refusal where Darknet ran
        return CaseResult(recording.name, FAIL, detail=str(error))


def replay_file(path, backend=None) -> CaseResult:
    """Load and replay one recording file; an unreadable one is a failure naming the file."""
    try:
        recording = rec.load_recording(path)
    except rec.RecordingError as error:
        return CaseResult(str(path), FAIL, detail=str(error))
    return replay(recording, backend)


def _replay(recording: rec.Recording, backend) -> CaseResult:
    name = recording.name
    if recording.layer_type not in ("shortcut", "reorg3d", "reorg"):
        return CaseResult(name, SKIP, detail=f"op [{recording.layer_type}] is not implemented")
    dialect, quirks = recording_dialect(recording)
    library = "pjreddie" if dialect == Dialect.PJREDDIE else "alexeyab"
    try:
        network = parse_network(_cfg_of(recording), library)
    except DarkspecError as error:
        if recording.status != rec.OK:
            return CaseResult(name, PASS, detail=f"Darknet {recording.status}; darkspec refuses: {error}")
        if error.code in DELIBERATE_DIFFERENCES:
            return CaseResult(name, PASS, detail=f"darkspec refuses deliberately: {_deliberate([error.code])}")
        return CaseResult(name, FAIL, detail=f"Darknet accepted the cfg; darkspec refuses: {error}")
    if recording.status == rec.PARSE_FAILED:
        if network.deviations:
            return CaseResult(name, PASS, detail=f"darkspec accepts deliberately: {_deliberate(network.deviations)}")
        return CaseResult(name, FAIL, detail="Darknet's parser refused the cfg; darkspec accepts it")
    layer = network.layers[-1]
    is_reorg = isinstance(layer.op, ReorgSection)
    capability = backend.declared(layer.type, REORG_DIALECT if is_reorg else dialect.value, "float32", "forward")
    if capability is None:
        return CaseResult(name, SKIP, detail=f"backend {backend.name} does not declare the float32 forward of "
                          f"{layer.type} in {REORG_DIALECT if is_reorg else dialect.value}")
    if not is_reorg:
        quirks = exercised_quirks(network, quirks)
        missing = sorted(q.value for q in quirks - backend.quirks())
        if missing:
            return CaseResult(name, SKIP, detail=f"needs quirk {', '.join(missing)}, which backend {backend.name} "
                              "does not declare")
    run = _replay_reorg if is_reorg else _replay_shortcut
    return run(recording, network, backend, capability, dialect, quirks)


def exercised_quirks(network: Network, quirks) -> frozenset[Quirk]:
    """Of the build's quirks, those that change this case's result."""
    layer = network.layers[-1]
    params = layer.shortcut.params
    used = set()
    if Quirk.CPU_FASTPATH_INPUT_DIMS in quirks and params.weights_type == WeightsType.NONE \
            and len(layer.shortcut.from_layers) == 1:
        source = network.layers[layer.shortcut.from_layers[0]]
        if source.input_shape == layer.input_shape != source.output_shape:
            used.add(Quirk.CPU_FASTPATH_INPUT_DIMS)
    if Quirk.CPU_RELU6_ZERO in quirks and params.activation == "relu6":
        used.add(Quirk.CPU_RELU6_ZERO)
    if Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS in quirks and params.activation in activations.SHORTCUT_UNEVALUATED:
        used.add(Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS)
    return frozenset(used)


class _Checker:
    """Collects comparisons of computed arrays against the recorded ones."""

    def __init__(self, recording: rec.Recording, tolerance: Tolerance):
        self.recording = recording
        self.tolerance = tolerance
        self.comparisons: list[Comparison] = []

    def check(self, name: str, actual, undefined=None):
        if name in self.recording.arrays:
            self.comparisons.append(compare(name, self.recording.arrays[name], actual, self.tolerance, undefined))

    def attempt(self, name: str, call: Callable[[], object]):
        """The value of a call that produces the array ``name``, or None with the backend's fault recorded as that
        array's failure."""
        try:
            return call()
        except BackendFault as fault:
            self.comparisons.append(Comparison(name, False, np.inf, np.inf, 0, problem=str(fault)))
            return None

    def result(self, detail: str = "") -> CaseResult:
        verdict = PASS if all(c.passed for c in self.comparisons) else FAIL
        return CaseResult(self.recording.name, verdict, self.comparisons, detail)


def _run_pass(recording, checker: _Checker, crash_status: str, call: Callable[[], object]):
    """Run one pass. Where Darknet crashed in it, darkspec must raise. Returns (finished result or None, value)."""
    crashed_here = recording.status == crash_status
    try:
        value = call()
    except DarkspecError as error:
        if crashed_here:
            return checker.result(f"Darknet {recording.status}; darkspec refuses: {error}"), None
        checker.comparisons.append(Comparison(crash_status, False, np.inf, np.inf, 0, problem=f"refused: {error}"))
        return checker.result(), None
    except BackendCrashed as error:
        if crashed_here and error.stage == PASS_OF_CRASH[crash_status]:
            return checker.result(f"Darknet {recording.status}; the backend stopped in {error.stage} too"), None
        problem = f"raised {type(error).__name__}: {error}"
        checker.comparisons.append(Comparison(crash_status, False, np.inf, np.inf, 0, problem=problem))
        return checker.result(), None
    except BackendFault as fault:  # a backend's own failure is a failed case, not the end of the run
        checker.comparisons.append(Comparison(crash_status, False, np.inf, np.inf, 0, problem=str(fault)))
        return checker.result(), None
    if crashed_here:
        return CaseResult(recording.name, FAIL, checker.comparisons,
                          f"Darknet {recording.status} but darkspec computed a result"), None
    return None, value


def _replay_reorg(recording, network: Network, backend, capability, dialect, quirks) -> CaseResult:
    op = network.layers[-1].reorg
    checker = _Checker(recording, EXACT)
    arrays = recording.arrays
    done, output = _run_pass(recording, checker, rec.CRASH_IN_FORWARD,
                             lambda: backend.reorg_forward(arrays["x"], op.stride, op.reverse, old=op.old))
    if done:
        return done
    checker.check("output", output)
    if "delta" in arrays and backend.supports(replace(capability, pass_="backward")):
        dx = checker.attempt("dx", lambda: backend.reorg_backward(arrays["delta"], op.stride, op.reverse, old=op.old,
                                                                  previous_delta=arrays["dx_init"]))
        if dx is not None:
            checker.check("dx", dx)
    return checker.result()


def _replay_shortcut(recording, network: Network, backend, capability, dialect, quirks) -> CaseResult:
    layer = network.layers[-1]
    op = layer.shortcut
    arrays = recording.arrays
    x = arrays["x"]
    froms = [arrays[f"from{i}"] for i in range(len(op.from_layers))]
    weights = arrays["weights"] if arrays.get("weights", np.empty(0)).size else None
    from_input_shapes = [network.layers[i].input_shape for i in op.from_layers]
    params: ShortcutParams = op.params
    checker = _Checker(recording, darknet_tolerance(recording))
    kwargs = dict(params=params, dialect=dialect.value, quirks=quirks, from_input_shapes=from_input_shapes)

    done, output = _run_pass(recording, checker, rec.CRASH_IN_FORWARD,
                             lambda: backend.shortcut_forward(x, froms, weights, **kwargs))
    if done:
        return done
    undefined = _undefined(x, froms, weights, kwargs)
    checker.check("output", output, undefined)
    if "delta" not in arrays or not backend.supports(replace(capability, pass_="backward")):
        return checker.result()

    done, grads = _run_pass(recording, checker, rec.CRASH_AFTER_FORWARD, lambda: backend.shortcut_backward(
        x, froms, weights, arrays["delta"], weight_updates=arrays.get("weight_updates_init"), **kwargs))
    if done:
        return done
    checker.check("delta_after_gradient", grads.delta, undefined)
    _check_input_deltas(recording, checker, layer.index, op.from_layers, grads.input_deltas)
    if grads.weight_updates is None:
        return checker.result()
    checker.check("weight_updates_after_backward", grads.weight_updates)
    if "weights_after_update" in arrays and backend.supports(replace(capability, pass_="update")):
        known = {f.name for f in fields(UpdateParams)}
        hyper = UpdateParams(**{key: value for key, value in recording.update.items() if key in known})
        updated = checker.attempt("weights_after_update", lambda: backend.shortcut_update(
            weights, grads.weight_updates, hyper, dialect=dialect.value))
        if updated is not None:
            checker.check("weights_after_update", updated[0])
            checker.check("weight_updates_after_update", updated[1])
    return checker.result()


def _undefined(x, froms, weights, kwargs):
    """The output elements the quirks leave undefined, as the spec (the reference, NaN there) fixes them; never
    taken from the backend under test, whose NaNs are failures like any other wrong value."""
    if Quirk.CPU_FASTPATH_INPUT_DIMS not in kwargs["quirks"]:
        return None
    return np.isnan(REFERENCE.shortcut_forward(x, froms, weights, **kwargs))


def _check_input_deltas(recording, checker, index, from_layers, input_deltas):
    """Darknet adds each input's delta into that layer's delta buffer, slot by slot; a layer named twice (or the
    previous layer named in from=) receives every one of its contributions, in slot order."""
    arrays = recording.arrays
    sources = [index - 1, *from_layers]
    initial = {"dx_init": index - 1, **{f"dfrom{i}_init": layer for i, layer in enumerate(from_layers)}}
    buffers = {layer: arrays[f"L{layer}_delta_init"].copy() for layer in sources if f"L{layer}_delta_init" in arrays}
    for name, layer in initial.items():
        if layer not in buffers and name in arrays:
            buffers[layer] = arrays[name].copy()
    for layer, contribution in zip(sources, input_deltas):
        buffers[layer] = buffers[layer] + contribution
    checker.check("dx", buffers[index - 1])
    for i, layer in enumerate(from_layers):
        checker.check(f"dfrom{i}", buffers[layer])
    for layer, value in buffers.items():
        checker.check(f"L{layer}_delta", value)


def run_vectors(paths, backend=None, write=print) -> int:
    """Replay every recording under ``paths``; print one line per case and the totals; return the exit status."""
    counts = {PASS: 0, FAIL: 0, SKIP: 0}
    backend = GuardedBackend(backend or ReferenceBackend())
    for path in rec.recording_paths(*paths):
        result = replay_file(path, backend)
        counts[result.verdict] += 1
        write(result.line())
    write(f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    return 1 if counts[FAIL] else 0
