"""The subprocess side of the darknet backend: loads libdarknet.so, parses a cfg with Darknet's own parser and runs
the last layer's forward, backward or update on buffers written from NumPy arrays.

Run as ``python darknet_worker.py LIBRARY HEADER`` (it imports only the standard library and NumPy): it loads the
library once, then forks one child per case, so a case that makes Darknet exit, assert or crash ends only that child.
Each case is a folder: ``job.json`` says what to do, ``inputs.npz`` holds the arrays to write (named ``L<i>.<field>``).
The child appends a line to ``stages`` as it begins and ends each stage, unbuffered, so the parent can tell where
Darknet stopped; it writes ``result.json`` and ``outputs.npz`` only when every stage finished, and Darknet's output goes
to ``output``.

The ``layer`` and ``network`` layouts are read from the library's own ``darknet.h`` and checked against the loaded
library (``probe``) before any case is run.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --- reading darknet.h ------------------------------------------------------------------------------------------


class LayoutError(Exception):
    """The header cannot be turned into ctypes layouts, or the layouts do not match the library."""


_SCALARS = {
    "int": ctypes.c_int, "unsigned": ctypes.c_uint, "unsigned int": ctypes.c_uint, "float": ctypes.c_float,
    "double": ctypes.c_double, "char": ctypes.c_char, "size_t": ctypes.c_size_t, "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64, "int64_t": ctypes.c_int64,
}
_FUNCTION_POINTER = re.compile(r"[\w\s*]+\(\s*\*\s*(\w+)\s*\)\s*\(.*\)", re.S)
_DECLARATION = re.compile(r"((?:(?:const|unsigned|struct|enum)\s+)*\w+)\s*(.*)", re.S)
_DECLARATOR = re.compile(r"(\**)\s*(\w+)")


def _preprocess(text: str) -> str:
    """Comments removed, and only the lines of a CPU build without cuDNN: no macro counts as defined."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    lines: list[str] = []
    branches: list[list[bool]] = []  # per open #if: [is this branch kept, was any branch kept]
    for line in text.splitlines():
        words = line.strip().lstrip("#").split() if line.strip().startswith("#") else None
        if words is None:
            if all(kept for kept, _ in branches):
                lines.append(line)
        elif words and words[0] in ("if", "ifdef", "ifndef"):
            condition = words[0] == "ifndef"  # GPU, CUDNN, __cplusplus, _MSC_VER, ...: none of them is defined
            branches.append([condition, condition])
        elif words and words[0] == "elif":
            branches[-1][0] = False
        elif words and words[0] == "else":
            branches[-1] = [not branches[-1][1], True]
        elif words and words[0] == "endif":
            branches.pop()
    return "\n".join(lines)


@dataclass
class Header:
    """The enums (member names in order) and struct bodies of darknet.h, and ctypes layouts built from them."""

    enums: dict[str, list[str]]
    bodies: dict[str, str]
    _built: dict[str, type] = field(default_factory=dict)

    @classmethod
    def read(cls, text: str) -> "Header":
        text = _preprocess(text)
        enums = {}
        for body, name in re.findall(r"typedef\s+enum\s*\w*\s*\{([^}]*)\}\s*(\w+)\s*;", text):
            enums[name] = [member.split("=")[0].strip() for member in body.split(",") if member.strip()]
        bodies = {}
        for tag, body, alias in re.findall(r"struct\s*(\w*)\s*\{([^{}]*)\}\s*(\w*)", text):
            bodies[tag or alias] = body
            if alias:
                bodies[alias] = body
        return cls(enums, bodies)

    def value(self, enum: str, member: str) -> int:
        members = self.enums.get(enum, [])
        if member not in members:
            raise LayoutError(f"darknet.h has no {member} in enum {enum}")
        return members.index(member)

    def name(self, enum: str, value: int) -> str:
        members = self.enums.get(enum, [])
        return members[value] if 0 <= value < len(members) else f"{enum}({value})"

    def struct(self, name: str) -> type[ctypes.Structure]:
        """The ctypes Structure of ``struct name`` (or its typedef), fields in the header's order."""
        if name not in self._built:
            if name not in self.bodies:
                raise LayoutError(f"darknet.h defines no struct {name}")
            fields = [entry for statement in self.bodies[name].split(";") for entry in self._fields(name, statement)]
            self._built[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
        return self._built[name]

    def _fields(self, struct: str, statement: str):
        statement = " ".join(statement.split())
        if not statement:
            return []
        pointer = _FUNCTION_POINTER.fullmatch(statement)
        if pointer:
            return [(pointer.group(1), ctypes.c_void_p)]
        declaration = _DECLARATION.fullmatch(statement)
        matches = [_DECLARATOR.fullmatch(d.strip()) for d in declaration.group(2).split(",")] if declaration else []
        if declaration is None or not all(matches):  # arrays, bit fields, anything the backend's structs do not hold
            raise LayoutError(f"cannot read the declaration {statement!r} in struct {struct}")
        base = declaration.group(1)
        fields = []
        for match in filter(None, matches):
            stars, name = match.groups()
            fields.append((name, ctypes.c_void_p if stars else self._type(base, f"{struct}.{name}")))
        return fields

    def _type(self, base: str, where: str):
        name = " ".join(w for w in base.split() if w not in ("const", "struct", "enum"))
        if name in _SCALARS:
            return _SCALARS[name]
        if name in self.enums:
            return ctypes.c_int
        if name in self.bodies:
            return self.struct(name)
        raise LayoutError(f"darknet.h: unknown type {base!r} of {where}")


# --- the two Darknet APIs ---------------------------------------------------------------------------------------


def _symbol(lib, name: str):
    try:
        return getattr(lib, name)
    except AttributeError:
        raise LayoutError(f"the library does not export {name}") from None


def api_of(lib) -> str:
    """AlexeyAB's Darknet exports parse_network_cfg_custom; pjreddie's does not."""
    return "alexeyab" if hasattr(lib, "parse_network_cfg_custom") else "pjreddie"


class Darknet:
    """One loaded library with the layouts of its header: parse a cfg, reach the layers, call their functions."""

    def __init__(self, library: str, header: str):
        # Its own symbols first: else glibc's error(3) would stand in for Darknet's error() (as it does when the
        # global scope is searched first), and Darknet would stop with a made-up exit status and message.
        # A build with -Ofast (Debian's) turns on flush-to-zero when loaded: kept off, so that Darknet's formulas are
        # compared with IEEE arithmetic (a subnormal output read as 0 took lhtan's 0.001 branch).
        libm = ctypes.CDLL("libm.so.6")
        environment = ctypes.create_string_buffer(256)  # at least sizeof(fenv_t)
        libm.fegetenv(environment)
        try:
            self.lib = ctypes.CDLL(library, mode=ctypes.DEFAULT_MODE | os.RTLD_DEEPBIND)
        finally:
            libm.fesetenv(environment)
        self.header = Header.read(Path(header).read_text(errors="replace"))
        self.api = api_of(self.lib)
        self.Layer = self.header.struct("layer")
        self.Network = self.header.struct("network")
        self.net: Any = None  # the parsed network struct (its type is built from the header)

    def parse(self, cfg_path: str):
        parse = _symbol(self.lib, "parse_network_cfg")
        parse.argtypes = [ctypes.c_char_p]
        if self.api == "pjreddie":
            parse.restype = ctypes.POINTER(self.Network)
            self.net = parse(cfg_path.encode()).contents
        else:  # AlexeyAB returns the struct by value
            parse.restype = self.Network
            self.net = parse(cfg_path.encode())
        return self.net

    def layers(self):
        return ctypes.cast(self.net.layers, ctypes.POINTER(self.Layer))

    def layer_type(self, layer) -> str:
        return self.header.name("LAYER_TYPE", layer.type)

    def function(self, pass_: str, layer):
        """The layer's own forward_*/backward_*/update_* function, by its exported name."""
        return _symbol(self.lib, f"{pass_}_{self.layer_type(layer).lower()}_layer")

    def call(self, pass_: str, index: int, update: dict):
        layers = self.layers()
        layer = layers[index]
        function = self.function(pass_, layer)
        function.restype = None
        if pass_ == "update":  # AlexeyAB: update_shortcut_layer(layer, batch, learning_rate, momentum, decay)
            function.argtypes = [self.Layer, ctypes.c_int, ctypes.c_float, ctypes.c_float, ctypes.c_float]
            function(layer, update["batch"], update["learning_rate"], update["momentum"], update["decay"])
            return
        # What Darknet's forward_network/backward_network hand a layer: the previous layer's output and delta.
        state = self.Network.from_buffer_copy(self.net)
        if index > 0:
            state.input, state.delta = layers[index - 1].output, layers[index - 1].delta
        state.index, state.train = index, 1
        if self.api == "alexeyab":
            state = self._network_state(state)
        function.argtypes = [self.Layer, type(state)]
        function(layer, state)

    def _network_state(self, net):
        NetworkState = self.header.struct("network_state")
        state = NetworkState()
        state.net = net
        state.input, state.delta, state.workspace = net.input, net.delta, net.workspace
        state.train, state.index = 1, net.index
        return state

    def set_enum(self, index: int, name: str, member: str):
        """Set an enum field of a parsed layer, by the member's name in darknet.h."""
        setattr(self.layers()[index], name, self.header.value(_ENUM_OF[name], member))

    def buffer(self, index: int, name: str) -> np.ndarray:
        """A layer's float buffer as a NumPy view: output and delta hold batch*outputs floats, weights and
        weight_updates nweights."""
        layer = self.layers()[index]
        size = layer.nweights if name in ("weights", "weight_updates") else layer.batch * layer.outputs
        address = getattr(layer, name)
        if not address or size <= 0:
            raise LayoutError(f"layer {index} has no {name} buffer")
        return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)), shape=(size,))

    def table(self) -> list[dict]:
        """Every layer's type and shapes, as Darknet's parser set them."""
        keys = ("batch", "w", "h", "c", "out_w", "out_h", "out_c", "outputs", "inputs", "nweights")
        layers = self.layers()
        return [{"type": self.layer_type(layers[i]), **{k: getattr(layers[i], k) for k in keys}}
                for i in range(self.net.n)]


# --- the layout check -------------------------------------------------------------------------------------------

_NET = "[net]\nbatch=2\nsubdivisions=1\nwidth=6\nheight=4\nchannels=3\nlearning_rate=0.25\nmomentum=0.5\ndecay=0.125\n"


def _conv(filters: int, stride: int = 1) -> str:
    return f"[convolutional]\nfilters={filters}\nsize=1\nstride={stride}\npad=0\nactivation=linear\n"


#: A cfg whose parsed values are known in advance, per API, and what Darknet's parser must have set. Its fields are
#: spread over the structs (first fields, ints, floats, function pointers, buffers, later layers of the array), so
#: a layout that is off anywhere the backend reads shows up here.
PROBES = {
    "pjreddie": (
        "\n".join([_NET, _conv(5), _conv(4, stride=2), "[shortcut]\nfrom=-2\nactivation=leaky\nalpha=0.5\nbeta=2\n",
                   "[reorg]\nstride=2\nreverse=1\n"]),
        [
            dict(type="CONVOLUTIONAL", batch=2, w=6, h=4, c=3, out_w=6, out_h=4, out_c=5, outputs=120, inputs=72,
                 n=5, nweights=15, stride=1, activation="LINEAR"),
            dict(type="CONVOLUTIONAL", batch=2, w=6, h=4, c=5, out_w=3, out_h=2, out_c=4, outputs=24, inputs=120,
                 n=4, nweights=20, stride=2),
            dict(type="SHORTCUT", batch=2, w=6, h=4, c=5, out_w=3, out_h=2, out_c=4, outputs=24, inputs=24, index=0,
                 activation="LEAKY", alpha=0.5, beta=2.0),
            dict(type="REORG", batch=2, w=3, h=2, c=4, out_w=6, out_h=4, out_c=1, outputs=24, inputs=24, stride=2,
                 reverse=1),
        ],
    ),
    "alexeyab": (
        "\n".join([_NET, _conv(5), _conv(2), _conv(4),
                   "[shortcut]\nfrom=-3,-2\nweights_type=per_channel\nweights_normalization=relu\nactivation=leaky\n",
                   "[reorg3d]\nstride=2\n", "[reorg]\nstride=2\nreverse=1\n"]),
        [
            dict(type="CONVOLUTIONAL", batch=2, w=6, h=4, c=3, out_w=6, out_h=4, out_c=5, outputs=120, inputs=72,
                 n=5, nweights=15, stride=1, activation="LINEAR"),
            dict(type="CONVOLUTIONAL", batch=2, w=6, h=4, c=5, out_w=6, out_h=4, out_c=2, outputs=48, inputs=120,
                 n=2, nweights=10),
            dict(type="CONVOLUTIONAL", batch=2, w=6, h=4, c=2, out_w=6, out_h=4, out_c=4, outputs=96, inputs=48,
                 n=4, nweights=8),
            dict(type="SHORTCUT", batch=2, w=6, h=4, c=4, out_w=6, out_h=4, out_c=4, outputs=96, inputs=96, n=2,
                 index=0, nweights=12, activation="LEAKY", weights_type="PER_CHANNEL",
                 weights_normalization="RELU_NORMALIZATION", input_layers=[0, 1]),
            dict(type="REORG", batch=2, w=6, h=4, c=4, out_w=3, out_h=2, out_c=16, outputs=96, inputs=96, stride=2,
                 reverse=0),
            dict(type="REORG_OLD", batch=2, w=3, h=2, c=16, out_w=6, out_h=4, out_c=4, outputs=96, inputs=96,
                 stride=2, reverse=1),
        ],
    ),
}
_NET_EXPECTED = dict(batch=2, w=6, h=4, c=3, inputs=72, learning_rate=0.25, momentum=0.5, decay=0.125)
_ENUM_OF = {"type": "LAYER_TYPE", "activation": "ACTIVATION", "weights_type": "WEIGHTS_TYPE_T",
            "weights_normalization": "WEIGHTS_NORMALIZATION_T"}


def layout_problems(darknet: Darknet, cfg_path: str) -> list[str]:
    """Parse the probe cfg and compare every predictable field with what the layouts read."""
    cfg, expected_layers = PROBES[darknet.api]
    Path(cfg_path).write_text(cfg)
    net = darknet.parse(cfg_path)
    problems = _compare("network", net, {**_NET_EXPECTED, "n": len(expected_layers)}, darknet)
    if problems or not net.layers:
        return problems or ["network.layers is NULL"]
    layers = darknet.layers()
    for index, expected in enumerate(expected_layers):
        layer = layers[index]
        found = _compare(f"layer {index}", layer, expected, darknet)
        found += [f"layer {index}: {name} is NULL" for name in ("output", "delta") if not getattr(layer, name)]
        if not found and expected["type"] != "CONVOLUTIONAL":  # the layers whose functions the backend calls
            found = _check_functions(darknet, index, layer)
        problems += found
    return problems


def _compare(where: str, struct, expected: dict, darknet: Darknet) -> list[str]:
    problems = []
    for name, want in expected.items():
        got = getattr(struct, name)
        if name in _ENUM_OF:
            want = darknet.header.value(_ENUM_OF[name], want)
        elif name == "input_layers":
            got = [ctypes.cast(got, ctypes.POINTER(ctypes.c_int))[i] for i in range(len(want))] if got else None
        if got != want:
            problems.append(f"{where}: {name} reads {got!r}, expected {want!r}")
    return problems


def _check_functions(darknet: Darknet, index: int, layer) -> list[str]:
    """The layer's forward/backward pointers must be the functions the library exports under those names."""
    problems = []
    for pass_ in ("forward", "backward"):
        function = darknet.function(pass_, layer)
        if getattr(layer, pass_) != ctypes.cast(function, ctypes.c_void_p).value:
            problems.append(f"layer {index}: {pass_} does not point at {function.__name__}")
    return problems


# --- jobs -------------------------------------------------------------------------------------------------------


class Stages:
    """Appends ``begin <stage>`` / ``end <stage>`` lines to a file, unbuffered: they survive a crash."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def mark(self, line: str):
        os.write(self.fd, (line + "\n").encode())

    def run(self, stage: str, call):
        self.mark(f"begin {stage}")
        value = call()
        self.mark(f"end {stage}")
        return value


def probe(darknet: Darknet, job: dict, job_dir: Path, stages: Stages) -> dict:
    problems = stages.run("parse", lambda: layout_problems(darknet, str(job_dir / "probe.cfg")))
    return {"problems": problems}


def run(darknet: Darknet, job: dict, job_dir: Path, stages: Stages) -> dict:
    cfg_path = job_dir / "case.cfg"
    cfg_path.write_text(job["cfg"])
    stages.run("parse", lambda: darknet.parse(str(cfg_path)))
    for key, member in job["set"].items():
        darknet.set_enum(*_address(key), member)
    with np.load(job_dir / "inputs.npz") as inputs:
        for key in inputs.files:
            _write(darknet, key, inputs[key])
    index = darknet.net.n - 1
    for pass_ in job["passes"]:
        stages.run(pass_, lambda: darknet.call(pass_, index, job["update"]))
    outputs: dict[str, Any] = {key: darknet.buffer(*_address(key)).copy() for key in job["read"]}
    np.savez(job_dir / "outputs.npz", **outputs)
    return {"layers": darknet.table()}


def _address(key: str) -> tuple[int, str]:
    layer, name = key.split(".")
    return int(layer[1:]), name


def _write(darknet: Darknet, key: str, values: np.ndarray):
    target = darknet.buffer(*_address(key))
    if values.size != target.size:
        raise LayoutError(f"{key}: {values.size} values for a buffer of {target.size}")
    target[:] = values.reshape(-1)


JOBS = {"probe": probe, "run": run}
#: The exit status of a case that failed in the worker's own code (not in Darknet's).
WORKER_ERROR = 70


def run_case(darknet: Darknet, job_dir: Path) -> int:
    """One case, in the forked child: Darknet's output goes to ``JOB_DIR/output``, its progress to ``stages``."""
    output = os.open(job_dir / "output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    stages = Stages(job_dir / "stages")
    try:
        job = json.loads((job_dir / "job.json").read_text())
        signal.alarm(job["timeout"])  # a hung case ends as SIGALRM
        result = JOBS[job["kind"]](darknet, job, job_dir, stages)
        (job_dir / "result.json").write_text(json.dumps(result))
        return 0
    except Exception as error:  # reported through the stages file, with its own exit status
        stages.mark(f"worker-error {type(error).__name__}: {error}")
        traceback.print_exc()
        return WORKER_ERROR


def serve(library: str, header: str):
    """Load the library once, then run each case named on stdin (a job folder per line) in a forked child and
    answer its exit status (negative: the signal that ended it) on stdout."""
    try:
        darknet = Darknet(library, header)
    except (OSError, LayoutError) as error:
        print(f"error {type(error).__name__}: {error}", flush=True)
        return
    print(f"ready {darknet.api}", flush=True)
    libc = ctypes.CDLL(None)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            status = run_case(darknet, Path(line.strip()))
            libc.fflush(None)  # Darknet's buffered printf output; os._exit would drop it
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    serve(*sys.argv[1:3])
