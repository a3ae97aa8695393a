"""``darkspec check MODEL.cfg``: will this model's fusion layers compute the same in every runtime? (spec/check.md)

For every ``[shortcut]``, ``[reorg3d]`` and ``[reorg]`` of a cfg: the features it uses, the quirks that fire, and
per runtime a verdict, ``same``, ``different`` or ``refused``, against the definition (the reference's
``darknet-cpu`` forward without quirks: spec/shortcut.md#forward, spec/reorg.md). The rule table
(:data:`RUNTIMES`, one rule function per runtime) says why; each verdict is then backed by running a small case
with the layer's channel structure through the backends of that runtime that are available here, and the run
decides. Runs are cached per distinct layer configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from darkspec.backends import registry
from darkspec.conformance.compare import Tolerance, compare, largest_magnitude, tolerance_for
from darkspec.errors import DarkspecError
from darkspec.reference import activations, reorg, shortcut
from darkspec.reference.cfg import DELIBERATE_DIFFERENCES, ShortcutSection, parse_shortcut
from darkspec.reference.contract import FLOORED_DIALECTS
from darkspec.reference.dialects import Dialect, Quirk
from darkspec.reference.network import ALEXEYAB_ONLY, Layer, Network, ReorgSection, parse_network
from darkspec.reference.shortcut import Normalization, ShortcutParams, WeightsType, cpu_quirks

SAME, DIFFERENT, REFUSED = "same", "different", "refused"
VERDICTS = (SAME, DIFFERENT, REFUSED)  # in order of severity
#: The batch of every run: the CPU fast-path bug shows from the second sample on.
RUN_BATCH = 2
#: Runs use at most this height and width (reorg layers: twice the stride), keeping every channel.
RUN_SPATIAL = 4
RELU_FLOOR = "relu-floor"
OPENCV_SPEC = "spec/check.md#opencv-4x"
PJREDDIE_SPEC = "spec/cfg.md#pjreddie"
REORG_SECTIONS_SPEC = "spec/reorg.md#2-which-darknet-has-which-section"
OLD_REORG_SPEC = "spec/reorg.md#6-old-reorg-reverse0-the-yolov2-passthrough"
ALEXEYAB_QUIRKS = frozenset(Quirk)
#: What each verdict compares with, by the library the cfg is written for.
DEFINITIONS = {
    "alexeyab": ("darknet-cpu", "the reference's darknet-cpu forward without quirks (spec/shortcut.md#forward, "
                 "spec/reorg.md)"),
    "pjreddie": ("pjreddie", "the reference's pjreddie forward (spec/shortcut.md#pjreddies-two-input-shortcut, "
                 "spec/reorg.md)"),
}


# --- a fusion layer and its features ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    slot: int
    layer: int
    shape: tuple[int, int, int]
    #: The PRN rule's channel relation to the output: previous (slot 0), equal, wider or narrower.
    relation: str


@dataclass(frozen=True)
class FusionLayer:
    index: int
    type: str
    line: int
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    inputs: tuple[Input, ...]
    #: The library the cfg is written for (alexeyab, or pjreddie for a cfg only pjreddie's parser reads).
    library: str = "alexeyab"
    #: The section as AlexeyAB's parser reads it, or the DarkspecError it refuses it with.
    params: ShortcutParams | None = None
    alexeyab_refusal: DarkspecError | None = None
    pjreddie_refusal: DarkspecError | None = None
    deviations: tuple[str, ...] = ()
    reorg: ReorgSection | None = None
    #: Shortcut only: whether each from layer's *input* shape is the shortcut's (C, H, W) (the CPU fast path's test).
    from_input_matches: tuple[bool, ...] = ()

    @property
    def weighted(self) -> bool:
        return self.params is not None and self.params.weights_type != WeightsType.NONE

    @property
    def froms(self) -> tuple[Input, ...]:
        return self.inputs[1:] if self.type == "shortcut" else ()

    def features(self) -> dict:
        if self.reorg is not None:
            return {"stride": self.reorg.stride, "reverse": self.reorg.reverse}
        params = self.params or ShortcutParams()
        return {"activation": params.activation, "weights_type": params.weights_type.value,
                "weights_normalization": params.weights_normalization.value,
                "prn": [i.relation for i in self.froms]}


def _relation(source_channels: int, channels: int) -> str:
    if source_channels == channels:
        return "equal"
    return "wider" if source_channels > channels else "narrower"


def fusion_layers(network: Network, library: str = "alexeyab") -> list[FusionLayer]:
    """Every [shortcut], [reorg3d] and [reorg] of the network (read as ``library``'s cfg) with its features. Each
    [shortcut] is parsed under both libraries on its own, so that one library's refusal of a layer does not hide
    the others."""
    found = []
    for layer in network.layers:
        if layer.type == "shortcut":
            found.append(_shortcut_layer(network, layer, library))
        elif layer.type in ("reorg3d", "reorg"):
            previous = Input(0, layer.index - 1, layer.input_shape, "previous")
            found.append(FusionLayer(layer.index, layer.type, layer.section.line, layer.input_shape,
                                     layer.output_shape, (previous,), library,
                                     reorg=layer.op if isinstance(layer.op, ReorgSection) else None))
    return found


def _shortcut_layer(network: Network, layer: Layer, library: str) -> FusionLayer:
    op = layer.op
    assert isinstance(op, ShortcutSection)  # the network parser parsed every [shortcut]
    parsed: dict[str, ShortcutSection | DarkspecError] = {}
    for reader in ("alexeyab", "pjreddie"):
        try:
            parsed[reader] = parse_shortcut(layer.section, layer.index, reader)
        except DarkspecError as error:
            parsed[reader] = error
    channels = layer.output_shape[0]
    inputs = [Input(0, layer.index - 1, layer.input_shape, "previous")]
    inputs += [Input(slot, source, network.layers[source].output_shape,
                     _relation(network.layers[source].output_shape[0], channels))
               for slot, source in enumerate(op.from_layers, start=1)]
    alexeyab = parsed["alexeyab"]
    if isinstance(alexeyab, ShortcutSection):
        spatial = next((i for i in inputs[1:] if i.shape[1:] != layer.input_shape[1:]), None)
        if spatial is not None:
            alexeyab = DarkspecError(f"{layer.section.where(layer.index)} from", spatial.layer,
                                     "a layer of the shortcut's spatial size", code="spatial-mismatch",
                                     reason="AlexeyAB's parser asserts equal spatial sizes")
    params = alexeyab.params if isinstance(alexeyab, ShortcutSection) and library == "alexeyab" else op.params
    return FusionLayer(
        layer.index, "shortcut", layer.section.line, layer.input_shape, layer.output_shape, tuple(inputs), library,
        params=params,
        alexeyab_refusal=alexeyab if isinstance(alexeyab, DarkspecError) else None,
        pjreddie_refusal=parsed["pjreddie"] if isinstance(parsed["pjreddie"], DarkspecError) else None,
        deviations=() if isinstance(alexeyab, DarkspecError) else alexeyab.deviations,
        from_input_matches=tuple(network.layers[source].input_shape == layer.input_shape
                                 for source in op.from_layers),
    )


# --- the rules --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One rule that fires for a layer in a runtime: its code, what it does and where the spec says so.
    ``reads_as`` rewrites the layer as the runtime reads it (the case a run computes); ``weight_dependent`` marks a
    difference that shows only for some weights."""

    code: str
    verdict: str
    reason: str
    spec: str
    reads_as: Callable | None = None
    weight_dependent: bool = False


def quirks_that_fire(layer: FusionLayer) -> list[Finding]:
    """Darknet's quirks and the dialect rules that make its own paths differ, for this layer (spec/check.md)."""
    if layer.reorg is not None:
        notes = []
        if layer.type == "reorg3d" and layer.reorg.reverse:
            notes.append(Finding(
                "reorg3d-reverse-not-inverse", DIFFERENT, "[reorg3d] reverse=1 is not the inverse of reverse=0",
                "spec/reorg.md#5-reorg3d-reverse1"))
        if layer.type == "reorg":
            notes.append(Finding(
                "reorg-old-permutation", DIFFERENT, "the old [reorg] is YOLOv2's permutation, not space-to-depth: "
                "a port that uses SpaceToDepth computes something else", OLD_REORG_SPEC))
        return notes
    found = []
    if fastpath_fires(layer):
        wider = layer.froms[0].relation == "wider"
        found.append(Finding(
            Quirk.CPU_FASTPATH_INPUT_DIMS.value, DIFFERENT, "the CPU adds the flat buffers, "
            + ("from the second sample on each adds channels of the first (batch > 1)" if wider
               else "reading past the from layer's buffer"), "spec/quirks.md#cpu-fastpath-input-dims"))
    if layer.params and layer.params.activation == "relu6":
        found.append(Finding(Quirk.CPU_RELU6_ZERO.value, DIFFERENT, "AlexeyAB's CPU [shortcut] outputs 0 for relu6",
                             "spec/quirks.md#cpu-relu6-zero"))
    if layer.params and layer.params.activation in activations.SHORTCUT_UNEVALUATED:
        found.append(Finding(Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS.value, DIFFERENT, f"[shortcut] outputs 0 for "
                             f"{layer.params.activation}", "spec/quirks.md#shortcut-unevaluated-activations"))
    if relu_floor_applies(layer):
        found.append(Finding(
            RELU_FLOOR, DIFFERENT, "the 0.001 floor of relu normalization: GPU training and inference differ "
            "from CPU training where a weight is at or below 0.001", "spec/dialects.md",
            weight_dependent=True))
    return found


def fastpath_fires(layer: FusionLayer) -> bool:
    """AlexeyAB's CPU fast path is taken, and is wrong: one unweighted from layer whose input (not output) has the
    shortcut's shape while its output's channels differ."""
    return (layer.type == "shortcut" and not layer.weighted and len(layer.froms) == 1
            and layer.from_input_matches[0] and layer.froms[0].relation != "equal")


def relu_floor_applies(layer: FusionLayer) -> bool:
    return layer.weighted and shortcut_params(layer).weights_normalization == Normalization.RELU


def shortcut_params(layer: FusionLayer) -> ShortcutParams:
    """A shortcut's parameters (every [shortcut] has them; the defaults stand in for a reorg)."""
    return layer.params or ShortcutParams()


#: Where the spec explains a parser refusal that is not a deliberate difference.
REFUSAL_SECTIONS = {"spatial-mismatch": "spec/cfg.md#spatial-sizes", "darknet-no-2d-layer":
                    "spec/cfg.md#darknets-network-parser"}


def _parser_refusal(error: DarkspecError, who: str) -> Finding:
    spec = DELIBERATE_DIFFERENCES.get(error.code) or REFUSAL_SECTIONS.get(error.code, "spec/cfg.md#errors")
    return Finding(
        error.code, REFUSED,
        f"{who}'s parser refuses it: {error.code}" + (f" ({error.reason})" if error.reason else ""),
        spec)


def _alexeyab_deviations(layer: FusionLayer) -> list[Finding]:
    """darkspec accepts, AlexeyAB's parser refuses (weights without a normalization, the 2020 key)."""
    return [Finding(code, REFUSED, f"AlexeyAB's parser refuses it ({code}; darkspec accepts it deliberately)",
                    DELIBERATE_DIFFERENCES[code]) for code in layer.deviations]


def alexeyab_path_rules(dialect: Dialect) -> set[str]:
    """Which of quirks_that_fire an AlexeyAB path has: the quirks the reference keeps in its dialect (the CPU's bugs
    are not on the GPU; inference runs the CPU code here), and the floor where the dialect has it."""
    codes = {quirk.value for quirk in cpu_quirks(ALEXEYAB_QUIRKS, dialect)}
    return codes | ({RELU_FLOOR} if dialect in FLOORED_DIALECTS else set())


def rules_alexeyab(dialect: Dialect):
    def rules(layer: FusionLayer) -> list[Finding]:
        if layer.alexeyab_refusal is not None:
            return [_parser_refusal(layer.alexeyab_refusal, "AlexeyAB")]
        return _alexeyab_deviations(layer) + [finding for finding in quirks_that_fire(layer)
                                              if finding.code in alexeyab_path_rules(dialect)]

    return rules


def _first_from_only(case):
    return dataclasses.replace(case, froms=case.froms[:1], weights=None,
                               params=dataclasses.replace(case.params, weights_type=WeightsType.NONE,
                                                          weights_normalization=Normalization.NONE))


def _without_weights(case):
    return dataclasses.replace(case, weights=None, params=dataclasses.replace(
        case.params, weights_type=WeightsType.NONE, weights_normalization=Normalization.NONE))


def _with_relu(case):
    return dataclasses.replace(case, params=dataclasses.replace(case.params, activation="relu"))


def _forward_only(case):
    return dataclasses.replace(case, reverse=False)


def _chain(*steps):
    def rewrite(case):
        for step in steps:
            case = step(case)
        return case

    return rewrite


def rules_pjreddie(layer: FusionLayer) -> list[Finding]:
    """pjreddie's 2018 Darknet: no [reorg3d]; a [shortcut] reads one from=, ignores the weights keys with a warning,
    and runs relu for an activation it does not know (spec/cfg.md#pjreddie, spec/cfg.md#activation)."""
    if layer.type == "reorg3d":
        return [Finding("no-reorg3d", REFUSED, "pjreddie has no [reorg3d] section", REORG_SECTIONS_SPEC)]
    if layer.type == "reorg":
        return []
    found = []
    if layer.alexeyab_refusal is not None and layer.alexeyab_refusal.code != "spatial-mismatch":
        return [_parser_refusal(layer.alexeyab_refusal, "darkspec")]
    if len(layer.froms) > 1:
        found.append(Finding(
            "first-from-only", DIFFERENT, "pjreddie reads only the first from= entry (silently)", PJREDDIE_SPEC,
            _first_from_only))
    if layer.weighted:
        found.append(Finding(
            "weights-ignored", DIFFERENT,
            "pjreddie ignores weights_type (an 'Unused field' warning): an unweighted sum",
            PJREDDIE_SPEC, _without_weights))
    activation = shortcut_params(layer).activation
    if activation not in activations.PJREDDIE_NAMES:
        found.append(Finding(
            "unknown-activation", DIFFERENT, f"pjreddie has no {activation}: its parser runs relu instead",
            "spec/cfg.md#activation", _with_relu))
    return found


def rules_opencv(layer: FusionLayer) -> list[Finding]:
    """OpenCV 4.x's Darknet importer, as measured against the reference (spec/check.md#opencv-4x)."""
    if layer.type == "reorg3d":
        return [Finding(
            "no-reorg3d", REFUSED, "OpenCV's importer has no [reorg3d] ('Unknown layer type')", OPENCV_SPEC)]
    if layer.type == "reorg":
        if layer.reorg is not None and layer.reorg.reverse:
            return [Finding("reverse-ignored", DIFFERENT, "OpenCV ignores reverse=1 of [reorg]", OPENCV_SPEC,
                            _forward_only)]
        return []
    if layer.alexeyab_refusal is not None:
        if layer.alexeyab_refusal.code == "spatial-mismatch":
            return [Finding(
                "spatial-assert", REFUSED, "OpenCV asserts on a shortcut of another spatial size", OPENCV_SPEC)]
        return [_parser_refusal(layer.alexeyab_refusal, "darkspec")]
    found = []
    if shortcut_params(layer).activation == "relu6":
        found.append(Finding("relu6-refused", REFUSED, "OpenCV's importer refuses relu6", OPENCV_SPEC))
    if len(layer.froms) > 1:
        found.append(Finding(
            "first-from-only", DIFFERENT, "OpenCV uses only the first from= entry (silently)", OPENCV_SPEC,
            _first_from_only))
    if layer.weighted:
        found.append(Finding(
            "weights-ignored", DIFFERENT, "OpenCV ignores the shortcut's weights and does not skip them in the "
            ".weights file: every later layer reads shifted weights", OPENCV_SPEC,
            _without_weights))
    return found


def rules_inference_export(layer: FusionLayer) -> list[Finding]:
    """The ONNX export computes the darknet-inference dialect without Darknet's CPU bugs: the folded weights,
    with the 0.001 floor."""
    if layer.alexeyab_refusal is not None:
        return [_parser_refusal(layer.alexeyab_refusal, "darkspec")]
    found = [f for f in quirks_that_fire(layer) if f.code == RELU_FLOOR]
    expressible = onnx_activations()
    if layer.params and expressible is not None and layer.params.activation not in expressible:
        found.append(Finding("activation-not-exportable", REFUSED, f"the export has no ONNX form of "
                             f"{layer.params.activation}", "spec/check.md#the-runtimes"))
    return found


def onnx_activations():
    """The activations darkspec.export.onnx can express, or None where onnx is not installed."""
    try:
        from darkspec.export import onnx as export
    except ImportError:
        return None
    return frozenset(export.ACTIVATIONS)


def rules_darkspec_backend(layer: FusionLayer) -> list[Finding]:
    """darkspec's own backends compute the definition, in the dialect of the cfg's library; like it they refuse
    what [shortcut] does not evaluate."""
    refusal = layer.pjreddie_refusal if layer.library == "pjreddie" else layer.alexeyab_refusal
    if refusal is not None:
        return [_parser_refusal(refusal, "darkspec")]
    if layer.params and layer.params.activation in activations.SHORTCUT_UNEVALUATED:
        return [Finding("activation-not-evaluated", REFUSED, "Darknet's [shortcut] outputs 0 for it)",
                        "spec/quirks.md#shortcut-unevaluated-activations")]
    return []


# --- the runtimes -----------------------------------------------------------------------------------------------



@dataclass(frozen=True)
class Runner:
    """A backend that computes what the runtime computes: its name, the dialect and the quirks to ask for."""

    backend: str
    #: None: the definition's dialect (darkspec's own backends compute the definition).
    dialect: str | None
    quirks: frozenset = frozenset()


@dataclass(frozen=True)
class Runtime:
    name: str
    label: str
    rules: Callable[[FusionLayer], list[Finding]]
    runners: tuple[Runner, ...]
    #: What a missing backend means for this runtime (printed with the backend's own reason).
    missing: str = ""


RUNTIMES = (
    Runtime("darknet-cpu", "AB CPU train", rules_alexeyab(Dialect.DARKNET_CPU),
            (Runner("reference", "darknet-cpu", ALEXEYAB_QUIRKS), Runner("darknet", "darknet-cpu"))),
    Runtime("darknet-gpu", "AB GPU train", rules_alexeyab(Dialect.DARKNET_GPU),
            (Runner("reference", "darknet-gpu", ALEXEYAB_QUIRKS), Runner("cupy", "darknet-gpu"),
             Runner("torch-cuda", "darknet-gpu"))),
    Runtime("darknet-inference", "AB inference", rules_alexeyab(Dialect.DARKNET_INFERENCE),
            (Runner("reference", "darknet-inference", ALEXEYAB_QUIRKS),)),
    Runtime("pjreddie", "pjreddie", rules_pjreddie, (Runner("darknet", "pjreddie"), Runner("reference", "pjreddie"))),
    Runtime("opencv", "OpenCV", rules_opencv, (Runner("opencv", "darknet-inference"),)),
    Runtime("onnx", "ONNX", rules_inference_export, (Runner("onnxruntime", "darknet-inference"),)),
    Runtime("torch", "torch", rules_darkspec_backend, (Runner("torch", None),)),
    Runtime("cupy", "cupy", rules_darkspec_backend, (Runner("cupy", None),)),
)
RUNTIME_NAMES = tuple(runtime.name for runtime in RUNTIMES)


# --- a run ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShortcutCase:
    x: np.ndarray
    froms: tuple
    weights: np.ndarray | None
    params: ShortcutParams
    from_input_shapes: tuple | None


@dataclass(frozen=True)
class ReorgCase:
    x: np.ndarray
    stride: int
    reverse: bool
    old: bool


def _small(size: int, limit: int) -> int:
    return min(size, limit)


def make_case(layer: FusionLayer, weights: np.ndarray | None = None):
    """The layer's channel structure at batch RUN_BATCH and a small spatial size, with seeded inputs. Without
    ``weights``, a weighted layer gets witness weights: seeded normal values with slot 1's first weight set to
    -0.5, so that a relu-normalized input is dead and the 0.001 floor shows. Layers of one configuration get the
    same case (the cache of runs relies on it)."""
    configuration = (layer.type, layer.input_shape, [i.shape for i in layer.inputs], layer.params, layer.reorg,
                     layer.from_input_matches)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(repr(configuration).encode()).digest()[:8], "little"))
    c, h, w = layer.input_shape
    if layer.reorg is not None:
        limit = 2 * layer.reorg.stride
        shape = (RUN_BATCH, c, _small(h, limit), _small(w, limit))
        return ReorgCase(rng.standard_normal(shape).astype(np.float32), layer.reorg.stride, layer.reorg.reverse,
                         layer.type == "reorg")
    small_h, small_w = _small(h, RUN_SPATIAL), _small(w, RUN_SPATIAL)
    x = rng.standard_normal((RUN_BATCH, c, small_h, small_w)).astype(np.float32)
    froms = tuple(rng.standard_normal((RUN_BATCH, i.shape[0], max(1, i.shape[1] * small_h // h),
                                       max(1, i.shape[2] * small_w // w))).astype(np.float32) for i in layer.froms)
    params = shortcut_params(layer)
    if params.weights_type != WeightsType.NONE and weights is None:
        weights = rng.standard_normal(shortcut.weight_count(params.weights_type, len(froms), c)).astype(np.float32)
        weights[shortcut.weights_per_input(params.weights_type, c)] = -0.5
    matches = [(c, small_h, small_w) if match else None for match in layer.from_input_matches]
    weights = np.array(weights, np.float32) if params.weights_type != WeightsType.NONE else None
    return ShortcutCase(x, froms, weights, params,
                        tuple(matches) if any(matches) else None)


def case_key(case) -> str:
    """Equal keys for equal cases: the cache of runs."""
    digest = hashlib.sha256()
    if isinstance(case, ReorgCase):
        digest.update(repr(("reorg", case.x.shape, case.stride, case.reverse, case.old)).encode())
        digest.update(case.x.tobytes())
        return digest.hexdigest()
    digest.update(repr((case.x.shape, [f.shape for f in case.froms], case.params, case.from_input_shapes)).encode())
    for array in (case.x, *case.froms, *(() if case.weights is None else (case.weights,))):
        digest.update(array.tobytes())
    return digest.hexdigest()


def definition(case, dialect: str = "darknet-cpu") -> np.ndarray:
    """What the layer means: the reference's forward in the cfg's library's dialect, without quirks. For an
    activation [shortcut] does not evaluate, that activation of the weighted sum."""
    if isinstance(case, ReorgCase):
        return (reorg.reorg_old_forward if case.old else reorg.reorg3d_forward)(case.x, case.stride, case.reverse)
    params = case.params
    if params.activation in activations.SHORTCUT_UNEVALUATED:
        linear = shortcut.forward(case.x, case.froms, case.weights, dataclasses.replace(params, activation="linear"),
                                  dialect=dialect)
        return activations.activate(params.activation, linear)
    return shortcut.forward(case.x, case.froms, case.weights, params, dialect=dialect)


def compute(backend, runner: Runner, case) -> np.ndarray:
    if isinstance(case, ReorgCase):
        return backend.reorg_forward(case.x, case.stride, case.reverse, case.old)
    params = case.params
    if runner.dialect == "pjreddie":
        # pjreddie reads no weights keys
        params = ShortcutParams(activation=params.activation, alpha=params.alpha, beta=params.beta)
    quirks = runner.quirks if runner.backend == "reference" else frozenset()
    return backend.shortcut_forward(case.x, list(case.froms), case.weights, params=params, dialect=runner.dialect,
                                    quirks=quirks, from_input_shapes=case.from_input_shapes)


@dataclass
class Run:
    """One backend's run of one case: ``outcome`` is same, different, refused, failed or not run."""

    backend: str
    dialect: str | None
    outcome: str
    detail: str = ""
    max_abs: float | None = None

    def describe(self) -> str:
        return f"{self.backend} ({self.dialect}): {self.outcome}" + (f": {self.detail}" if self.detail else "")


class Runs:
    """Backends loaded once, and runs cached per (runner, case)."""

    def __init__(self, backends: dict | None = None):
        self._backends = dict(backends or {})
        self._cache: dict = {}
        #: Backend names no registry knows here.
        self.unknown: set[str] = set()

    def backend(self, name: str):
        if name not in self._backends:
            try:
                self._backends[name] = registry.load(name)
            except DarkspecError:
                self.unknown.add(name)
                self._backends[name] = registry.UnavailableBackend(name, f"no backend named {name!r} is installed")
        return self._backends[name]

    def unavailable(self, name: str) -> str | None:
        return self.backend(name).availability()

    def run(self, runner: Runner, case, expected) -> Run:
        key = (runner, case_key(case))
        if key not in self._cache:
            self._cache[key] = self._run(runner, case, expected)
        return self._cache[key]

    def _run(self, runner: Runner, case, expected) -> Run:
        backend = self.backend(runner.backend)
        reason = backend.availability()
        if reason:
            return Run(runner.backend, runner.dialect, "not run", reason)
        if runner.backend == "darknet" and not _declares(backend, runner, case):
            return Run(runner.backend, runner.dialect, "not run", "this Darknet library does not run it "
                       f"(it declares {', '.join(sorted(backend.dialects))})")
        try:
            actual = compute(backend, runner, case)
        except DarkspecError as error:
            return Run(runner.backend, runner.dialect, "refused", f"{error.code}: {error}")
        except Exception as error:  # a broken backend is reported, not raised
            return Run(runner.backend, runner.dialect, "failed", f"{type(error).__name__}: {error}")
        if isinstance(expected, DarkspecError):
            return Run(runner.backend, runner.dialect, "not compared", f"the definition refuses it: {expected.code}")
        return _compared(runner, case, expected, actual)


def _declares(backend, runner: Runner, case) -> bool:
    op = ("reorg" if case.old else "reorg3d") if isinstance(case, ReorgCase) else "shortcut"
    dialect = "darknet" if isinstance(case, ReorgCase) else runner.dialect
    return backend.declared(op, dialect, "float32", "forward") is not None


def _compared(runner: Runner, case, expected, actual) -> Run:
    actual = np.asarray(actual)
    if isinstance(case, ReorgCase):
        tolerance = Tolerance.exact()
    else:
        inputs = [case.x, *case.froms, *(() if case.weights is None else (case.weights,))]
        tolerance = tolerance_for(np.float32, largest_magnitude(*inputs, expected, actual))
    result = compare("output", expected, actual, tolerance)
    if result.passed:
        return Run(runner.backend, runner.dialect, SAME, f"max abs {result.max_abs:.3g}", result.max_abs)
    undefined = int(np.isnan(actual).sum()) if actual.shape == expected.shape else 0
    detail = result.describe() + (f"; {undefined} element(s) undefined (NaN)" if undefined else "")
    return Run(runner.backend, runner.dialect, DIFFERENT, detail, result.max_abs)


# --- verdicts ---------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    runtime: str
    verdict: str
    findings: list[Finding]
    runs: list[Run]
    #: The rule table said one thing and the runs showed another (the runs decide).
    disagrees: bool = False

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "rule_verdict": rule_verdict(self.findings), "disagrees": self.disagrees,
                "reasons": [{"verdict": f.verdict, "reason": f.reason, "spec": f.spec,
                             "weight_dependent": f.weight_dependent} for f in self.findings],
                "runs": [dataclasses.asdict(run) for run in self.runs]}


def rule_verdict(findings: list[Finding]) -> str:
    return max((f.verdict for f in findings), key=VERDICTS.index, default=SAME)


def judge(layer: FusionLayer, runtime: Runtime, runs: Runs, weights=None, definition_dialect="darknet-cpu") -> Verdict:
    """The rule table's verdict, then the runs of the case as the runtime reads it; where something ran, the run
    decides (a refusal by the runtime's own parser cannot be run and stands as the rule says)."""
    findings = runtime.rules(layer)
    ruled = rule_verdict(findings)
    if ruled == REFUSED or (layer.type == "shortcut" and layer.params is None):
        return Verdict(runtime.name, REFUSED, findings, [])
    case = make_case(layer, weights)
    expected = _definition_or_refusal(case, definition_dialect)
    read = case
    for finding in findings:
        if finding.reads_as is not None:
            read = finding.reads_as(read)
    runners = [runner if runner.dialect else dataclasses.replace(runner, dialect=definition_dialect)
               for runner in runtime.runners]
    done = [runs.run(runner, read, expected) for runner in runners]
    ran = [run for run in done if run.outcome in (SAME, DIFFERENT, REFUSED, "failed")]
    if not ran:
        return Verdict(runtime.name, ruled, findings, done)
    shown = max((DIFFERENT if run.outcome == "failed" else run.outcome for run in ran), key=VERDICTS.index)
    weight_dependent_only = all(f.weight_dependent for f in findings if f.verdict == DIFFERENT)
    disagrees = shown != ruled and not (ruled == DIFFERENT and shown == SAME and weights is not None
                                        and weight_dependent_only)
    return Verdict(runtime.name, shown, findings, done, disagrees)


def _definition_or_refusal(case, dialect):
    try:
        return definition(case, dialect)
    except DarkspecError as error:
        return error


# --- the whole model --------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    layer: FusionLayer
    quirks: list[Finding]
    verdicts: dict[str, Verdict]

    def to_json(self) -> dict:
        layer = self.layer
        return {"index": layer.index, "type": layer.type, "line": layer.line,
                "input_shape": list(layer.input_shape), "output_shape": list(layer.output_shape),
                "inputs": [{"slot": i.slot, "layer": i.layer, "shape": list(i.shape), "relation": i.relation}
                           for i in layer.inputs],
                "features": layer.features(), "deviations": list(layer.deviations),
                "quirks": [{"reason": q.reason, "spec": q.spec} for q in self.quirks],
                "runtimes": {name: verdict.to_json() for name, verdict in self.verdicts.items()}}


@dataclass
class ModelReport:
    path: str
    network: Network
    library: str
    layers: list[LayerReport]
    runtimes: tuple[Runtime, ...]
    #: Per runtime, what concerns the model as a whole (sections it lacks, weights it misreads).
    model_findings: dict[str, list[Finding]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def model_verdict(self, runtime: str) -> str:
        verdicts = [report.verdicts[runtime].verdict for report in self.layers]
        verdicts += [f.verdict for f in self.model_findings.get(runtime, [])]
        return max(verdicts, key=VERDICTS.index, default=SAME)

    def to_json(self) -> dict:
        return {"cfg": self.path, "library": self.library, "definition": DEFINITIONS[self.library][1],
                "input_shape": list(self.network.input_shape), "batch": self.network.batch,
                "run": {"batch": RUN_BATCH, "spatial": RUN_SPATIAL},
                "model": {rt.name: {"label": rt.label, "verdict": self.model_verdict(rt.name),
                                    "reasons": [{"verdict": f.verdict, "reason": f.reason, "spec": f.spec}
                                                for f in self.model_findings.get(rt.name, [])]}
                          for rt in self.runtimes},
                "unavailable": self.unavailable,
                "layers": [report.to_json() for report in self.layers]}


def parse_model(text: str) -> tuple[Network, str]:
    """The layer table: AlexeyAB's, or pjreddie's for a cfg only pjreddie's parser reads (resnet50's strided
    shortcuts). A cfg neither reads raises AlexeyAB's error."""
    try:
        return parse_network(text, "alexeyab"), "alexeyab"
    except DarkspecError as alexeyab_error:
        try:
            return parse_network(text, "pjreddie"), "pjreddie"
        except DarkspecError:
            raise alexeyab_error from None


ALEXEYAB_RUNTIMES = ("darknet-cpu", "darknet-gpu", "darknet-inference")


def model_findings(network: Network, library: str, layers: list[FusionLayer]) -> dict[str, list[Finding]]:
    found: dict[str, list[Finding]] = {}
    refused = next(((layer.index, layer.alexeyab_refusal) for layer in layers if layer.alexeyab_refusal), None)
    if library == "pjreddie" and refused is not None:
        index, error = refused
        for name in ALEXEYAB_RUNTIMES:
            found.setdefault(name, []).append(Finding(
                error.code, REFUSED, f"AlexeyAB's parser refuses the model at layer {index} ({error.code})",
                "spec/cfg.md#spatial-sizes"))
    alexeyab_only = next((layer for layer in network.layers if layer.type in ALEXEYAB_ONLY), None)
    if alexeyab_only is not None:
        found.setdefault("pjreddie", []).append(Finding(
            "unknown-layer-type", REFUSED,
            f"the model has [{alexeyab_only.type}] (layer {alexeyab_only.index}), a section only AlexeyAB's "
            "Darknet has", "spec/cfg.md#shapes"))
    if "darknet-no-2d-layer" in network.deviations:
        for name in ALEXEYAB_RUNTIMES:
            found.setdefault(name, []).append(_parser_refusal(
                DarkspecError("network", None, "", code="darknet-no-2d-layer"), "AlexeyAB"))
    for runtime, known, effect in (("pjreddie", activations.PJREDDIE_NAMES, "its parser runs relu instead"),):
        unknown = _activations_outside(network, known)
        for name, indices in unknown.items():
            found.setdefault(runtime, []).append(Finding(
                "unknown-activation", DIFFERENT, f"pjreddie has no {name}: {effect} ({_layer_list(indices)})",
                "spec/cfg.md#activation"))
    relu6 = _activations_outside(network, set(activations.ALEXEYAB_NAMES) - {"relu6"}).get("relu6")
    if relu6:
        found.setdefault("opencv", []).append(Finding(
            "relu6-refused", REFUSED, f"OpenCV's importer refuses relu6 ({_layer_list(relu6)})",
            OPENCV_SPEC))
    weighted = [layer.index for layer in layers if layer.weighted]
    if weighted:
        found.setdefault("opencv", []).append(Finding(
            "weights-shifted", DIFFERENT,
            f"every layer after layer {weighted[0]} reads shifted weights: OpenCV does not skip the "
            "shortcut weights in the .weights file", OPENCV_SPEC))
    return found


def _layer_list(indices: list[int], shown: int = 6) -> str:
    text = ", ".join(map(str, indices[:shown]))
    return f"layers {text}" + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


def _activations_outside(network: Network, known) -> dict[str, list[int]]:
    """Activation names of any layer that are not in ``known``, with the layers that use them."""
    found: dict[str, list[int]] = {}
    for layer in network.layers:
        name = layer.section.options.get("activation")
        if name is not None and name not in known:
            found.setdefault(name, []).append(layer.index)
    return found


def check_model(text: str, path: str = "", runtimes=RUNTIMES, runs: Runs | None = None,
                weights: dict[int, np.ndarray] | None = None) -> ModelReport:
    """The report of ``darkspec check`` for cfg text; ``weights`` are shortcut weights by layer index (from a
    .weights file) to run with instead of the witness weights."""
    network, library = parse_model(text)
    runs = runs or Runs()
    layers = fusion_layers(network, library)
    reports = []
    for layer in layers:
        layer_weights = (weights or {}).get(layer.index)
        verdicts = {rt.name: judge(layer, rt, runs, layer_weights, DEFINITIONS[library][0]) for rt in runtimes}
        reports.append(LayerReport(layer, quirks_that_fire(layer), verdicts))
    unavailable = {}
    for rt in runtimes:
        for runner in rt.runners:
            reason = runs.unavailable(runner.backend)
            if reason:
                missing = f": {rt.missing}" if runner.backend in runs.unknown and rt.missing else ""
                unavailable[runner.backend] = reason + missing
    findings = {name: f for name, f in model_findings(network, library, layers).items()
                if name in {r.name for r in runtimes}}
    return ModelReport(path, network, library, reports, tuple(runtimes), findings, unavailable)


def shortcut_weights_of(network: Network, weights) -> dict[int, np.ndarray]:
    """The shortcut weights of a read weights file, by layer index (what check_model runs with)."""
    return {index: entry.arrays["weights"] for index, entry in weights.layers.items()
            if network.layers[index].type == "shortcut"}


def select_runtimes(names) -> tuple[Runtime, ...]:
    if not names:
        return RUNTIMES
    unknown = [name for name in names if name not in RUNTIME_NAMES]
    if unknown:
        raise DarkspecError("--runtime", unknown[0], ", ".join(RUNTIME_NAMES), code="unknown-runtime")
    return tuple(rt for rt in RUNTIMES if rt.name in names)


def failing(report: ModelReport, fail_on: str | None) -> bool:
    """``--fail-on different``: any runtime different or refused; ``--fail-on refused``: any refused."""
    if fail_on is None:
        return False
    threshold = VERDICTS.index(fail_on)
    return any(VERDICTS.index(report.model_verdict(rt.name)) >= threshold for rt in report.runtimes)


# --- the table ----------------------------------------------------------------------------------------------------


def _inputs_text(layer: FusionLayer) -> str:
    return ", ".join(str(i.layer) for i in layer.inputs)


def _features_text(layer: FusionLayer) -> str:
    if layer.reorg is not None:
        return f"stride {layer.reorg.stride}" + (", reverse" if layer.reorg.reverse else "")
    params = layer.params or ShortcutParams()
    text = params.activation
    if layer.weighted:
        text += f", {params.weights_type.value}/{params.weights_normalization.value}"
    unequal = [i.relation for i in layer.froms if i.relation != "equal"]
    return text + (f", PRN {'/'.join(unequal)}" if unequal else "")


class Notes:
    """Numbered notes under the table: one per distinct runtime and reason, with the layers it concerns."""

    def __init__(self):
        self.entries: dict[tuple, dict] = {}

    def mark(self, key: tuple, text: str, layer: int | None, evidence: str = "") -> int:
        entry = self.entries.setdefault(key, {"number": len(self.entries) + 1, "text": text, "layers": [],
                                              "evidence": evidence})
        if layer is not None and layer not in entry["layers"]:
            entry["layers"].append(layer)
        return entry["number"]

    def lines(self) -> list[str]:
        out = []
        for entry in self.entries.values():
            where = f" (layers {', '.join(map(str, entry['layers']))})" if entry["layers"] else ""
            out.append(f"[{entry['number']}] {entry['text']}{where}")
            if entry["evidence"]:
                out.append(f"    {entry['evidence']}")
        return out


def _cell(verdict: Verdict, runtime: Runtime, layer: int, notes: Notes) -> str:
    if verdict.verdict == SAME and not verdict.disagrees:
        ran = any(run.outcome == SAME for run in verdict.runs)
        return SAME if ran else f"{SAME}*"
    findings = [f for f in verdict.findings if f.verdict != SAME]
    evidence = "; ".join(run.describe() for run in verdict.runs)
    marks = [notes.mark((runtime.name, f.reason), f"{runtime.label}, {f.verdict}: {f.reason} ({f.spec})", layer,
                        f"run (layer {layer}): {evidence}" if evidence else "")
             for f in findings]
    if verdict.disagrees:
        marks.append(notes.mark((runtime.name, "disagrees", layer), f"{runtime.label}: the run disagrees with the "
                                f"rule table ({rule_verdict(verdict.findings)})", layer, f"run: {evidence}"))
    ran = any(run.outcome in (SAME, DIFFERENT, REFUSED, "failed") for run in verdict.runs)
    suffix = "" if ran or verdict.verdict == REFUSED and not verdict.runs else "*"
    return f"{verdict.verdict} [{','.join(map(str, marks))}]{suffix}"


def render(report: ModelReport) -> str:
    """The table of ``darkspec check``: one row per fusion layer, one column per runtime, numbered notes below."""
    from tabulate import tabulate

    notes = Notes()
    headers = ["layer", "type", "inputs", "features", "quirks", *(rt.label for rt in report.runtimes)]
    rows: list[list] = []
    for layer_report in report.layers:
        layer = layer_report.layer
        rows.append([layer.index, layer.type, _inputs_text(layer), _features_text(layer),
                     ", ".join(q.code for q in layer_report.quirks) or "-",
                     *(_cell(layer_report.verdicts[rt.name], rt, layer.index, notes) for rt in report.runtimes)])
    model_row = ["model", "", "", "", ""]
    for rt in report.runtimes:
        marks = [notes.mark((rt.name, f.reason), f"{rt.label}, {f.verdict}: {f.reason} ({f.spec})", None)
                 for f in report.model_findings.get(rt.name, [])]
        model_row.append(report.model_verdict(rt.name) + (f" [{','.join(map(str, marks))}]" if marks else ""))
    rows.append(model_row)
    net = report.network
    lines = [f"{report.path or 'cfg'}: {len(report.layers)} fusion layer(s) of {len(net.layers)}; input "
             f"{'x'.join(map(str, net.input_shape))}, batch {net.batch}; read as {report.library}'s cfg",
             f"verdicts against {DEFINITIONS[report.library][1]}; each run: batch {RUN_BATCH}, at most "
             f"{RUN_SPATIAL}x{RUN_SPATIAL} "
             "(reorg: twice the stride), every channel; * not run here: the rule table's verdict", "",
             tabulate(rows, headers=headers, maxcolwidths=[None, None, 12, 20, 20] + [14] * len(report.runtimes))]
    lines += [""] + notes.lines() if notes.entries else []
    for backend, reason in sorted(report.unavailable.items()):
        lines.append(f"{backend}: not run: {reason}")
    return "\n".join(lines)
