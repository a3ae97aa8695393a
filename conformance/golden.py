"""The golden gate: the files under ``golden/``, their manifest, and the reference regression cases.

``golden/`` holds two kinds of case, both in the recording format of ``golden/darknet-vectors``: what real Darknet
computed (never regenerated), and regression cases that the reference computes from the generators registered here,
each with a fixed seed. ``golden/manifest.json`` lists every file with its sha256, so that any change to the data is
a visible, reviewed change:

- :func:`verify` checks the tree against the manifest, and :func:`gate` every golden folder of a run (each
  conformance run passes through it before any backend runs);
- :func:`record` regenerates the reference cases, rewrites their manifest entries and reports, array by array,
  what changed.

A generator takes a seeded ``numpy.random.Generator`` and returns the case's arrays and parameters; its docstring
is the case's description.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

import darkspec
from darkspec.conformance import recordings as rec
from darkspec.conformance.vectors import recording_dialect
from darkspec.reference import reorg, shortcut
from darkspec.reference.dialects import Dialect
from darkspec.reference.shortcut import ShortcutParams, UpdateParams

MANIFEST = "manifest.json"
#: The package that holds the shipped golden folder (the repository's golden/, installed as package data).
PACKAGE = "darkspec.golden"
#: The folder of the reference regression cases, inside the golden folder.
REFERENCE_DIR = "reference"
LIBRARY = "darkspec-reference"
DARKNET_RECORDING, REFERENCE_REGRESSION, PROVENANCE = "darknet-recording", "reference-regression", "provenance"
#: The update settings a recording holds (the replay builds its UpdateParams from these).
UPDATE_KEYS = ("learning_rate", "momentum", "decay", "batch", "learning_rate_scale")

Arrays = dict[str, np.ndarray]


# --- the registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    seed: int
    generate: Callable[[np.random.Generator], tuple[Arrays, dict]]

    def build(self) -> tuple[Arrays, dict]:
        """The case's arrays and its full parameters, as the recording format writes them."""
        arrays, params = self.generate(np.random.default_rng(self.seed))
        params = {
            "name": self.name, "description": self.description, "status": rec.OK, "library": LIBRARY,
            "quirks": [], "generator": self.generate.__name__, "seed": self.seed,
            "darkspec_version": darkspec.__version__, **params,
        }
        return arrays, params


CASES: dict[str, Case] = {}


def case(seed: int):
    """Register a generator under its function's name, with its docstring as the description."""

    def register(generate):
        CASES[generate.__name__] = Case(generate.__name__, " ".join(inspect.getdoc(generate).split()), seed, generate)
        return generate

    return register


# --- building a case --------------------------------------------------------------------------------------------


def _draw(rng, shape, scale=2.0) -> np.ndarray:
    # Uniform doubles are plain random bits scaled: the draw least likely to change between NumPy versions.
    return rng.uniform(-scale, scale, shape).astype(np.float32)


def _conv(filters: int) -> str:
    return f"[convolutional]\nfilters={filters}\nsize=1\nstride=1\npad=0\nactivation=linear\n"


def _cfg(batch, channels, size, layer_channels, section) -> str:
    """``[net]``, one 1x1 convolution per earlier layer (giving it its channel count), then the case's section."""
    height, width = size
    net = f"[net]\nbatch={batch}\nsubdivisions=1\nwidth={width}\nheight={height}\nchannels={channels}\n"
    return "\n".join([net, *(_conv(c) for c in layer_channels), section])


def _section(name, options) -> str:
    return "".join([f"[{name}]\n", *(f"{key}={value}\n" for key, value in options.items())])


def _shortcut_options(params: ShortcutParams, n_from: int, dialect: Dialect) -> dict:
    """The [shortcut] keys for layer ``n_from + 1``, whose from layers are layers 0..n_from-1."""
    return {"from": ",".join(str(i - n_from - 1) for i in range(n_from)), **_shortcut_settings(params, dialect)}


def shortcut_case(rng, dialect, params: ShortcutParams, *, channels: int, from_channels, weights=None,
                  update: UpdateParams | None = None, batch: int = 2, size=(2, 2), updates_scale: float = 1.0):
    """A [shortcut] case: inputs drawn from ``rng``, forward, backward (unless the dialect has none) and, given
    ``update``, one update step, all computed by the reference. Deltas and the weight-update accumulator start
    non-zero, as in the Darknet recordings, so that adding into them shows."""
    dialect = Dialect(dialect)
    x = _draw(rng, (batch, channels, *size))
    froms = [_draw(rng, (batch, c, *size)) for c in from_channels]
    arrays = {"x": x, **{f"from{i}": f for i, f in enumerate(froms)}}
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        arrays["weights"] = weights
    settings = dict(params=params, dialect=dialect)
    arrays["output"] = shortcut.forward(x, froms, weights, **settings)
    if dialect != Dialect.DARKNET_INFERENCE:
        arrays.update(_shortcut_backward(rng, x, froms, weights, settings, update, updates_scale))
    n_from = len(froms)
    section = _section("shortcut", _shortcut_options(params, n_from, dialect))
    return arrays, {
        "dialect": dialect.value,
        "cfg": _cfg(batch, channels, size, [*from_channels, channels], section),
        "from_abs": list(range(n_from)),
        "update": {key: getattr(update, key) for key in UPDATE_KEYS} if update else None,
        **_shortcut_settings(params, dialect),
    }


def _shortcut_backward(rng, x, froms, weights, settings, update, updates_scale) -> Arrays:
    delta = _draw(rng, x.shape)
    initial = {"dx_init": _draw(rng, x.shape), **{f"dfrom{i}_init": _draw(rng, f.shape) for i, f in enumerate(froms)}}
    arrays = {"delta": delta, **initial}
    weight_updates = None
    if weights is not None:
        weight_updates = _draw(rng, weights.shape, updates_scale)
        arrays["weight_updates_init"] = weight_updates
    grads = shortcut.backward(x, froms, weights, delta, weight_updates=weight_updates, **settings)
    arrays["delta_after_gradient"] = grads.delta
    # Darknet adds each input's share into that layer's delta.
    for (name, before), share in zip(initial.items(), grads.input_deltas):
        arrays[name.removesuffix("_init")] = before + share
    if weights is None or grads.weight_updates is None:
        return arrays
    arrays["weight_updates_after_backward"] = grads.weight_updates
    if update:
        after = shortcut.update(weights, grads.weight_updates, update, settings["dialect"])
        arrays["weights_after_update"], arrays["weight_updates_after_update"] = after
    return arrays


def _shortcut_settings(params: ShortcutParams, dialect: Dialect) -> dict:
    """The layer's settings in its dialect's keys (pjreddie's [shortcut] has alpha and beta, no weights)."""
    if dialect == Dialect.PJREDDIE:
        return {"activation": params.activation, "alpha": params.alpha, "beta": params.beta}
    return {"activation": params.activation, "weights_type": params.weights_type.value,
            "weights_normalization": params.weights_normalization.value}


def reorg_case(rng, *, old: bool, stride: int, reverse: bool, shape, dialect=Dialect.DARKNET_CPU):
    """A [reorg3d] (or, ``old``, [reorg]) case: forward and backward by the reference. Darknet overwrites the
    previous delta in backward, so ``dx`` does not depend on ``dx_init``."""
    forward, backward = ((reorg.reorg_old_forward, reorg.reorg_old_backward) if old
                         else (reorg.reorg3d_forward, reorg.reorg3d_backward))
    batch, channels, *size = shape
    x = _draw(rng, shape)
    output = forward(x, stride, reverse)
    delta = _draw(rng, output.shape)
    arrays = {"x": x, "output": output, "delta": delta, "dx_init": _draw(rng, shape),
              "dx": backward(delta, stride, reverse)}
    section = _section("reorg" if old else "reorg3d", {"stride": stride, "reverse": int(reverse)})
    # The replay parses the cfg by the dialect's library: pjreddie or AlexeyAB. The permutation is the same in both.
    return arrays, {"dialect": Dialect(dialect).value, "cfg": _cfg(batch, channels, size, [channels], section),
                    "from_abs": [], "update": None, "stride": stride, "reverse": int(reverse)}


# --- the cases ------------------------------------------------------------------------------------------------

TRAIN = UpdateParams(learning_rate=0.1, momentum=0.9, decay=0.0005, batch=2)


@case(seed=101)
def cpu_per_feature_relu(rng):
    """darknet-cpu, per_feature relu, two from layers, leaky: relu zeroes the negative weight of slot 1; the
    weight gradient is delta*input, summed in Darknet's order; update with decay."""
    params = ShortcutParams("per_feature", "relu", "leaky")
    return shortcut_case(rng, "darknet-cpu", params, channels=3, from_channels=(3, 3), weights=[0.7, -0.4, 1.3],
                         update=TRAIN)


@case(seed=102)
def cpu_per_channel_softmax(rng):
    """darknet-cpu, per_channel softmax over two slots, logistic (Darknet's gradient from the output)."""
    params = ShortcutParams("per_channel", "softmax", "logistic")
    return shortcut_case(rng, "darknet-cpu", params, channels=3, from_channels=(3,),
                         weights=_draw(rng, 6), update=TRAIN)


@case(seed=103)
def cpu_per_channel_none(rng):
    """darknet-cpu, per_channel weights used raw (normalization none), two from layers, linear; strong decay."""
    params = ShortcutParams("per_channel", "none", "linear")
    update = UpdateParams(learning_rate=0.05, momentum=0.8, decay=0.01, batch=4, learning_rate_scale=0.5)
    return shortcut_case(rng, "darknet-cpu", params, channels=2, from_channels=(2, 2),
                         weights=_draw(rng, 6), update=update)


@case(seed=104)
def cpu_prn_unequal_channels(rng):
    """darknet-cpu PRN rule, per_feature none: from0 has fewer channels (2 of 4) and from1 more (6): each adds into
    the first min(C) channels only, and its delta comes back there only."""
    params = ShortcutParams("per_feature", "none", "relu")
    return shortcut_case(rng, "darknet-cpu", params, channels=4, from_channels=(2, 6),
                         weights=[0.9, 1.5, -0.6], update=TRAIN)


@case(seed=201)
def gpu_unweighted_prn(rng):
    """darknet-gpu without weights, from layers of 1 and 5 channels into 3 (PRN rule), relu6."""
    params = ShortcutParams(activation="relu6")
    return shortcut_case(rng, "darknet-gpu", params, channels=3, from_channels=(1, 5))


@case(seed=202)
def gpu_per_channel_relu_floor(rng):
    """darknet-gpu, per_channel relu: weights at or below 0.001 (negative, zero, 0.0005, 0.001) count as 0.001;
    surrogate weight gradient; large accumulated updates are clipped to +-1, no decay."""
    params = ShortcutParams("per_channel", "relu", "leaky")
    weights = [0.5, -0.2, 0.0005, 0.001, 0.0, 1.5]
    return shortcut_case(rng, "darknet-gpu", params, channels=3, from_channels=(3,), weights=weights,
                         update=TRAIN, updates_scale=4.0)


@case(seed=203)
def gpu_per_feature_softmax_large_weights(rng):
    """darknet-gpu, per_feature softmax with weights near 90 (exp would overflow float32 without the max
    subtraction), revleaky (the GPU's gradient for it is not the derivative)."""
    params = ShortcutParams("per_feature", "softmax", "revleaky")
    return shortcut_case(rng, "darknet-gpu", params, channels=2, from_channels=(2, 2),
                         weights=[90.0, 88.5, -40.0], update=TRAIN)


@case(seed=301)
def inference_per_channel_relu_floor(rng):
    """darknet-inference, per_channel relu: weights folded once with the 0.001 floor; forward only."""
    params = ShortcutParams("per_channel", "relu", "linear")
    weights = [1.2, -0.5, 0.0002, 0.0, 0.3, 0.001]
    return shortcut_case(rng, "darknet-inference", params, channels=3, from_channels=(3,), weights=weights)


@case(seed=302)
def inference_per_feature_softmax_large_weights(rng):
    """darknet-inference, per_feature softmax with weights in the hundreds, folded once; tanh; forward only."""
    params = ShortcutParams("per_feature", "softmax", "tanh")
    return shortcut_case(rng, "darknet-inference", params, channels=2, from_channels=(2, 2),
                         weights=[300.0, 301.0, 299.5])


@case(seed=401)
def exact_per_feature_softmax_gelu(rng):
    """exact, per_feature softmax, gelu: the true derivatives of the activation (Darknet's gelu gradient is not)
    and of the softmax, eps term included."""
    params = ShortcutParams("per_feature", "softmax", "gelu")
    return shortcut_case(rng, "exact", params, channels=2, from_channels=(2,), weights=[0.3, -0.8],
                         update=TRAIN)


@case(seed=402)
def exact_per_channel_relu(rng):
    """exact, per_channel relu with a negative and a zero weight (no gradient through them), elu."""
    params = ShortcutParams("per_channel", "relu", "elu")
    weights = [0.8, -0.3, 0.0, 1.1, 0.6, 0.4]
    return shortcut_case(rng, "exact", params, channels=2, from_channels=(2, 2), weights=weights, update=TRAIN)


@case(seed=501)
def pjreddie_from_fewer_alpha_beta(rng):
    """pjreddie, from 2 channels into 4, alpha=0.5 beta=2, leaky: the previous layer gets alpha*delta everywhere,
    the from layer beta*delta where the two meet."""
    params = ShortcutParams(activation="leaky", alpha=0.5, beta=2.0)
    return shortcut_case(rng, "pjreddie", params, channels=4, from_channels=(2,))


@case(seed=502)
def pjreddie_from_more_channels(rng):
    """pjreddie, from 5 channels into 3 (the extra channels are dropped), logistic."""
    params = ShortcutParams(activation="logistic")
    return shortcut_case(rng, "pjreddie", params, channels=3, from_channels=(5,))


@case(seed=601)
def reorg3d_forward_s2(rng):
    """[reorg3d] stride=2 reverse=0 (SpaceToDepth, DCR), batch 2, 3 channels 4x4."""
    return reorg_case(rng, old=False, stride=2, reverse=False, shape=(2, 3, 4, 4))


@case(seed=602)
def reorg3d_reverse_s2(rng):
    """[reorg3d] stride=2 reverse=1: 16 channels 2x2, the input reinterpreted before DepthToSpace."""
    return reorg_case(rng, old=False, stride=2, reverse=True, shape=(1, 16, 2, 2))


@case(seed=603)
def reorg_old_forward_s2(rng):
    """Old [reorg] stride=2 reverse=0 (YOLOv2's), parsed by pjreddie's rules: batch 2, 4 channels 4x2."""
    return reorg_case(rng, old=True, stride=2, reverse=False, shape=(2, 4, 4, 2), dialect=Dialect.PJREDDIE)


@case(seed=604)
def reorg_old_reverse_s2(rng):
    """Old [reorg] stride=2 reverse=1 (DepthToSpace), 8 channels 2x2."""
    return reorg_case(rng, old=True, stride=2, reverse=True, shape=(1, 8, 2, 2))


# --- writing a case -----------------------------------------------------------------------------------------------


def npz_bytes(arrays: Arrays, params: dict) -> bytes:
    """The case as an uncompressed ``.npz``, byte for byte the same wherever it is written.

    ``np.savez`` already dates its entries 1980-01-01, but each entry also records the system that wrote it (0 on
    Windows, 3 elsewhere), and compression would depend on the zlib build: either would change every sha256.
    """
    buffer = io.BytesIO()
    entries = {**arrays, "params_json": np.array(json.dumps(params, sort_keys=True))}
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in entries.items():
            info = zipfile.ZipInfo(f"{name}.npy")  # dated 1980-01-01, not now
            info.create_system = 3
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asarray(array), allow_pickle=False)
            archive.writestr(info, data.getvalue())
    return buffer.getvalue()


# --- the manifest -------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: What makes the shipped folder the package darkspec.golden: code, not data, so not in the manifest.
PACKAGE_FILES = ("__init__.py", "__pycache__")


def _files(golden: Path) -> dict[str, Path]:
    """Every data file under ``golden`` (all but the manifest and the package's own files), by its path relative to
    ``golden`` (with forward slashes)."""
    return {p.relative_to(golden).as_posix(): p for p in sorted(golden.rglob("*"))
            if p.is_file() and p != golden / MANIFEST and p.relative_to(golden).parts[0] not in PACKAGE_FILES}


def _is_reference_case(relative: str) -> bool:
    return relative.startswith(f"{REFERENCE_DIR}/") and relative.endswith(".npz")


def manifest_entry(golden: Path, relative: str) -> dict:
    """A file's sha256, its kind and where it came from."""
    path = golden / relative
    if path.suffix != ".npz":
        kind, provenance = PROVENANCE, f"documents {(Path('golden') / relative).parent.as_posix()}/"
    else:
        params = rec.load_recording(path).params
        if _is_reference_case(relative):
            kind, provenance = REFERENCE_REGRESSION, f"{__name__}.{params['generator']}, seed {params['seed']}"
        else:
            kind, provenance = DARKNET_RECORDING, f"{params['darknet_repo']} {params['darknet_commit']}"
    return {"sha256": _sha256(path), "kind": kind, "provenance": provenance}


def read_manifest(golden: Path) -> dict[str, dict]:
    return json.loads((golden / MANIFEST).read_text())


def shipped() -> Path:
    """The golden folder installed with darkspec, found through importlib.resources wherever darkspec runs."""
    return Path(str(resources.files(PACKAGE).joinpath(MANIFEST))).parent


def _write_manifest(golden: Path, manifest: dict[str, dict]) -> None:
    (golden / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# --- verify -------------------------------------------------------------------------------------------------------


def check(golden_dir) -> tuple[list[str], list[rec.Recording]]:
    """Every problem of one golden folder, one line each naming the file (relative to the folder) and the reason,
    and the recordings that passed: a listed file that is ``missing``, ``changed`` (sha256), an ``unlisted`` one,
    one that is not a readable recording, a manifest that cannot be read, or a folder that does not exist."""
    golden = Path(golden_dir)
    if not golden.is_dir():
        return [f"{golden}: no such golden folder"], []
    try:
        manifest = read_manifest(golden)
    except FileNotFoundError:
        return [f"{MANIFEST}: missing (every golden folder lists its files with their sha256)"], []
    except (OSError, ValueError) as error:
        return [f"{MANIFEST}: unreadable ({type(error).__name__}: {error})"], []
    broken = [str(name) for name, entry in manifest.items() if not isinstance(entry, dict) or
              not isinstance(entry.get("sha256"), str)] if isinstance(manifest, dict) else None
    if broken is None:
        return [f"{MANIFEST}: holds a {type(manifest).__name__}, expected an object of file entries"], []
    if broken:
        return [f"{MANIFEST}: entry {name} has no sha256" for name in broken], []
    present = _files(golden)
    problems, recordings = [], []
    for relative, entry in sorted(manifest.items()):
        if relative not in present:
            problems.append(f"{relative}: missing")
        elif _sha256(present[relative]) != entry["sha256"]:
            problems.append(f"{relative}: changed (sha256 differs from {MANIFEST})")
        elif relative.endswith(".npz"):
            try:
                recording = rec.load_recording(present[relative])
                recording_dialect(recording)
            except rec.RecordingError as error:
                problems.append(f"{relative}: undecodable ({error.reason})")
                continue
            recordings.append(recording)
    problems += [f"{relative}: unlisted (not in {MANIFEST})" for relative in present if relative not in manifest]
    return problems, recordings


def verify(golden_dir, write=print) -> int:
    """Check every file under ``golden_dir`` against its manifest: one line per problem (see :func:`check`), then a
    summary. Returns 0 when all match, else 1."""
    problems, recordings = check(golden_dir)
    for line in problems:
        write(line)
    if problems:
        write(f"golden: FAILED, {len(problems)} problem(s) in {golden_dir}")
        return 1
    write(f"golden: OK, {len(read_manifest(Path(golden_dir)))} files match {MANIFEST}, {len(recordings)} recordings")
    return 0


@dataclass
class Gate:
    """The golden cases of a run: the recordings of every folder that replay, and one line per problem (the folder,
    the file and the reason), any of which fails the run while the good recordings still replay."""

    recordings: list[rec.Recording] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def gate(golden_dirs) -> Gate:
    """:func:`check` on each golden folder of a run."""
    result = Gate()
    for folder in map(Path, golden_dirs):
        problems, recordings = check(folder)
        result.problems += [problem if problem.startswith(str(folder)) else f"{folder}/{problem}"
                            for problem in problems]
        result.recordings += recordings
    return result


# --- record -------------------------------------------------------------------------------------------------------


def record(golden_dir, write=print) -> int:
    """Regenerate the reference cases under ``golden_dir/reference``, rewrite their manifest entries, list files that
    are new to the manifest, and report what changed. Entries of the Darknet recordings already listed are never
    rewritten: a changed recording keeps failing :func:`verify`. Returns :func:`verify`'s status afterwards."""
    golden = Path(golden_dir)
    folder = golden / REFERENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    written = set()
    for reference_case in CASES.values():
        relative = f"{REFERENCE_DIR}/{reference_case.name}.npz"
        written.add(relative)
        arrays, params = reference_case.build()
        data = npz_bytes(arrays, params)
        path = golden / relative
        if path.exists() and path.read_bytes() == data:
            continue
        lines.append(f"changed {relative}: {_differences(path, arrays, params)}" if path.exists()
                     else f"added   {relative}")
        path.write_bytes(data)
    for relative, path in _files(golden).items():
        if _is_reference_case(relative) and relative not in written:
            path.unlink()
            lines.append(f"removed {relative}")
    lines += _update_manifest(golden)
    for line in lines:
        write(line)
    write(f"recorded {len(CASES)} reference cases: " + ("; ".join(_counts(lines)) or "nothing changed"))
    return verify(golden, write)


def _update_manifest(golden: Path) -> list[str]:
    """Reference entries from the files just written; files not yet listed are added; every other entry is kept."""
    old = read_manifest(golden) if (golden / MANIFEST).is_file() else {}
    present = _files(golden)
    manifest = {relative: entry for relative, entry in old.items() if not _is_reference_case(relative)}
    lines = []
    for relative in present:
        if _is_reference_case(relative):
            manifest[relative] = manifest_entry(golden, relative)
        elif relative not in manifest:
            manifest[relative] = manifest_entry(golden, relative)
            lines.append(f"listed  {relative} ({manifest[relative]['kind']})")
    _write_manifest(golden, manifest)
    return lines


def _counts(lines) -> list[str]:
    words = [line.split()[0] for line in lines]
    return [f"{words.count(word)} {word}" for word in ("added", "changed", "removed", "listed") if word in words]


def _differences(path: Path, arrays: Arrays, params: dict) -> str:
    """What differs between the recorded case at ``path`` and the new arrays and parameters."""
    old = rec.load_recording(path)
    changes = []
    for name in sorted(old.arrays.keys() | arrays.keys()):
        before, after = old.arrays.get(name), arrays.get(name)
        if before is None or after is None:
            changes.append(f"{name} {'added' if before is None else 'removed'}")
        elif before.shape != after.shape or before.dtype != after.dtype:
            changes.append(f"{name} {before.dtype}{list(before.shape)} -> {after.dtype}{list(after.shape)}")
        elif not np.array_equal(before, after, equal_nan=True):
            diff = np.abs(before.astype(np.float64) - after.astype(np.float64))
            changes.append(f"{name} max abs diff {diff.max():.3g}")
    changed_params = sorted(key for key in old.params.keys() | params.keys() if old.params.get(key) != params.get(key))
    if changed_params:
        changes.append(f"params {', '.join(changed_params)}")
    return "; ".join(changes) or "bytes only (same arrays and parameters)"
