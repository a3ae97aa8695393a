"""Real Darknet as a backend: libdarknet.so through ctypes, each op call in a worker subprocess
(spec/darknet-backend.md).

Every op call writes a cfg whose earlier layers have the shapes of its inputs, has Darknet's own parser read it,
writes the inputs into those layers' buffers and runs the last layer's forward, backward or update in
``darkspec.backends.darknet_worker``. A Darknet that exits, asserts or crashes takes only the worker down; the call
raises :class:`DarknetCrashed`, or :class:`DarknetRefused` where the parser was the one that stopped.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from darkspec.backends.base import REORG_DIALECT, Backend, BackendCrashed, capability_grid
from darkspec.errors import DarkspecError
from darkspec.reference.dialects import Dialect, Quirk
from darkspec.reference import reorg, shortcut
from darkspec.reference.shortcut import Normalization, ShortcutGradients, ShortcutParams, WeightsType, weight_count

ENV_LIBRARY = "DARKSPEC_DARKNET_LIB"
ENV_HEADER = "DARKSPEC_DARKNET_HEADER"
#: Debian's package `darknet` (pjreddie's 2018 Darknet) installs the library and its header here.
DEBIAN_LIBRARY = Path("/usr/lib/darknet/libdarknet.so")
#: Run by its path: it needs only the standard library and NumPy, and the caller's folder stays off its sys.path.
WORKER = Path(__file__).with_name("darknet_worker.py")
#: Seconds a case may take before it counts as hung (it is then ended with SIGALRM).
TIMEOUT_S = 120
#: How much of Darknet's output an exception carries.
TAIL_CHARS = 1500
#: What Darknet prints when it replaces an activation name it does not know by relu.
UNKNOWN_ACTIVATION = re.compile(r"Couldn't find activation function (\S*?),? going with ReLU")

#: What each library can run: pjreddie's 2018 [shortcut] and [reorg]; AlexeyAB's CPU training path.
DECLARED = {
    "pjreddie": ({"shortcut": (Dialect.PJREDDIE.value,), "reorg": (REORG_DIALECT,)},
                 {Dialect.PJREDDIE.value: ("forward", "backward")}),
    "alexeyab": ({"shortcut": (Dialect.DARKNET_CPU.value,), "reorg3d": (REORG_DIALECT,), "reorg": (REORG_DIALECT,)},
                 {}),
}
#: AlexeyAB's CPU code always has these bugs (the quirks of the recordings' build).
LIBRARY_QUIRKS = {
    "pjreddie": frozenset(),
    "alexeyab": frozenset({Quirk.CPU_FASTPATH_INPUT_DIMS, Quirk.CPU_RELU6_ZERO,
                           Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS}),
}


# --- what a failed case raises ----------------------------------------------------------------------------------


class DarknetCrashed(BackendCrashed):
    """Darknet's process ended before the case finished: killed by a signal, an exit status (Darknet's ``exit()``
    and ``error()``), or a time-out. ``stage`` is what it was doing: ``parse``, ``forward``, ``backward`` or
    ``update``; ``signal`` (a name such as ``SIGSEGV``; ``SIGALRM`` for a time-out) or ``exit_status`` how it
    ended; ``output_tail`` the end of what it printed."""

    def __init__(self, stage: str, returncode: int, output: str):
        self.stage = stage
        self.returncode = returncode
        self.signal = _signal_name(-returncode) if returncode < 0 else None
        self.exit_status = returncode if returncode >= 0 else None
        self.output_tail = output[-TAIL_CHARS:]
        super().__init__(f"Darknet stopped in {stage}: {self.how()}; its output ends: {self.last_lines()}")

    def how(self) -> str:
        return _ending(self.returncode)

    def last_lines(self, count: int = 3) -> str:
        return " | ".join(self.output_tail.strip().splitlines()[-count:]) or "(nothing)"


class DarknetRefused(DarknetCrashed, DarkspecError):
    """Darknet's parser refused the cfg (with ``error()``, a failed assert or a crash while parsing): a
    ``DarkspecError`` too, so a replay matches it against a recording whose cfg Darknet refused."""

    def __init__(self, stage: str, returncode: int, output: str, section: str):
        DarknetCrashed.__init__(self, stage, returncode, output)
        DarkspecError.__init__(self, "cfg", section, "a cfg Darknet's parser accepts", code="darknet-refused",
                               reason=f"Darknet's parser stopped with {self.how()}: {self.last_lines()}")


# --- finding the library ----------------------------------------------------------------------------------------


def find_library(explicit: str | os.PathLike | None = None) -> tuple[Path | None, str | None]:
    """The library to load (an explicit path, then $DARKSPEC_DARKNET_LIB, then Debian's), or None and why."""
    named = explicit or os.environ.get(ENV_LIBRARY)
    if named:
        path = Path(named)
        source = "the library given" if explicit else ENV_LIBRARY
        return (path, None) if path.is_file() else (None, f"{source}, {named}, is not a file")
    if DEBIAN_LIBRARY.is_file():
        return DEBIAN_LIBRARY, None
    return None, (f"no libdarknet.so found: apt-get install darknet (Debian's pjreddie Darknet, {DEBIAN_LIBRARY}), "
                  f"or set {ENV_LIBRARY} to a libdarknet.so")


def find_header(library: Path) -> tuple[Path | None, str | None]:
    """The darknet.h the library was built from: $DARKSPEC_DARKNET_HEADER, else include/darknet.h beside the
    library (Debian's package, a source tree) or one folder up (an installed prefix)."""
    named = os.environ.get(ENV_HEADER)
    candidates = [Path(named)] if named else [library.parent / "include" / "darknet.h",
                                              library.parent.parent / "include" / "darknet.h"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, None
    looked = ", ".join(str(c) for c in candidates)
    return None, (f"no darknet.h for {library} (looked at {looked}): the struct layouts come from the library's "
                  f"own header; set {ENV_HEADER} to it")


# --- running the worker -----------------------------------------------------------------------------------------


class WorkerServer:
    """One ``darknet_worker`` process per library: it loads the library once and forks a child per case."""

    def __init__(self, library: str, header: str):
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: nothing it writes can ever block it
        self.process = subprocess.Popen([sys.executable, str(WORKER), library, header], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lock = threading.Lock()  # one case at a time: the server answers in order
        word, _, rest = self._answer().partition(" ")
        self.api: str | None = rest if word == "ready" else None
        self.error: str | None = None if word == "ready" else rest

    def _answer(self) -> str:
        line = _pipe(self.process.stdout).readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            raise RuntimeError(f"the darknet worker ended ({_ending(self.process.returncode)}): "
                               f"{self.log.read().decode(errors='replace')[-TAIL_CHARS:]}")
        return line.strip()

    def run(self, job_dir: Path) -> int:
        """The exit status of the case's child (negative: the signal that ended it)."""
        with self.lock:
            stdin = _pipe(self.process.stdin)
            stdin.write(f"{job_dir}\n")
            stdin.flush()
            return int(self._answer())

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def _pipe(stream: IO[str] | None) -> IO[str]:
    if stream is None:  # Popen was given PIPE for it
        raise RuntimeError("the darknet worker has no pipe")
    return stream


_servers: dict[tuple, WorkerServer] = {}
_servers_lock = threading.Lock()


def server_for(library: Path, header: Path) -> WorkerServer:
    """The running server of this library and header (a rebuilt file gets a new one)."""
    key = (str(library), str(header), _stamp(library, header))
    with _servers_lock:
        server = _servers.get(key)
        if server is None or server.process.poll() is not None:
            server = _servers[key] = WorkerServer(str(library), str(header))
        return server


@atexit.register
def _close_servers():
    for server in _servers.values():
        server.close()


def _stamp(*paths: Path) -> tuple:
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ending(returncode: int) -> str:
    if returncode == -signal.SIGALRM:
        return f"timed out after {TIMEOUT_S} s"
    return _signal_name(-returncode) if returncode < 0 else f"exit status {returncode}"


@dataclass
class WorkerResult:
    result: dict
    outputs: dict[str, np.ndarray]
    output: str


def run_worker(server: WorkerServer, job: dict, arrays: dict[str, np.ndarray], section: str) -> WorkerResult:
    """Run one case; raise DarknetRefused or DarknetCrashed where Darknet stopped."""
    with tempfile.TemporaryDirectory(prefix="darkspec-darknet-") as folder:
        job_dir = Path(folder)
        (job_dir / "job.json").write_text(json.dumps({**job, "timeout": TIMEOUT_S}))
        inputs: dict[str, Any] = {key: np.ascontiguousarray(a, np.float32) for key, a in arrays.items()}
        np.savez(job_dir / "inputs.npz", **inputs)
        returncode = server.run(job_dir)
        output = _read(job_dir / "output")
        stage, worker_error = _last_stage(_read(job_dir / "stages"))
        if worker_error:
            raise RuntimeError(f"the darknet worker failed: {worker_error}")
        if returncode == 0 and (job_dir / "result.json").exists():
            return WorkerResult(json.loads((job_dir / "result.json").read_text()), _read_outputs(job_dir), output)
    if stage == "parse":
        raise DarknetRefused(stage, returncode, output, section)
    raise DarknetCrashed(stage, returncode, output)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _read_outputs(job_dir: Path) -> dict[str, np.ndarray]:
    path = job_dir / "outputs.npz"
    if not path.exists():
        return {}
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}


def _last_stage(text: str) -> tuple[str, str | None]:
    """The stage that began and did not end (or the one after the last that ended), and any worker error."""
    begun: list[str] = []
    ended: list[str] = []
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "worker-error":
            return "", rest
        (begun if word == "begin" else ended).append(rest)
    if begun and (not ended or begun[-1] != ended[-1]):
        return begun[-1], None
    return (f"after {ended[-1]}" if ended else "start"), None


@functools.lru_cache(maxsize=None)
def probe(library: Path, header: Path, stamp: tuple) -> tuple[str | None, str | None]:
    """(api, None) when the header's layouts read the library's fields right, else (None, why not). ``stamp``
    (sizes and times of both files) makes a rebuilt library probe again."""
    try:
        server = server_for(library, header)
        if server.error:
            return None, f"cannot use {library} with {header}: {server.error}"
        problems = run_worker(server, {"kind": "probe"}, {}, "the layout probe").result["problems"]
    except (DarknetCrashed, RuntimeError) as error:
        return None, f"the layout check could not run: {error}"
    if problems:
        return None, (f"the layouts read from {header} do not match {library}: {'; '.join(problems[:4])}"
                      f"{' ...' if len(problems) > 4 else ''}")
    return server.api, None


# --- the cfg of a case ------------------------------------------------------------------------------------------

Shape = tuple[int, int, int]


def _resample(source: tuple[int, int], target: tuple[int, int], upsample: bool) -> tuple[int, int, int] | None:
    """(upsample factor, conv size, conv stride) taking a source H x W to the target H x W with pad=0, the
    smallest first; None if there is none."""
    (h, w), (height, width) = source, target
    factors = range(1, max(math.ceil(height / h), math.ceil(width / w), 1) + 1) if upsample else (1,)
    for factor in factors:
        big_h, big_w = h * factor, w * factor
        for size in range(1, min(big_h, big_w) + 1):
            for stride in range(1, max(big_h, big_w) + 1):
                if (big_h - size) // stride + 1 == height and (big_w - size) // stride + 1 == width:
                    return factor, size, stride
    return None


@dataclass
class CaseCfg:
    """A cfg under construction: ``[net]`` with the first layer's input shape, then layers with their output
    shapes (C, H, W). AlexeyAB's parser divides by the number of layers whose input is at least 2 x 2, so for it
    (``two_d``) a thinner input is reached through a stride-2 layer from one twice the size."""

    batch: int
    two_d: bool
    input_shape: Shape | None = None
    sections: list[str] = field(default_factory=list)
    shapes: list[Shape | None] = field(default_factory=list)

    @property
    def current(self) -> Shape:
        shape = self.shapes[-1] if self.shapes else self.input_shape
        if shape is None:
            raise RuntimeError("the cfg has no layer of known shape to build on")
        return shape

    def start(self, shape: Shape):
        c, h, w = shape
        if self.two_d and min(h, w) < 2:
            self.input_shape = (1, 2 * h, 2 * w)
            self.add(_conv_section(c, 1, 2), shape)
        else:
            self.input_shape = shape

    def add(self, section: str, shape: Shape | None) -> int:
        self.sections.append(section)
        self.shapes.append(shape)
        return len(self.sections) - 1

    def layer_from(self, shape: Shape, upsample: bool = True) -> int:
        """A new [convolutional] layer (after an [upsample] where the size must grow) whose output has ``shape``."""
        if self.input_shape is None:
            self.start(shape)
        plan = _resample(self.current[1:], shape[1:], upsample)
        if plan is None:
            raise DarkspecError("input shapes", shape, f"sizes a cfg can reach from {self.current} with [upsample] "
                                "and [convolutional] layers", code="darknet-shape-unbuildable")
        factor, size, stride = plan
        if factor > 1:
            c, h, w = self.current
            self.add(f"[upsample]\nstride={factor}\n", (c, h * factor, w * factor))
        return self.add(_conv_section(shape[0], size, stride), shape)

    def text(self) -> str:
        if self.input_shape is None:
            raise RuntimeError("the cfg has no input layer yet")
        c, h, w = self.input_shape
        net = f"[net]\nbatch={self.batch}\nsubdivisions=1\nwidth={w}\nheight={h}\nchannels={c}\n"
        return "\n".join([net, *self.sections])

    def last_section(self) -> str:
        return " ".join(self.sections[-1].split())


def _conv_section(filters: int, size: int, stride: int) -> str:
    return f"[convolutional]\nfilters={filters}\nsize={size}\nstride={stride}\npad=0\nactivation=linear\n"


@dataclass
class ShortcutCase:
    cfg: CaseCfg
    index: int
    x_layer: int
    from_layers: list[int]
    #: Enum fields the worker sets on the parsed layers ({"L<i>.<field>": member}).
    after_parse: dict[str, str]


def _shortcut_cfg(api: str, x, froms, params, from_input_shapes, keys: dict) -> ShortcutCase:
    """The from layers in order, then the previous layer, then the [shortcut]. A from layer's own input has the
    shape ``from_input_shapes`` gives (AlexeyAB's CPU fast path looks at it), else its output's shape."""
    cfg = CaseCfg(batch=x.shape[0], two_d=api == "alexeyab")
    honour_inputs = api == "alexeyab" and from_input_shapes is not None
    from_layers = []
    for i, source in enumerate(froms):
        wanted = tuple(from_input_shapes[i]) if honour_inputs else source.shape[1:]
        if cfg.input_shape is None:
            cfg.start(wanted)
        elif cfg.current != wanted:
            cfg.layer_from(wanted)
        from_layers.append(cfg.layer_from(source.shape[1:], upsample=False))
    x_layer = cfg.layer_from(x.shape[1:])
    index = len(cfg.sections)
    settings = {"activation": params.activation, **keys}
    if froms:
        settings = {"from": ",".join(str(layer - index) for layer in from_layers), **settings}
    after_parse = {}
    if api == "pjreddie":
        settings.update(alpha=repr(float(params.alpha)), beta=repr(float(params.beta)))
    elif params.weights_type != WeightsType.NONE:
        normalization = params.weights_normalization.value
        if params.weights_normalization == Normalization.NONE:
            # AlexeyAB's parser refuses weights without normalization (spec/cfg.md#weights_normalization), its
            # forward and backward run them: parse with relu, then set none on the parsed layer.
            normalization, after_parse[f"L{index}.weights_normalization"] = "relu", "NO_NORMALIZATION"
        settings.update(weights_type=params.weights_type.value, weights_normalization=normalization)
    cfg.add("[shortcut]\n" + "".join(f"{key}={value}\n" for key, value in settings.items()), x.shape[1:])
    return ShortcutCase(cfg, index, x_layer, from_layers, after_parse)


def _reorg_cfg(api: str, shape, stride, reverse, old) -> tuple[CaseCfg, int]:
    if isinstance(stride, bool) or int(stride) != stride:
        raise DarkspecError("stride", stride, "an integer", code="reorg-bad-stride")
    cfg = CaseCfg(batch=shape[0], two_d=api == "alexeyab")
    cfg.layer_from(tuple(shape[1:]))
    section = "reorg" if old else "reorg3d"
    return cfg, cfg.add(f"[{section}]\nstride={int(stride)}\nreverse={int(bool(reverse))}\n", None)


def _run_job(cfg: str, passes, read=(), update: dict | None = None, after_parse: dict | None = None) -> dict:
    """What the worker's ``run`` reads: the cfg, the passes to run on its last layer, the buffers to send back, the
    update step's settings and the enum fields to set after parsing."""
    return {"kind": "run", "cfg": cfg, "passes": list(passes), "read": list(read), "update": update or {},
            "set": after_parse or {}}


def _float32(name: str, array, ndim: int | None = 4) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.float32:
        raise DarkspecError(f"{name}.dtype", str(array.dtype), "float32 (Darknet computes in float32)",
                            code="bad-dtype")
    if ndim is not None and array.ndim != ndim:
        raise DarkspecError(f"{name}.shape", array.shape, "an NCHW array (4 dimensions)", code="bad-shape")
    return array


def _output_shape(row: dict) -> tuple[int, int, int, int]:
    return row["batch"], row["out_c"], row["out_h"], row["out_w"]


# --- the backend ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """The library, its header and its API once the layout check passed; else ``reason`` says why not."""

    library: Path | None = None
    header: Path | None = None
    api: str | None = None
    reason: str | None = None

    def server(self) -> WorkerServer:
        """The worker of this library (the backend checked that it was found)."""
        if self.library is None or self.header is None:
            raise RuntimeError(f"the darknet backend is unavailable: {self.reason}")
        return server_for(self.library, self.header)


class DarknetBackend(Backend):
    """Real Darknet: pjreddie's (Debian's package) or AlexeyAB's libdarknet.so, whichever is found.

    ``checked`` (the default): a call the spec refuses is refused with the reference's checks and codes before
    Darknet sees it, as every backend must. ``checked=False`` hands Darknet anything its cfg can express, to watch how
    Darknet itself stops (spec/reorg.md, "Darknet instead")."""

    name = "darknet"

    def __init__(self, library: str | os.PathLike | None = None, checked: bool = True):
        self._library = library
        self.checked = checked

    def locate(self) -> Located:
        library, reason = find_library(self._library)
        if library is None:
            return Located(reason=reason)
        header, reason = find_header(library)
        if header is None:
            return Located(library, reason=reason)
        api, reason = probe(library, header, _stamp(library, header))
        return Located(library, header, api, reason)

    def availability(self):
        return self.locate().reason

    def capabilities(self):
        api = self.locate().api
        if api is None:
            return frozenset()
        ops, passes = DECLARED[api]
        return capability_grid(ops, (np.float32,), passes=passes)

    def quirks(self):
        return LIBRARY_QUIRKS.get(self.locate().api, frozenset())

    def version(self):
        located = self.locate()
        if located.api is None:
            return "unavailable"
        digest = hashlib.sha256(located.library.read_bytes()).hexdigest()[:12]
        return f"{located.api} Darknet, {located.library} (sha256 {digest})"

    # --- running ---

    def _require(self, op: str, dialect: str, pass_: str) -> Located:
        located = self.locate()
        if located.reason:
            raise RuntimeError(f"the darknet backend is unavailable: {located.reason}")
        if not any(c.op == op and c.dialect == dialect and c.pass_ == pass_ for c in self.capabilities()):
            declared = ", ".join(sorted(c.label() for c in self.capabilities()))
            raise DarkspecError(f"{op} {pass_} dialect", dialect, f"what this {located.api} Darknet runs: {declared}",
                                code="not-declared")
        return located

    def _run(self, located: Located, cfg_text: str, section: str, arrays: dict, passes, reads: dict,
             update: dict | None = None, after_parse: dict | None = None):
        """Run a case; returns the arrays named in ``reads`` ({name: (layer, buffer)}) and Darknet's layer table."""
        job = _run_job(cfg_text, passes, [f"L{layer}.{buffer}" for layer, buffer in reads.values()], update,
                       after_parse)
        found = run_worker(located.server(), job, arrays, section)
        unknown = UNKNOWN_ACTIVATION.search(found.output)
        if unknown:
            raise DarkspecError("activation", unknown.group(1), "an activation this Darknet knows (it printed "
                                f"{unknown.group(0)!r} and ran relu)", code="unknown-activation")
        values = {name: found.outputs[f"L{layer}.{buffer}"] for name, (layer, buffer) in reads.items()}
        return values, found.result["layers"]

    def run_cfg(self, text: str) -> list[dict]:
        """Darknet's verdict on a whole cfg: its parser reads it, then the last layer's forward and backward run on
        the buffers the parser allocated. Returns Darknet's layer table (type, batch, w, h, c, out_w, out_h, out_c,
        outputs, inputs, nweights per layer); raises DarknetRefused or DarknetCrashed where Darknet stopped."""
        located = self.locate()
        if located.reason:
            raise RuntimeError(f"the darknet backend is unavailable: {located.reason}")
        job = _run_job(text, ["forward", "backward"])
        sections = [line.strip() for line in text.splitlines() if line.strip().startswith("[")]
        section = sections[-1] if sections else "(no section)"
        return run_worker(located.server(), job, {}, section).result["layers"]

    # --- [shortcut] ---

    def _shortcut(self, pass_, x, froms, weights, params, dialect, quirks, from_input_shapes, keys=None):
        if self.checked:
            x, froms, weights, dialect, quirks = shortcut.check_call(pass_, x, froms, weights, params, dialect, quirks)
            dialect = dialect.value
        located = self._require("shortcut", dialect, pass_)
        x = _float32("x", x)
        froms = [_float32(f"froms[{i}]", f) for i, f in enumerate(froms)]
        if any(f.shape[0] != x.shape[0] for f in froms):
            raise DarkspecError("froms batch", [f.shape[0] for f in froms], f"{x.shape[0]}, the batch of x",
                                code="bad-shape")
        if located.api == "pjreddie":
            if len(froms) > 1:
                raise DarkspecError("from", f"{len(froms)} layers", "at most one in pjreddie's Darknet (its parser "
                                    "reads only the first index)", code="pjreddie-single-from")
            if weights is not None or params.weights_type != WeightsType.NONE:
                raise DarkspecError("weights_type", params.weights_type.value, "none (pjreddie's [shortcut] has no "
                                    "weights)", code="pjreddie-no-weights")
        expected = weight_count(params.weights_type, len(froms), x.shape[1])
        given = 0 if weights is None else np.asarray(weights).size
        if given != expected:
            raise DarkspecError("weights", f"{given} values", f"{expected} for weights_type="
                                f"{params.weights_type.value}", code="weights-size")
        case = _shortcut_cfg(located.api, x, froms, params, from_input_shapes, keys or {})
        arrays = {f"L{layer}.output": f for layer, f in zip(case.from_layers, froms)}
        arrays[f"L{case.x_layer}.output"] = x
        if weights is not None:
            arrays[f"L{case.index}.weights"] = _float32("weights", weights, ndim=None)
        return located, case, arrays

    def shortcut_forward(self, x, froms, weights, *, params, dialect, quirks=frozenset(), from_input_shapes=None):
        located, case, arrays = self._shortcut("forward", x, froms, weights, params, dialect, quirks,
                                               from_input_shapes)
        values, _ = self._run(located, case.cfg.text(), case.cfg.last_section(), arrays, ["forward"],
                              {"output": (case.index, "output")}, after_parse=case.after_parse)
        output = values["output"].reshape(np.shape(x))
        if located.api == "alexeyab" and weights is None and len(froms) == 1 and from_input_shapes is not None \
                and tuple(from_input_shapes[0]) == output.shape[1:]:
            # AlexeyAB's CPU fast path (quirk cpu-fastpath-input-dims) reads past a smaller from buffer: those
            # elements come from memory Darknet does not own, undefined (NaN) as in the reference.
            output.reshape(-1)[np.size(froms[0]):] = np.nan
        return output

    def shortcut_backward(self, x, froms, weights, delta, *, params, dialect, quirks=frozenset(), weight_updates=None,
                          from_input_shapes=None):
        if self.checked:
            delta, weight_updates = shortcut.check_backward_inputs(np.asarray(x), weights, delta, weight_updates)
        located, case, arrays = self._shortcut("backward", x, froms, weights, params, dialect, quirks,
                                               from_input_shapes)
        delta = _float32("delta", delta)
        if delta.shape != np.shape(x):
            raise DarkspecError("delta.shape", delta.shape, f"{np.shape(x)}, like x", code="bad-shape")
        arrays[f"L{case.index}.delta"] = delta
        sources = [case.x_layer, *case.from_layers]
        for layer in sources:  # zero, so that after backward each holds exactly what backward added
            arrays[f"L{layer}.delta"] = np.zeros(arrays[f"L{layer}.output"].shape, np.float32)
        reads = {"delta": (case.index, "delta"), **{f"input{i}": (layer, "delta") for i, layer in enumerate(sources)}}
        if weights is not None:
            updates = np.zeros_like(arrays[f"L{case.index}.weights"]) if weight_updates is None else weight_updates
            arrays[f"L{case.index}.weight_updates"] = _float32("weight_updates", updates, ndim=None)
            reads["weight_updates"] = (case.index, "weight_updates")
        values, _ = self._run(located, case.cfg.text(), case.cfg.last_section(), arrays, ["forward", "backward"],
                              reads, after_parse=case.after_parse)
        inputs = [np.shape(x), *(np.shape(f) for f in froms)]
        return ShortcutGradients(
            delta=values["delta"].reshape(delta.shape),
            input_deltas=[values[f"input{i}"].reshape(shape) for i, shape in enumerate(inputs)],
            weight_updates=values.get("weight_updates"),
        )

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        """One update step on a [shortcut] built to hold the weights: per_feature weights over as many from layers
        as it takes (at least one), the unused weights zero."""
        if self.checked:
            weights, weight_updates, _ = shortcut.check_update_inputs(weights, weight_updates, hyper, dialect)
        weights = _float32("weights", weights, ndim=None)
        weight_updates = _float32("weight_updates", weight_updates, ndim=None)
        if weight_updates.shape != weights.shape:
            raise DarkspecError("weight_updates", f"float32{list(weight_updates.shape)}",
                                f"float32{list(weights.shape)}, like weights", code="bad-shape")
        if hyper.batch < 1:
            raise DarkspecError("batch", hyper.batch, "an integer >= 1", code="bad-batch")
        slots = max(2, weights.size)
        padded = [np.concatenate([a.reshape(-1), np.zeros(slots - a.size, np.float32)]) for a in (weights,
                                                                                                  weight_updates)]
        x = np.zeros((1, 1, 2, 2), np.float32)
        params = ShortcutParams(weights_type=WeightsType.PER_FEATURE, weights_normalization=Normalization.RELU)
        # Darknet reads the layer's learning_rate_scale from the section's learning_rate key.
        located, case, arrays = self._shortcut("update", x, [x] * (slots - 1), padded[0], params, dialect, None,
                                               keys={"learning_rate": repr(float(hyper.learning_rate_scale))})
        arrays[f"L{case.index}.weight_updates"] = padded[1]
        update = {"batch": int(hyper.batch), "learning_rate": float(hyper.learning_rate),
                  "momentum": float(hyper.momentum), "decay": float(hyper.decay)}
        reads = {"weights": (case.index, "weights"), "weight_updates": (case.index, "weight_updates")}
        values, _ = self._run(located, case.cfg.text(), case.cfg.last_section(), arrays, ["update"], reads, update)
        return tuple(values[name][:weights.size].reshape(weights.shape) for name in ("weights", "weight_updates"))

    # --- [reorg3d] and [reorg] ---

    def reorg_forward(self, x, stride, reverse, old):
        located = self._require("reorg" if old else "reorg3d", REORG_DIALECT, "forward")
        if self.checked:
            reorg.plan(reorg.REORG_OLD if old else reorg.REORG3D, np.shape(x), stride, reverse)
        x = _float32("x", x)
        cfg, index = _reorg_cfg(located.api, x.shape, stride, reverse, old)
        values, layers = self._run(located, cfg.text(), cfg.last_section(), {f"L{index - 1}.output": x},
                                   ["forward"], {"output": (index, "output")})
        return values["output"].reshape(_output_shape(layers[index]))

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        """Only backward runs (a reorg's backward does not read what its forward left); the previous layer's delta
        starts as ``previous_delta``, and is returned as Darknet leaves it."""
        located = self._require("reorg" if old else "reorg3d", REORG_DIALECT, "backward")
        if self.checked:
            reorg.plan_from_output(reorg.REORG_OLD if old else reorg.REORG3D, np.shape(delta), stride, reverse)
        delta = _float32("delta", delta)
        previous_delta = _float32("previous_delta", previous_delta)
        if delta.size != previous_delta.size:
            raise DarkspecError("delta.shape", delta.shape, f"as many values as previous_delta "
                                f"{previous_delta.shape} (a reorg moves every value)", code="reorg-bad-delta-shape")
        cfg, index = _reorg_cfg(located.api, previous_delta.shape, stride, reverse, old)
        arrays = {f"L{index}.delta": delta, f"L{index - 1}.delta": previous_delta}
        values, _ = self._run(located, cfg.text(), cfg.last_section(), arrays, ["backward"],
                              {"dx": (index - 1, "delta")})
        return values["dx"].reshape(previous_delta.shape)
