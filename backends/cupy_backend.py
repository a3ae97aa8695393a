"""The ``cupy`` backend: [shortcut], [reorg3d] and [reorg] as raw CUDA kernels (spec/cupy-backend.md).

The kernels are the CUDA sources in ``kernels/`` (package data), compiled at first use with NVRTC through
``cupy.RawModule``. Arrays at the boundary are NumPy: each call copies its inputs to the device, runs the kernels and
copies the results back.

- ``shortcut`` forward: one kernel (every input, the weight normalization, the PRN rule, the activation).
- ``shortcut`` backward: one kernel for the deltas (the delta after the activation gradient and what every input's
  delta gains) which also writes one partial sum of the weight gradient per block, and one kernel that reduces those
  partials per weight in a fixed tree and applies the dialect's formula: deterministic, no atomics.
- ``shortcut`` update: one elementwise kernel (darknet-gpu: NaN repair, ±1 clip, no decay, burn-in skip; darknet-cpu
  and exact: decay).
- ``reorg3d`` / ``reorg``: one gather kernel per call, bit-exact.

Every refusal is the reference's: the inputs are checked with the reference's own checks before anything is copied.

The device work goes through an *executor* (``CupyExecutor`` by default). The executor is the only part that knows
CuPy: ``compile(module)``, ``to_device``, ``empty``, ``pointers`` (a device table of array addresses),
``launch(module, name, grid, block, args)`` and ``to_host``. Another executor can run the same kernel sources
elsewhere (the tests run them on the CPU). ``prepare_shortcut`` gives a call whose arrays stay on the device, for
timing the kernels alone (``darkspec bench``, through ``prepare`` and the CUDA-event timer of ``bench_timer``).
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass

import numpy as np

import darkspec
from darkspec.backends.base import Backend, Prepared, capability_grid
from darkspec.errors import DarkspecError
from darkspec.reference import activations, reorg, shortcut
from darkspec.reference.contract import NORMALIZATION_EPS, RELU_FLOOR, relu_floor_of
from darkspec.reference.dialects import Dialect, Quirk, parse_dialect
from darkspec.reference.shortcut import (
    Normalization,
    ShortcutGradients,
    ShortcutParams,
    UpdateParams,
    weights_per_input,
)

#: The kernel sources, in ``backends/kernels/`` (package data).
KERNEL_FILES = ("shortcut.cu", "reorg.cu")
#: NVRTC options (CuPy adds the architecture). --fmad=false: no product is fused into the addition after it, so the
#: device rounds every product and sum as the reference does.
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")
#: The contract's constants, handed to every kernel module as compile-time definitions (shortcut.cu needs them).
CONTRACT_DEFINES = (f"DS_NORMALIZATION_EPS={NORMALIZATION_EPS!r}", f"DS_RELU_FLOOR={RELU_FLOOR!r}")
#: The device; capabilities carry it.
DEVICE = "cuda"

#: Activation codes of the kernels (shortcut.cu, the enum of DS_LINEAR ...): every elementwise activation.
ACTIVATIONS = {
    "linear": 0, "leaky": 1, "revleaky": 2, "relu": 3, "relu6": 4, "logistic": 5, "loggy": 6, "tanh": 7, "elu": 8,
    "selu": 9, "gelu": 10, "relie": 11, "ramp": 12, "plse": 13, "hardtan": 14, "lhtan": 15, "stair": 16,
    "swish": 17, "mish": 18, "hard_mish": 19,
}
#: pjreddie's own double-precision loggy and tanh (spec/activations.md).
PJREDDIE_ACTIVATIONS = {**ACTIVATIONS, "loggy": 20, "tanh": 21}
_NORMALIZATION = {Normalization.NONE: 0, Normalization.RELU: 1, Normalization.SOFTMAX: 2}
GRAD_DARKNET_CPU, GRAD_DARKNET_GPU, GRAD_EXACT, GRAD_ZERO = 0, 1, 2, 3
WGRAD_NONE, WGRAD_SUM, WGRAD_GPU, WGRAD_EXACT = 0, 1, 2, 3

#: Kernel limits (shortcut.cu: DS_MAX_SLOTS, DS_MAX_BLOCK, DS_EPT).
MAX_INPUTS = 64
MAX_BLOCK = 256
ELEMENTS_PER_THREAD = 8
_MAX_GRID_Y = 65535
_INT32_MAX = 2**31 - 1

_FLOAT_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_MOVE_SUFFIX = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}


def kernel_source(filename: str) -> str:
    """The CUDA source of one kernel file, as shipped with the package."""
    kernels = importlib.resources.files("darkspec.backends").joinpath("kernels")
    return kernels.joinpath(filename).read_text(encoding="utf-8")


def kernel_names() -> dict[str, list[str]]:
    """Every kernel the backend may launch, by source file (each is an ``extern "C"`` entry of that file)."""
    indexed = [f"{t}_{i}" for t in ("f32", "f64") for i in ("i32", "i64")]
    return {
        "shortcut.cu": [f"{k}_{s}" for k in ("shortcut_forward", "shortcut_backward", "pjreddie_forward",
                                             "pjreddie_backward") for s in indexed]
        + [f"{k}_{t}" for k in ("shortcut_weight_reduce", "shortcut_update_gpu", "shortcut_update_cpu")
           for t in ("f32", "f64")],
        "reorg.cu": [f"reorg_gather_{u}_{i}" for u in _MOVE_SUFFIX.values() for i in ("i32", "i64")],
    }


def module_of(name: str, index: str = "i32") -> tuple[str, tuple[str, ...]]:
    """The module that holds kernel ``name``: its file and its definitions, the contract's constants and the
    DS_SKIP_* definitions that leave out the kernels of other storage types, index widths and families (shortcut.cu
    compiles one such module per combination at first use). Kernels without an index width in their name go in the
    module of ``index``."""
    if name.startswith("reorg_"):
        return "reorg.cu", CONTRACT_DEFINES
    parts = name.split("_")
    dtype = "f64" if "f64" in parts else "f32"
    index = next((p for p in parts if p in ("i32", "i64")), index)
    family = "pjreddie" if name.startswith("pjreddie_") else "shortcut"
    skip = ("DS_SKIP_F32" if dtype == "f64" else "DS_SKIP_F64", "DS_SKIP_I32" if index == "i64" else "DS_SKIP_I64",
            "DS_SKIP_SHORTCUT" if family == "pjreddie" else "DS_SKIP_PJREDDIE")
    return "shortcut.cu", (*CONTRACT_DEFINES, *sorted(skip))


# --- the executor: the only code that talks to CuPy -----------------------------------------------------------------


class CupyExecutor:
    """Compiles the kernel files with NVRTC (``cupy.RawModule``) and runs them on the current CUDA device."""

    def __init__(self):
        import cupy

        self.cupy = cupy
        self._modules = {}

    def compile(self, module):
        """The compiled module ``(filename, defines)`` (see ``module_of``), compiled at first use."""
        if module not in self._modules:
            filename, defines = module
            options = (*NVRTC_OPTIONS, *(f"-D{name}" for name in defines))
            compiled = self.cupy.RawModule(code=kernel_source(filename), options=options)
            compiled.compile()
            self._modules[module] = compiled
        return self._modules[module]

    def to_device(self, array: np.ndarray):
        return self.cupy.asarray(np.ascontiguousarray(array))

    def empty(self, shape, dtype):
        return self.cupy.empty(shape, dtype=dtype)

    def pointers(self, arrays):
        return self.cupy.asarray(np.array([a.data.ptr for a in arrays], dtype=np.uint64))

    def launch(self, module, name: str, grid, block, args):
        self.compile(module).get_function(name)(tuple(grid), tuple(block), tuple(args))

    def to_host(self, array) -> np.ndarray:
        return self.cupy.asnumpy(array)

    def version(self) -> str:
        cupy = self.cupy
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        device = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        return (f"cupy {cupy.__version__}, CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}, NVRTC {nvrtc}, "
                f"{name} (sm_{device.compute_capability})")


def cupy_unavailable_reason() -> str | None:
    """Why CuPy cannot run the kernels here (and the fix), or None when it can."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken installation
        return (f"cupy is not importable ({type(error).__name__}: {error}); install it with "
                "`pip install darkspec[cupy]` (cupy-cuda13x, for a CUDA 13 driver) or `pip install cupy-cuda12x` "
                "(for a CUDA 12 driver)")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return (f"no CUDA device: cupy {cupy.__version__} cannot reach one ({type(error).__name__}: {error}); run on "
                "a machine with an NVIDIA GPU and a driver for the CUDA version of the installed cupy package")
    if count < 1:
        return f"no CUDA device: cupy {cupy.__version__} sees none; run on a machine with an NVIDIA GPU"
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as error:
        return (f"NVRTC, which compiles the kernels, cannot be loaded ({type(error).__name__}: {error}); install it "
                "with `pip install nvidia-cuda-nvrtc` (CUDA 13) or `pip install \"cupy-cuda13x[ctk]\"`")
    return None


# --- launch shapes ---------------------------------------------------------------------------------------------------


def _plane_block(plane: int) -> int:
    """Threads of a plane kernel's block: a power of two from 32 to 256, about plane / ELEMENTS_PER_THREAD."""
    wanted = max(1, math.ceil(plane / ELEMENTS_PER_THREAD))
    return min(MAX_BLOCK, max(32, 1 << (wanted - 1).bit_length()))


def _chunks(plane: int, block: int) -> int:
    chunks = math.ceil(plane / (block * ELEMENTS_PER_THREAD))
    if chunks > _MAX_GRID_Y:
        raise DarkspecError("H*W", plane, f"at most {_MAX_GRID_Y * block * ELEMENTS_PER_THREAD} elements per channel "
                            "in the cupy backend", code="cupy-plane-too-large")
    return chunks


def _flat_grid(count: int, block: int = 256) -> int:
    return max(1, min(math.ceil(count / block), 1 << 20))


def _index_suffix(*counts: int) -> str:
    return "i64" if max(counts, default=0) > _INT32_MAX else "i32"


# --- the settings of one [shortcut] call -----------------------------------------------------------------------------


@dataclass
class _Shortcut:
    x: np.ndarray
    froms: list
    weights: np.ndarray | None
    params: ShortcutParams
    dialect: Dialect
    quirks: frozenset
    fastpath: bool

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def inputs(self):
        return [self.x, *self.froms]

    @property
    def per_input(self) -> int:
        if self.weights is None:
            return 0
        return weights_per_input(self.params.weights_type, self.x.shape[1])

    def int_settings(self):
        """(norm, floor_on, act, zero_act) as the kernels take them."""
        name = self.params.activation
        zero = name in activations.SHORTCUT_UNEVALUATED or (name == "relu6" and Quirk.CPU_RELU6_ZERO in self.quirks)
        floor_on = relu_floor_of(self.dialect) is not None
        return (np.int32(_NORMALIZATION[self.params.weights_normalization]), np.int32(floor_on),
                np.int32((PJREDDIE_ACTIVATIONS if self.dialect == Dialect.PJREDDIE else ACTIVATIONS).get(name, 0)),
                np.int32(zero))


def _shortcut_settings(pass_, x, froms, weights, params, dialect, quirks, from_input_shapes) -> _Shortcut:
    """The reference's checks, then what the kernels need."""
    x, froms, weights, dialect, quirks = shortcut.check_call(pass_, x, froms, weights, params, dialect, quirks)
    if len(froms) + 1 > MAX_INPUTS:
        raise DarkspecError("from", f"{len(froms)} layers", f"at most {MAX_INPUTS - 1} from layers in the cupy backend",
                            code="cupy-too-many-inputs")
    fastpath = (Quirk.CPU_FASTPATH_INPUT_DIMS in quirks and weights is None and len(froms) == 1
                and from_input_shapes is not None and tuple(from_input_shapes[0]) == x.shape[1:])
    return _Shortcut(x, froms, weights, params, dialect, quirks, fastpath)


def _backward_settings(x, froms, weights, delta, weight_updates, params, dialect, quirks, from_input_shapes):
    """The reference's checks of a backward, in its order: (settings, delta, weight_updates)."""
    op = _shortcut_settings("backward", x, froms, weights, params, dialect, quirks, from_input_shapes)
    delta, weight_updates = shortcut.check_backward_inputs(op.x, op.weights, delta, weight_updates)
    # The reference's own refusals of the activation gradient (names whose backward aborts).
    empty = np.zeros(0, op.dtype)
    shortcut.activation_factor(empty, empty, op.params, op.dialect, op.quirks)
    return op, delta, weight_updates


class DeviceShortcut:
    """One weighted [shortcut] call (an AlexeyAB dialect) with its arrays on the device.

    The constructor copies the inputs (and, for a backward, the delta and the weight-update accumulator) to the
    device and allocates every output; ``forward()`` and ``backward()`` only launch kernels; ``output()`` and
    ``gradients()`` copy the results back. ``bytes_forward`` and ``bytes_backward`` are the least data each pass
    must move: every input read once, every output written once.
    """

    def __init__(self, backend: "CupyBackend", op: _Shortcut, delta=None, weight_updates=None):
        run = self.run = backend._run()
        self.backend, self.op = backend, op
        x = op.x
        self.dtype = dtype = x.dtype
        self.batch, self.channels = x.shape[:2]
        self.plane = plane = int(np.prod(x.shape[2:]))
        self.sizes = np.array([int(np.prod(a.shape[1:])) for a in op.inputs], dtype=np.int64)
        self.grid_channels = max(self.channels, *(math.ceil(int(a) / plane) for a in self.sizes)) if plane \
            else self.channels
        self.block = _plane_block(plane)
        self.chunks = _chunks(plane, self.block) if plane else 0
        self.index = _index_suffix(self.batch * self.grid_channels * plane, *(a.size for a in op.inputs))
        self.suffix = f"{_FLOAT_SUFFIX[dtype]}_{self.index}"
        self.norm, self.floor_on, self.act, self.zero = op.int_settings()

        self.inputs = [run.to_device(a) for a in op.inputs]
        self.input_table = run.pointers(self.inputs)
        self.sizes_d = run.to_device(self.sizes)
        self.weights_d = run.to_device(op.weights if op.weights is not None else np.zeros(1, dtype))
        self.out = run.empty(x.shape, dtype)
        weight_bytes = 0 if op.weights is None else op.weights.nbytes
        self.bytes_forward = sum(a.nbytes for a in op.inputs) + weight_bytes + x.nbytes
        self.bytes_backward = 0
        if delta is None:
            return

        if self.zero:  # the forward is 0 under a quirk: so is the factor, in every dialect
            self.grad = GRAD_ZERO
        elif op.dialect == Dialect.EXACT:
            self.grad = GRAD_EXACT
        else:
            self.grad = GRAD_DARKNET_GPU if op.dialect == Dialect.DARKNET_GPU else GRAD_DARKNET_CPU
        self.wgrad = WGRAD_NONE
        if op.weights is not None:
            self.wgrad = {Dialect.DARKNET_CPU: WGRAD_SUM, Dialect.DARKNET_GPU: WGRAD_GPU,
                          Dialect.EXACT: WGRAD_EXACT}[op.dialect]
        self.delta_d = run.to_device(delta)
        self.d_out = run.empty(x.shape, dtype)
        if x.size:
            self.input_deltas = [run.empty(a.shape, dtype) for a in op.inputs]
        else:  # no kernel runs: the deltas receive nothing
            self.input_deltas = [run.to_device(np.zeros(a.shape, dtype)) for a in op.inputs]
        self.delta_table = run.pointers(self.input_deltas)
        partials = len(self.inputs) * self.batch * self.channels * self.chunks if self.wgrad else 0
        self.partials = run.empty((max(1, partials),), np.float64)
        self.init_d = self.updates_d = None
        if op.weights is not None:
            init = np.zeros_like(op.weights) if weight_updates is None else np.asarray(weight_updates, dtype=dtype)
            self.init_d = run.to_device(init.reshape(-1))
            self.updates_d = run.empty((op.weights.size,), dtype)
        # read: the inputs, the delta, the weights, the accumulator; written: d, every input's delta, the accumulator
        self.bytes_backward = 2 * sum(a.nbytes for a in op.inputs) + 2 * x.nbytes + 3 * weight_bytes

    def forward(self):
        op = self.op
        if op.x.size == 0:
            return
        self.backend._launch(f"shortcut_forward_{self.suffix}", (self.batch * self.channels, self.chunks, 1),
                             (self.block, 1, 1), (
            self.input_table, self.sizes_d, np.int32(len(self.inputs)), self.weights_d, np.int32(op.per_input),
            self.norm, self.floor_on, self.act, self.zero, np.int32(op.fastpath),
            np.int64(op.froms[0].size if op.fastpath else 0), np.int32(self.channels), np.int64(self.plane),
            self.out))

    def backward(self):
        op = self.op
        if op.x.size:
            self.backend._launch(f"shortcut_backward_{self.suffix}", (self.batch * self.grid_channels, self.chunks, 1),
                                 (self.block, 1, 1), (
                self.input_table, self.sizes_d, np.int32(len(self.inputs)), self.weights_d, np.int32(op.per_input),
                self.norm, self.floor_on, self.act, self.zero, np.int32(self.grad), np.int32(op.fastpath),
                np.int64(op.froms[0].size if op.fastpath else 0), np.int32(self.channels),
                np.int32(self.grid_channels), np.int64(self.plane), np.int32(self.batch), self.delta_d, self.d_out,
                self.delta_table, np.int32(self.wgrad), self.partials))
        if op.weights is not None:
            chunks = self.chunks if op.x.size else 0
            self.backend._launch(f"shortcut_weight_reduce_{_FLOAT_SUFFIX[self.dtype]}", (op.per_input, 1, 1),
                                 (MAX_BLOCK, 1, 1), (
                self.partials, np.int32(len(self.inputs)), np.int32(self.batch), np.int32(self.channels),
                np.int32(chunks), self.weights_d, np.int32(op.per_input), self.norm, self.floor_on,
                np.int32(self.wgrad), self.init_d, self.updates_d), index=self.index)

    def output(self) -> np.ndarray:
        if self.op.x.size == 0:
            return np.empty_like(self.op.x)
        return self.run.to_host(self.out)

    def gradients(self) -> ShortcutGradients:
        run = self.run
        updates = None if self.updates_d is None else run.to_host(self.updates_d)
        delta = run.to_host(self.d_out) if self.op.x.size else np.zeros_like(self.op.x)
        return ShortcutGradients(delta=delta, input_deltas=[run.to_host(a) for a in self.input_deltas],
                                 weight_updates=updates)


class CupyBackend(Backend):
    """Raw CUDA kernels through CuPy; ``executor`` replaces the CuPy executor (tests run the kernels on the CPU)."""

    name = "cupy"

    def __init__(self, executor=None):
        self._executor = executor
        self._injected = executor is not None

    # --- what it is ------------------------------------------------------------------------------------------------

    def availability(self):
        if not self._injected:
            reason = cupy_unavailable_reason()
            if reason:
                return reason
        try:  # the module of float32 [shortcut] kernels, which every use of the layer needs
            self._run().compile(module_of("shortcut_forward_f32_i32"))
        except Exception as error:
            return f"the kernels do not compile here ({type(error).__name__}: {error})"
        return None

    def capabilities(self):
        return capability_grid(device=DEVICE)

    def quirks(self):
        return frozenset(Quirk)

    def version(self):
        try:
            detail = self._run().version()
        except Exception as error:
            detail = f"no device ({type(error).__name__})"
        return f"darkspec {darkspec.__version__} cupy backend, {detail}"

    def _run(self):
        if self._executor is None:
            self._executor = CupyExecutor()
        return self._executor

    def _launch(self, name, grid, block, args, index="i32"):
        self._run().launch(module_of(name, index), name, grid, block, args)

    # --- [shortcut] ------------------------------------------------------------------------------------------------

    def shortcut_forward(self, x, froms, weights=None, *, params=ShortcutParams(), dialect=Dialect.DARKNET_CPU,
                         quirks=frozenset(), from_input_shapes=None):
        op = _shortcut_settings("forward", x, froms, weights, params, dialect, quirks, from_input_shapes)
        if op.dialect == Dialect.PJREDDIE:
            return self._pjreddie(op, None)
        call = DeviceShortcut(self, op)
        call.forward()
        return call.output()

    def shortcut_backward(self, x, froms, weights, delta, *, params=ShortcutParams(), dialect=Dialect.DARKNET_CPU,
                          quirks=frozenset(), weight_updates=None, from_input_shapes=None):
        op, delta, weight_updates = _backward_settings(x, froms, weights, delta, weight_updates, params, dialect,
                                                           quirks, from_input_shapes)
        if op.dialect == Dialect.PJREDDIE:
            return self._pjreddie(op, delta)
        call = DeviceShortcut(self, op, delta, weight_updates)
        call.backward()
        return call.gradients()

    def prepare_shortcut(self, x, froms, weights=None, delta=None, *, params=ShortcutParams(),
                         dialect=Dialect.DARKNET_GPU, quirks=frozenset(), weight_updates=None,
                         from_input_shapes=None) -> "DeviceShortcut":
        """One [shortcut] call with its arrays already on the device: ``forward()`` and ``backward()`` then only
        launch kernels (asynchronously), for timing. The AlexeyAB dialects only."""
        if delta is None:
            op = _shortcut_settings("forward", x, froms, weights, params, dialect, quirks, from_input_shapes)
        else:
            op, delta, weight_updates = _backward_settings(x, froms, weights, delta, weight_updates, params,
                                                           dialect, quirks, from_input_shapes)
        if op.dialect == Dialect.PJREDDIE:
            raise DarkspecError("dialect", op.dialect.value, "an AlexeyAB dialect for a prepared call",
                                code="pass-not-in-dialect")
        return DeviceShortcut(self, op, delta, weight_updates)

    def prepare(self, op, pass_, inputs, settings):
        """The [shortcut] kernels on device arrays (the AlexeyAB dialects' forward and backward)."""
        if op != "shortcut" or pass_ == "update" or parse_dialect(settings["dialect"]) == Dialect.PJREDDIE:
            return None
        call = self.prepare_shortcut(inputs["x"], inputs["froms"], inputs["weights"],
                                     inputs["delta"] if pass_ == "backward" else None, params=settings["params"],
                                     dialect=settings["dialect"], weight_updates=inputs.get("weight_updates"))
        return Prepared(call.forward, call.output) if pass_ == "forward" else Prepared(call.backward, call.gradients)

    def bench_timer(self):
        """CUDA events on CuPy's current stream, and a device-to-device copy as the bandwidth baseline."""
        import cupy

        from darkspec.bench.timing import CudaEventTimer

        return CudaEventTimer("cuda events (cupy)", DEVICE, lambda: (cupy.cuda.Event(), cupy.cuda.Event()),
                              lambda start, end: cupy.cuda.get_elapsed_time(start, end) / 1e3,
                              lambda n: cupy.empty(n, dtype=cupy.uint8))

    def _pjreddie(self, op: _Shortcut, delta):
        """pjreddie's two-input shortcut: forward (delta None) or backward."""
        source = op.froms[0]
        run = self._run()
        x = op.x
        dtype = x.dtype.type
        _, c2, h2, w2 = x.shape
        _, c1, h1, w1 = source.shape
        stride, sample = max(w1 // w2, 1), max(w2 // w1, 1)
        dims = tuple(np.int64(v) for v in (c2, h2, w2, c1, h1, w1, stride, sample))
        scalars = (dtype(op.params.alpha), dtype(op.params.beta), np.int32(ACTIVATIONS[op.params.activation]))
        suffix = f"{_FLOAT_SUFFIX[x.dtype]}_{_index_suffix(x.size + source.size)}"
        x_d, from_d = run.to_device(x), run.to_device(source)
        if delta is None:
            out = run.empty(x.shape, x.dtype)
            if x.size:
                self._launch(f"pjreddie_forward_{suffix}", (_flat_grid(x.size), 1, 1), (256, 1, 1),
                           (x_d, from_d, out, np.int64(x.size), *dims, *scalars))
            return run.to_host(out)
        d_out, dx, dfrom = run.empty(x.shape, x.dtype), run.empty(x.shape, x.dtype), run.empty(source.shape, x.dtype)
        total = x.size + source.size
        if total:
            self._launch(f"pjreddie_backward_{suffix}", (_flat_grid(total), 1, 1), (256, 1, 1),
                       (x_d, from_d, run.to_device(delta), d_out, dx, dfrom, np.int64(x.size), np.int64(source.size),
                        *dims, *scalars))
        return ShortcutGradients(delta=run.to_host(d_out), input_deltas=[run.to_host(dx), run.to_host(dfrom)],
                                 weight_updates=None)

    def shortcut_update(self, weights, weight_updates, hyper: UpdateParams, dialect):
        weights, weight_updates, dialect = shortcut.check_update_inputs(weights, weight_updates, hyper, dialect)
        step = shortcut.update_step(hyper, dialect, weights.dtype.type)
        if step is None:
            return weights.copy(), weight_updates.copy()
        run = self._run()
        w_d, u_d = run.to_device(weights.reshape(-1)), run.to_device(weight_updates.reshape(-1))
        n = weights.size
        suffix = _FLOAT_SUFFIX[weights.dtype]
        args: tuple
        if step.repair_and_clip:
            args = (w_d, u_d, np.int64(n), step.rate, step.momentum)
            name = f"shortcut_update_gpu_{suffix}"
        else:
            args = (w_d, u_d, np.int64(n), step.decay, step.rate, step.momentum)
            name = f"shortcut_update_cpu_{suffix}"
        if n:
            self._launch(name, (_flat_grid(n), 1, 1), (256, 1, 1), args)
        return run.to_host(w_d).reshape(weights.shape), run.to_host(u_d).reshape(weights.shape)

    # --- [reorg3d] and [reorg] -------------------------------------------------------------------------------------

    def reorg_forward(self, x, stride, reverse, old):
        x = np.asarray(x)
        plan = reorg.plan(reorg.REORG_OLD if old else reorg.REORG3D, x.shape, stride, reverse)
        return self._reorg(plan, x, backward=False)

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        # Darknet overwrites the previous layer's delta: its old value does not matter.
        delta = np.asarray(delta)
        plan = reorg.plan_from_output(reorg.REORG_OLD if old else reorg.REORG3D, delta.shape, stride, reverse)
        return self._reorg(plan, delta, backward=True)

    def _reorg(self, plan, array: np.ndarray, backward: bool) -> np.ndarray:
        out_shape = plan.in_shape if backward else plan.out_shape
        if array.dtype.itemsize not in _MOVE_SUFFIX or array.dtype.hasobject:
            raise DarkspecError("dtype", str(array.dtype), "a numeric dtype of 1, 2, 4 or 8 bytes", code="bad-dtype")
        if array.size == 0:
            return np.empty(out_shape, array.dtype)
        run = self._run()
        width = np.dtype(f"u{array.dtype.itemsize}")
        source = run.to_device(np.ascontiguousarray(array).reshape(-1).view(width))
        out = run.empty((array.size,), width)
        w, h, c = plan.dims
        forward = plan.forward_flag != backward
        name = f"reorg_gather_{_MOVE_SUFFIX[array.dtype.itemsize]}_{_index_suffix(array.size)}"
        self._launch(name, (_flat_grid(array.size), 1, 1), (256, 1, 1), (
            source, out, np.int64(w), np.int64(h), np.int64(c), np.int64(plan.in_shape[0]), np.int64(plan.stride),
            np.int32(forward)))
        return run.to_host(out).view(array.dtype).reshape(out_shape)
