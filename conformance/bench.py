"""The throughput matrix (``darkspec bench``): every available backend x op x size x dtype, timed.

For each case it reports the median time and its spread (p20/p80), the least data the op must move (GB/s), and
two ratios measured in the same run, on the same input buffers, in interleaved rounds:

- to the memory-copy bandwidth of the same device (on the CPU: ``np.copyto`` moving as many bytes as the op);
- to the naive eager-PyTorch formulation of the same op (``x*w0 + a*w1 + b*w2``), when torch is importable.

Results go to a terminal table, ``bench.json`` (machine, versions and every figure) and ``bench.png`` (% of copy
bandwidth by backend and op). ``--compare BASELINE.json`` flags every case slower than the baseline by more than
the spread measured on either side.

Run it as ``python -m darkspec.conformance.bench [--quick]``, ``darkspec bench`` or ``nox -s bench``.

Timers. A :class:`Timer` runs one call and returns how long the work took; it also builds the memory copy of its
device. The CPU timer uses ``time.perf_counter``. A backend that computes elsewhere (a GPU) supplies its own from an
optional method ``bench_timer()``: one that records CUDA events around the call and synchronizes on the end event,
and whose ``copy_call`` is a device-to-device copy. Its cases are then compared with the copy bandwidth of its own
device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tabulate import tabulate

import darkspec
from darkspec.backends.base import REORG_DIALECT, Backend, Capability
from darkspec.backends.registry import discover, load
from darkspec.errors import DarkspecError
from darkspec.provenance import git_revision
from darkspec.reference.reorg import reorg3d_output_shape
from darkspec.reference.shortcut import NORMALIZATION_EPS, ShortcutParams, weights_per_input

SCHEMA = "darkspec-bench/1"
DEFAULT_OUTPUT = Path("reports")
JSON_NAME, PNG_NAME = "bench.json", "bench.png"
TORCH_EAGER = "torch eager"

# --------------------------------------------------------------------------------------------------------------
# The ops measured and the least data each must move.


@dataclass(frozen=True)
class OpSpec:
    """One op of the matrix: a pass of [shortcut] with n from-inputs, or a [reorg3d] forward."""

    op: str
    pass_: str
    n_from: int = 0
    weights_type: str = "none"
    normalization: str = "none"
    reverse: bool = False
    stride: int = 2
    activation: str = "linear"

    @property
    def key(self) -> str:
        """A stable identifier (JSON, compare mode)."""
        if self.op == "shortcut":
            return f"shortcut.{self.pass_}.n{self.n_from}.{self.weights_type}.{self.normalization}"
        return f"{self.op}.{self.pass_}.reverse{int(self.reverse)}.stride{self.stride}"

    @property
    def label(self) -> str:
        if self.op == "shortcut":
            short = {"forward": "fwd", "backward": "bwd"}[self.pass_]
            return f"shortcut {short} n={self.n_from} {self.weights_type}/{self.normalization}"
        return f"{self.op} {'reverse' if self.reverse else 'forward'} s={self.stride}"


#: Three [shortcut] configurations that cover every weights type and normalization, each forward and backward, and
#: [reorg3d] forward with reverse=0 and reverse=1. Activation linear throughout.
SHORTCUT_CONFIGS = ((1, "none", "none"), (2, "per_feature", "relu"), (3, "per_channel", "softmax"))
OPS = (
    *(OpSpec("shortcut", "forward", n, w, z) for n, w, z in SHORTCUT_CONFIGS),
    *(OpSpec("shortcut", "backward", n, w, z) for n, w, z in SHORTCUT_CONFIGS),
    OpSpec("reorg3d", "forward", reverse=False),
    OpSpec("reorg3d", "forward", reverse=True),
)
#: The [shortcut] dialect measured: the first of these the backend declares for the op, pass and dtype.
SHORTCUT_DIALECTS = ("darknet-cpu", "darknet-gpu", "exact", "darknet-inference")


def weight_count(spec: OpSpec, shape) -> int:
    return (spec.n_from + 1) * weights_per_input(spec.weights_type, shape[1]) if spec.op == "shortcut" else 0


def bytes_moved(spec: OpSpec, shape, dtype) -> int:
    """The least data the op must move: each input it depends on read once, each output written once.

    With T = N*C*H*W elements, n from-inputs and W = (n+1)*(0, 1 or C) weights:

    - shortcut forward: reads x and the n froms and the weights, writes the output: (n+2)*T + W.
    - shortcut backward: reads delta, and x and the froms only when it needs them (a weight gradient, or an activation
      other than linear), the weights and the update accumulator; writes the delta after the activation gradient,
      one delta per input and the accumulator: T + [(n+1)*T] + 2W + (n+2)*T + W.
    - reorg3d (a permutation): reads T, writes T.
    """
    elements = math.prod(shape)
    itemsize = np.dtype(dtype).itemsize
    if spec.op == "shortcut":
        weights = weight_count(spec, shape)
        n = spec.n_from
        if spec.pass_ == "forward":
            return ((n + 2) * elements + weights) * itemsize
        needs_inputs = weights > 0 or spec.activation != "linear"
        reads = elements + ((n + 1) * elements if needs_inputs else 0) + 2 * weights
        writes = (n + 2) * elements + weights
        return (reads + writes) * itemsize
    return 2 * elements * itemsize


def set_bytes(spec: OpSpec, shape, dtype) -> int:
    """The bytes of one set of input arrays (everything handed to the call, needed or not)."""
    elements, itemsize = math.prod(shape), np.dtype(dtype).itemsize
    if spec.op != "shortcut":
        return elements * itemsize
    tensors = spec.n_from + 1 + (spec.pass_ == "backward")
    weights = weight_count(spec, shape) * (2 if spec.pass_ == "backward" else 1)
    return (tensors * elements + weights) * itemsize


def skip_reason(spec: OpSpec, shape) -> str | None:
    """Why the op cannot run on this size (darkspec's own rules), or None."""
    if spec.op == "reorg3d":
        try:
            reorg3d_output_shape(shape, spec.stride, spec.reverse)
        except DarkspecError as error:
            return str(error)
    return None


# --------------------------------------------------------------------------------------------------------------
# Profiles.


@dataclass(frozen=True)
class Profile:
    name: str
    sizes: tuple[tuple[int, int, int, int], ...]
    warmup: int
    min_repeats: int
    max_repeats: int
    #: Rounds go on past min_repeats until this many seconds have passed in the case (or max_repeats).
    min_time_s: float
    #: Input sets to rotate among: enough for 2x the last-level cache, within these bounds.
    max_sets: int
    set_budget_bytes: int


PROFILES = {
    "quick": Profile("quick", ((1, 64, 104, 104), (4, 256, 26, 26)), warmup=1, min_repeats=5, max_repeats=15,
                     min_time_s=0.1, max_sets=8, set_budget_bytes=256 << 20),
    "full": Profile("full", ((1, 64, 208, 208), (8, 256, 52, 52), (16, 512, 26, 26)), warmup=2, min_repeats=9,
                    max_repeats=50, min_time_s=1.0, max_sets=32, set_budget_bytes=1536 << 20),
}


def rotation_sets(per_set: int, profile: Profile, llc_bytes: int) -> int:
    """How many input sets to rotate among so that a set is out of the cache when its turn comes again."""
    wanted = math.ceil(2 * llc_bytes / max(per_set, 1))
    affordable = profile.set_budget_bytes // max(per_set, 1)
    return max(2, min(wanted, profile.max_sets, affordable))


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise DarkspecError("--size", text, "NxCxHxW: four positive integers, e.g. 8x256x52x52", code="bad-size")
    return dims  # type: ignore[return-value]


def size_label(shape) -> str:
    return "x".join(str(d) for d in shape)


# --------------------------------------------------------------------------------------------------------------
# Timers.


class Timer:
    """Times calls on one device (here: the CPU, with ``time.perf_counter``).

    ``time_call(run, i)`` runs ``run(i)`` once and returns the seconds the work took, finished. ``copy_call(nbytes,
    sets)`` returns a ``run(i)`` that copies nbytes/2 bytes between two buffers of set i: read plus write, as many
    bytes as the op it is compared with. A GPU backend returns its own Timer from ``bench_timer()``, e.g.::

        class CudaEventTimer(Timer):
            name, device = "cuda events", "cuda:0"
            def time_call(self, run, i):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); run(i); end.record(); end.synchronize()
                return start.elapsed_time(end) / 1e3
            def copy_call(self, nbytes, sets):
                src = [torch.ones(nbytes // 2, dtype=torch.uint8, device="cuda") for _ in range(sets)]
                dst = [torch.empty_like(s) for s in src]
                return lambda i: dst[i].copy_(src[i])
    """

    name = "time.perf_counter"
    device = "cpu"

    def time_call(self, run: Callable[[int], Any], i: int) -> float:
        start = time.perf_counter()
        run(i)
        return time.perf_counter() - start

    def copy_call(self, nbytes: int, sets: int) -> Callable[[int], Any]:
        half = max(1, nbytes // 2)
        sources = [np.full(half, 1, dtype=np.uint8) for _ in range(sets)]
        targets = [np.full(half, 2, dtype=np.uint8) for _ in range(sets)]  # touched: no page faults when timed
        return lambda i: np.copyto(targets[i], sources[i])


CPU_TIMER = Timer()


def timer_for(backend: Backend) -> Timer:
    supplied = getattr(backend, "bench_timer", None)
    return supplied() if callable(supplied) else CPU_TIMER


# --------------------------------------------------------------------------------------------------------------
# Inputs and the calls timed on them.


def make_sets(spec: OpSpec, shape, dtype, count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` independent input sets, values in [-1, 1) (weights in [0.5, 1.5))."""
    dtype = np.dtype(dtype)

    def tensor():
        a = rng.random(shape, dtype=dtype) if dtype in (np.float32, np.float64) else rng.random(shape).astype(dtype)
        a *= 2
        a -= 1
        return a

    sets = []
    for _ in range(count):
        if spec.op != "shortcut":
            sets.append({"x": tensor()})
            continue
        nweights = weight_count(spec, shape)
        sets.append({
            "x": tensor(),
            "froms": [tensor() for _ in range(spec.n_from)],
            "weights": (rng.random(nweights) + 0.5).astype(dtype) if nweights else None,
            "delta": tensor() if spec.pass_ == "backward" else None,
            "weight_updates": np.zeros(nweights, dtype) if nweights and spec.pass_ == "backward" else None,
        })
    return sets


def backend_call(backend: Backend, spec: OpSpec, dialect: str, sets: list[dict]) -> Callable[[int], Any]:
    """``run(i)``: the backend's op on input set i; for a forward, the backend's own path into a preallocated output
    where it has one (``Backend.prepare_forward``), so that the NumPy boundary is not what is timed."""
    params = ShortcutParams(weights_type=spec.weights_type, weights_normalization=spec.normalization,
                            activation=spec.activation)
    if spec.pass_ == "forward":
        settings = (dict(stride=spec.stride, reverse=spec.reverse) if spec.op == "reorg3d"
                    else dict(params=params, dialect=dialect))
        prepared = [backend.prepare_forward(spec.op, s, settings) for s in sets]
        if all(prepared):
            return lambda i: prepared[i]()
    if spec.op == "reorg3d":
        return lambda i: backend.reorg_forward(sets[i]["x"], spec.stride, spec.reverse, False)
    if spec.pass_ == "forward":
        return lambda i: backend.shortcut_forward(
            sets[i]["x"], sets[i]["froms"], sets[i]["weights"], params=params, dialect=dialect, quirks=frozenset(),
            from_input_shapes=None)
    return lambda i: backend.shortcut_backward(
        sets[i]["x"], sets[i]["froms"], sets[i]["weights"], sets[i]["delta"], params=params, dialect=dialect,
        quirks=frozenset(), weight_updates=sets[i]["weight_updates"], from_input_shapes=None)


def import_torch():
    """torch, or None where it is not importable."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install is "not importable" too
        return None
    return torch


def torch_eager_call(torch, spec: OpSpec, shape, sets: list[dict]) -> Callable[[int], Any]:
    """``run(i)``: the naive eager-PyTorch formulation of the op (darknet-cpu math, linear activation) on set i.

    The tensors share memory with the NumPy sets (``torch.from_numpy``), so both read the same buffers.
    """
    def t(a):
        return None if a is None else torch.from_numpy(a)

    tsets = [{k: ([t(a) for a in v] if isinstance(v, list) else t(v)) for k, v in s.items()} for s in sets]
    n_batch, channels, height, width = shape
    s = spec.stride
    if spec.op == "reorg3d":
        if not spec.reverse:  # SpaceToDepth, DCR
            return lambda i: tsets[i]["x"].reshape(n_batch, channels, height // s, s, width // s, s) \
                .permute(0, 3, 5, 1, 2, 4).reshape(n_batch, s * s * channels, height // s, width // s).contiguous()
        # reverse=1: DepthToSpace (DCR) of the buffer read as (N, C/s^2, H*s, W*s), the result read back as that shape.
        return lambda i: tsets[i]["x"].reshape(n_batch, s, s, channels // s ** 4, height * s, width * s) \
            .permute(0, 3, 4, 1, 5, 2).reshape(n_batch, channels // (s * s), height * s, width * s).contiguous()

    slots = spec.n_from + 1

    def normalized(weights):
        if weights is None:
            return None
        table = weights.view(slots, -1)
        if spec.normalization == "relu":
            phi = torch.relu(table)
        elif spec.normalization == "softmax":
            phi = torch.exp(table - table.amax(dim=0))
        else:
            return [w.view(1, -1, 1, 1) for w in table]
        table = phi / (NORMALIZATION_EPS + phi.sum(dim=0))
        return [w.view(1, -1, 1, 1) for w in table]

    def forward(i):
        inputs = [tsets[i]["x"], *tsets[i]["froms"]]
        what = normalized(tsets[i]["weights"])
        if what is None:  # x + a + b
            out = inputs[0]
            for a in inputs[1:]:
                out = out + a
            return out
        out = inputs[0] * what[0]  # x*w0 + a*w1 + b*w2
        for a, w in zip(inputs[1:], what[1:]):
            out = out + a * w
        return out

    def backward(i):
        inputs = [tsets[i]["x"], *tsets[i]["froms"]]
        what = normalized(tsets[i]["weights"])
        d = tsets[i]["delta"].clone()  # linear: the activation's gradient is 1
        if what is None:
            return d, [d.clone() for _ in inputs], None
        input_deltas = [d * w for w in what]
        if spec.weights_type == "per_channel":
            grads = [(d * a).sum(dim=(0, 2, 3)) for a in inputs]
        else:
            grads = [(d * a).sum().reshape(1) for a in inputs]
        return d, input_deltas, tsets[i]["weight_updates"] + torch.stack(grads).reshape(-1)

    return forward if spec.pass_ == "forward" else backward


# --------------------------------------------------------------------------------------------------------------
# Measurement: interleaved rounds, every contender of a case once per round.


@dataclass
class Contender:
    name: str
    timer: Timer
    run: Callable[[int], Any]
    group: int  # contenders of one group share input sets; a counter per group rotates through them
    samples: list = field(default_factory=list)
    error: str | None = None


def measure(contenders: list[Contender], sets: int, profile: Profile) -> None:
    """Warm-up rounds, then timed rounds until min_repeats and min_time_s (or max_repeats) are reached.

    Within a group the set index advances with every call, whoever makes it, so no call finds the set it reads in
    the cache because the call before it just read the same one.
    """
    counters: dict[int, int] = {}

    def one(c: Contender, keep: bool):
        i = counters.get(c.group, 0)
        counters[c.group] = i + 1
        try:
            seconds = c.timer.time_call(c.run, i % sets)
        except Exception as error:  # noqa: BLE001 - a failing backend is reported in its cell, not raised
            c.error = f"{type(error).__name__}: {error}"
            c.samples.clear()
            return
        if keep:
            c.samples.append(seconds)

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(profile.warmup):
            for c in contenders:
                if c.error is None:
                    one(c, keep=False)
        start, rounds = time.perf_counter(), 0
        while rounds < profile.min_repeats or (
                rounds < profile.max_repeats and time.perf_counter() - start < profile.min_time_s):
            live = [c for c in contenders if c.error is None]
            if not live:
                break
            for c in live:
                one(c, keep=True)
            rounds += 1
    finally:
        if enabled:
            gc.enable()


def stats(samples: list[float]) -> dict:
    p20, median, p80 = (float(v) for v in np.percentile(samples, [20, 50, 80]))
    return {"median_s": median, "p20_s": p20, "p80_s": p80, "spread": (p80 - p20) / median if median else 0.0,
            "repeats": len(samples), "samples_s": [float(s) for s in samples]}


# --------------------------------------------------------------------------------------------------------------
# Targets (reported, never asserted).


@dataclass(frozen=True)
class Target:
    backend: str
    min_pct: float
    passes: tuple[str, ...] | None = None  # None: every pass
    device: str = "cpu"

    def applies(self, result: dict) -> bool:
        return (result["backend"] == self.backend and result["device"] == self.device
                and (self.passes is None or result["pass"] in self.passes))

    def describe(self) -> str:
        which = f"{'/'.join(self.passes)} " if self.passes else ""
        return f"{self.backend} {which}>= {self.min_pct:g}% of copy bandwidth ({self.device})"


TARGETS = (Target("torch", 60.0, ("forward",)), Target("reference", 25.0))


def target_for(result: dict) -> Target | None:
    return next((t for t in TARGETS if t.applies(result)), None)


# --------------------------------------------------------------------------------------------------------------
# The machine and versions.


def llc_bytes() -> int:
    """The last-level cache of CPU 0 (Linux sysfs), else 32 MiB."""
    best = (0, 0)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        except (OSError, ValueError, IndexError):
            continue
        best = max(best, (level, size))
    return best[1] or 32 << 20


def machine_info() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model or platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "usable_cores": usable, "memory_bytes": memory, "llc_bytes": llc_bytes(),
            "system": platform.platform(), "architecture": platform.machine()}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------------------
# The matrix.


def select_backends(specs=(), only: bool = False) -> list[Backend]:
    """Every backend discover() knows (unless ``only``) plus those named; one per name, an available one first."""
    found = [] if only else discover()
    found += [load(spec) for spec in specs]
    chosen: dict[str, Backend] = {}
    for backend in found:
        current = chosen.get(backend.name)
        if current is None or (current.availability() and not backend.availability()):
            chosen[backend.name] = backend
    return list(chosen.values())


def capability_for(backend: Backend, spec: OpSpec, dtype: str) -> Capability | None:
    dialects = SHORTCUT_DIALECTS if spec.op == "shortcut" else (REORG_DIALECT,)
    declared = [c for c in backend.capabilities() if c.op == spec.op and c.pass_ == spec.pass_ and c.dtype == dtype]
    for dialect in dialects:
        for capability in sorted(declared):
            if capability.dialect == dialect:
                return capability
    return None


def run_matrix(backends: list[Backend], profile: Profile, dtypes=None, ops=OPS, progress=None,
               seed: int = 0, torch_threads: int | None = 1, torch_baseline: bool = True) -> dict:
    """Measure every case and return the report (the content of bench.json, without the chart entry).

    ``torch_threads`` is handed to ``torch.set_num_threads`` while measuring (the torch backends and the eager
    baseline); None keeps torch's default. The default, 1, matches the copy baseline, one thread (``np.copyto``).
    ``torch_baseline=False`` leaves the eager-PyTorch column out (n/a).
    """
    started = time.perf_counter()
    machine = machine_info()
    torch = import_torch() if torch_baseline or torch_threads else sys.modules.get("torch")
    eager_torch = torch if torch_baseline else None
    threads_before = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None and torch_threads:
            torch.set_num_threads(torch_threads)
        threads = torch.get_num_threads() if torch is not None else None
        available = [b for b in backends if not b.availability()]
        declared = sorted({c.dtype for b in available for c in b.capabilities()})
        dtypes = [d for d in declared if dtypes is None or d in dtypes]
        rng = np.random.default_rng(seed)
        results, skipped = [], []
        cases = [(shape, dtype, spec) for shape in profile.sizes for dtype in dtypes for spec in ops]
        for number, (shape, dtype, spec) in enumerate(cases, 1):
            plan = [(b, cap) for b in available if (cap := capability_for(b, spec, dtype))]
            if not plan:
                continue
            reason = skip_reason(spec, shape)
            if reason:
                skipped.append({"op": spec.key, "shape": list(shape), "dtype": dtype, "reason": reason})
                continue
            case_start = time.perf_counter()
            results += _run_case(spec, shape, dtype, plan, profile, eager_torch, rng, machine["llc_bytes"])
            if progress:
                print(f"[{number}/{len(cases)}] {size_label(shape)} {dtype} {spec.label}: "
                      f"{time.perf_counter() - case_start:.1f} s", file=progress, flush=True)
    finally:
        if torch is not None:
            torch.set_num_threads(threads_before)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "darkspec_version": darkspec.__version__,
        "git_revision": git_revision(),
        "profile": {"name": profile.name, "sizes": [list(s) for s in profile.sizes], "dtypes": dtypes,
                    "warmup": profile.warmup, "min_repeats": profile.min_repeats,
                    "max_repeats": profile.max_repeats, "min_time_s": profile.min_time_s,
                    "max_sets": profile.max_sets, "set_budget_bytes": profile.set_budget_bytes, "seed": seed},
        "machine": machine,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": getattr(torch, "__version__", None) or _version("torch"),
                     "tabulate": _version("tabulate"),
                     "darkspec": darkspec.__version__},
        "torch_threads": threads,
        "torch_baseline": eager_torch is not None,
        "backends": [{"name": b.name, "available": not b.availability(), "reason": b.availability(),
                      "version": None if b.availability() else b.version(),
                      "timer": None if b.availability() else timer_for(b).name} for b in backends],
        "targets": [{"backend": t.backend, "min_pct": t.min_pct, "passes": t.passes, "device": t.device}
                    for t in TARGETS],
        "bytes_rule": "each input the op depends on read once, each output written once",
        "copy_rule": "the same device copying as many bytes (half read, half written) on as many rotating sets",
        "results": results,
        "skipped": skipped,
        "duration_s": time.perf_counter() - started,
    }


def _run_case(spec, shape, dtype, plan, profile, torch, rng, llc) -> list[dict]:
    nbytes = bytes_moved(spec, shape, dtype)
    per_set = set_bytes(spec, shape, dtype)
    count = rotation_sets(per_set, profile, llc)
    sets = make_sets(spec, shape, dtype, count, rng)
    contenders = [Contender(b.name, timer_for(b), backend_call(b, spec, cap.dialect, sets), group=0)
                  for b, cap in plan]
    eager = None
    if torch is not None:
        eager = Contender(TORCH_EAGER, CPU_TIMER, torch_eager_call(torch, spec, shape, sets), group=0)
        contenders.append(eager)
    copies: dict[str, Contender] = {}
    for c in list(contenders):
        if c.timer.device not in copies:
            copies[c.timer.device] = Contender(f"copy ({c.timer.device})", c.timer,
                                               c.timer.copy_call(nbytes, count), group=len(copies) + 1)
    measure(list(copies.values()) + contenders, count, profile)

    def figures(c: Contender | None) -> dict | None:
        if c is None:
            return None
        if c.error or not c.samples:
            return {"error": c.error or "no samples"}
        out = stats(c.samples)
        out["gbps"] = nbytes / out["median_s"] / 1e9
        return out

    naive = figures(eager)
    if naive and "gbps" in naive and "gbps" in figures(copies[CPU_TIMER.device]):
        naive["pct_of_copy"] = 100.0 * naive["gbps"] / figures(copies[CPU_TIMER.device])["gbps"]
    results = []
    for (backend, cap), c in zip(plan, contenders):
        copy, own = figures(copies[c.timer.device]), figures(c)
        result = {
            "backend": backend.name, "device": cap.device, "timer": c.timer.name, "dialect": cap.dialect,
            "op": spec.op, "pass": spec.pass_, "key": spec.key, "label": spec.label, "n_from": spec.n_from,
            "weights_type": spec.weights_type, "normalization": spec.normalization, "activation": spec.activation,
            "reverse": spec.reverse, "stride": spec.stride, "shape": list(shape), "dtype": dtype,
            "bytes": nbytes, "sets": count, "footprint_bytes": count * per_set,
            "cache_cold": count * per_set >= 2 * llc,
            "time": own, "gbps": own.get("gbps"), "copy": copy, "torch_eager": naive,
            "pct_of_copy": None, "vs_torch_eager": None, "target": None, "error": own.get("error"),
        }
        if result["gbps"] and copy.get("gbps"):
            result["pct_of_copy"] = 100.0 * result["gbps"] / copy["gbps"]
        if result["gbps"] and naive and naive.get("median_s"):
            result["vs_torch_eager"] = naive["median_s"] / own["median_s"]
        target = target_for(result)
        if target and result["pct_of_copy"] is not None:
            result["target"] = {"min_pct": target.min_pct, "met": result["pct_of_copy"] >= target.min_pct}
        results.append(result)
    del sets
    return results


# --------------------------------------------------------------------------------------------------------------
# Tables.


def _ms(figures: dict | None) -> str:
    if not figures or "median_s" not in figures:
        return "error" if figures else "n/a"
    return f"{figures['median_s'] * 1e3:.3g} [{figures['p20_s'] * 1e3:.3g}, {figures['p80_s'] * 1e3:.3g}]"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def table(report: dict) -> str:
    """One row per backend and case."""
    rows = []
    for r in report["results"]:
        target = r["target"]
        rows.append([
            r["backend"], r["label"], size_label(r["shape"]), r["dtype"], _ms(r["time"]),
            "" if r["gbps"] is None else f"{r['gbps']:.2f}",
            f"{r['copy']['gbps']:.2f}" if r["copy"] and r["copy"].get("gbps") else "n/a",
            _pct(r["pct_of_copy"]),
            "n/a" if r["vs_torch_eager"] is None else f"{r['vs_torch_eager']:.2f}x",
            "" if target is None else f">={target['min_pct']:g}%: {'yes' if target['met'] else 'no'}",
        ])
    headers = ["backend", "op", "size", "dtype", "ms median [p20, p80]", "GB/s", "copy GB/s", "% copy",
               "vs torch eager", "target"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def summary(report: dict) -> tuple[list[str], list[str], list[list[float | None]]]:
    """The chart's data: op labels, series (backends, then torch eager), median % of copy over sizes and dtypes."""
    ops = list(dict.fromkeys(r["label"] for r in report["results"]))
    series = list(dict.fromkeys(r["backend"] for r in report["results"]))
    values: dict[tuple[str, str], list[float]] = {}
    eager_seen = set()
    for r in report["results"]:
        if r["pct_of_copy"] is not None:
            values.setdefault((r["label"], r["backend"]), []).append(r["pct_of_copy"])
        eager, case = r["torch_eager"], (r["key"], tuple(r["shape"]), r["dtype"])
        if eager and eager.get("pct_of_copy") is not None and case not in eager_seen:
            eager_seen.add(case)
            values.setdefault((r["label"], TORCH_EAGER), []).append(eager["pct_of_copy"])
    if any(key[1] == TORCH_EAGER for key in values):
        series.append(TORCH_EAGER)
    grid = [[float(np.median(values[(op, s)])) if (op, s) in values else None for s in series] for op in ops]
    return ops, series, grid


def summary_table(report: dict) -> str:
    ops, series, grid = summary(report)
    rows = [[op, *(_pct(v) for v in row)] for op, row in zip(ops, grid)]
    return tabulate(rows, headers=["% of copy bandwidth (median)", *series], disable_numparse=True)


def notes(report: dict) -> list[str]:
    lines = []
    for t in TARGETS:
        hits = [r for r in report["results"] if r["target"] and t.applies(r)]
        if not hits:
            lines.append(f"target: {t.describe()}: not measured (no such backend available)")
            continue
        met = sum(r["target"]["met"] for r in hits)
        median = float(np.median([r["pct_of_copy"] for r in hits]))
        lines.append(f"target: {t.describe()}: met in {met} of {len(hits)} cases (median {median:.0f}%)")
    warm = sum(not r["cache_cold"] for r in report["results"])
    if warm:
        lines.append(f"{warm} of {len(report['results'])} cases rotate over less than twice the last-level cache "
                     f"({report['machine']['llc_bytes'] >> 20} MiB): their figures include cache hits")
    if report["versions"]["torch"] is None:
        lines.append("torch is not importable: 'vs torch eager' is n/a")
    elif not report.get("torch_baseline", True):
        lines.append("the eager-PyTorch baseline was not measured: 'vs torch eager' is n/a")
    for b in report["backends"]:
        if not b["available"]:
            lines.append(f"{b['name']}: unavailable: {b['reason']}")
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['backend']} {r['label']} {size_label(r['shape'])} {r['dtype']}: {r['error']}")
    for s in report["skipped"]:
        lines.append(f"skipped {s['op']} {size_label(s['shape'])} {s['dtype']}: {s['reason']}")
    return lines


# --------------------------------------------------------------------------------------------------------------
# The chart: matplotlib when importable, else a bar chart drawn into a NumPy array and written as a PNG here.

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
EAGER_COLOR = (150, 150, 150)

#: A 3x5 bitmap font, five rows of three pixels per glyph (lower case is drawn as upper case).
_FONT = dict(zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ .-/%=():_,>+[]",
    "111101101101111 010110010010111 111001111100111 111001011001111 101101111001001 111100111001111 "
    "111100111101111 111001010010010 111101111101111 111101111001111 010101111101101 110101110101110 "
    "011100100100011 110101101101110 111100110100111 111100110100100 011100101101011 101101111101101 "
    "111010010010111 001001001101010 101101110101101 100100100100111 101111111101101 110101101101101 "
    "010101101101010 110101110100100 010101101110011 110101110101101 011100010001110 111010010010010 "
    "101101101101111 101101101101010 101101111111101 101101010101101 101101010010010 111001010100111 "
    "000000000000000 000000000000010 000000111000000 001001010100100 101001010100101 000111000111000 "
    "010100100100010 010001001001010 000010000010000 000000000000111 000000000010100 100010001010100 "
    "000010111010000 110100100100110 011001001001011".split()))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array: signature, IHDR, one IDAT (zlib, filter 0), IEND."""
    height, width, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1).tobytes()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def render_chart(ops, series, grid, title: str, targets=()) -> np.ndarray:
    """Horizontal grouped bars: one group per op, one bar per series, % of copy bandwidth on the x axis."""
    px, bar, gap = 2, 10, 3  # font scale, bar height, gap between bars
    char = 4 * px

    def text(img, x, y, s, color=(0, 0, 0)):
        for k, ch in enumerate(str(s).upper()):
            bits = _FONT.get(ch, _FONT[" "])
            for j, bit in enumerate(bits):
                if bit == "1":
                    r, c = divmod(j, 3)
                    x0, y0 = x + k * char + c * px, y + r * px
                    img[y0:y0 + px, x0:x0 + px] = color

    values = [v for row in grid for v in row if v is not None]
    xmax = max(100.0, math.ceil(max(values, default=0) / 25) * 25)
    label_w = (max((len(o) for o in ops), default=4) + 2) * char
    plot_w, left, top = 600, 16 + label_w, 70
    group_h = len(series) * (bar + gap) + 14
    width, height = left + plot_w + 80, top + len(ops) * group_h + 40
    img = np.full((height, width, 3), 255, np.uint8)
    text(img, 16, 14, title)
    colors = {s: EAGER_COLOR if s == TORCH_EAGER else PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    x = 16
    for s in series:
        img[40:50, x:x + 10] = colors[s]
        text(img, x + 14, 40, s)
        x += 14 + (len(s) + 3) * char
    if any(name in colors for name, _ in targets):
        text(img, x, 40, "(dashed: targets)", EAGER_COLOR)

    def xpos(pct):
        return left + int(round(plot_w * pct / xmax))

    bottom = top + len(ops) * group_h
    for tick in range(0, int(xmax) + 1, 25):
        img[top - 4:bottom, xpos(tick)] = (225, 225, 225) if tick else (0, 0, 0)
        text(img, xpos(tick) - 2 * char, bottom + 8, f"{tick}%")
    for name, pct in targets:
        if name in colors and pct <= xmax:
            img[top - 4:bottom:4, xpos(pct)] = colors[name]  # dashed
            img[top - 3:bottom:4, xpos(pct)] = colors[name]
    for g, (op, row) in enumerate(zip(ops, grid)):
        y = top + g * group_h
        text(img, 16, y + (len(series) * (bar + gap) - 5 * px) // 2, op)
        for k, (s, v) in enumerate(zip(series, row)):
            yb = y + k * (bar + gap)
            if v is None:
                text(img, left + 4, yb, "n/a", EAGER_COLOR)
                continue
            img[yb:yb + bar, left:max(left + 1, xpos(min(v, xmax)))] = colors[s]
            text(img, xpos(min(v, xmax)) + 4, yb, f"{v:.0f}%")
    return img


def _chart_matplotlib(path: Path, ops, series, grid, title, targets) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 1.2 + 0.25 * len(ops) * max(1, len(series))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(series))
    colors = {s: EAGER_COLOR if s == TORCH_EAGER else PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    for k, s in enumerate(series):
        ys = [g + k * height for g in range(len(ops))]
        vals = [row[k] for row in grid]
        ax.barh(ys, [v or 0.0 for v in vals], height=height, label=s, color=[c / 255 for c in colors[s]])
        for y, v in zip(ys, vals):
            ax.text(v or 0.0, y, " n/a" if v is None else f" {v:.0f}%", va="center", fontsize=7)
    for name, pct in targets:
        if name in colors:
            ax.axvline(pct, linestyle="--", linewidth=1, color=[c / 255 for c in colors[name]])
    ax.set_yticks([g + height * (len(series) - 1) / 2 for g in range(len(ops))], ops)
    ax.invert_yaxis()
    ax.set_xlabel("% of copy bandwidth")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_chart(report: dict, path: Path, prefer_matplotlib: bool = True) -> str:
    """Writes the PNG; returns the renderer used: "matplotlib" or "builtin"."""
    ops, series, grid = summary(report)
    title = f"darkspec bench ({report['profile']['name']}): % of copy bandwidth, median over sizes and dtypes"
    targets = [(t.backend, t.min_pct) for t in TARGETS]
    if prefer_matplotlib:
        try:
            import matplotlib  # noqa: F401
        except Exception:  # noqa: BLE001
            pass
        else:
            _chart_matplotlib(path, ops, series, grid, title, targets)
            return "matplotlib"
    path.write_bytes(png_bytes(render_chart(ops, series, grid, title, targets)))
    return "builtin"


# --------------------------------------------------------------------------------------------------------------
# Compare mode.


@dataclass(frozen=True)
class Change:
    backend: str
    label: str
    shape: tuple
    dtype: str
    baseline_s: float | None
    current_s: float | None
    change: float | None  # current/baseline - 1 (of the time, or of time/copy time)
    tolerance: float | None  # the larger relative spread (p80-p20)/median of the two, at least min_regression
    verdict: str  # "regression", "faster", "same", "new", "missing"


def _case_key(r: dict):
    return r["backend"], r["key"], tuple(r["shape"]), r["dtype"]


def compare(baseline: dict, current: dict, min_regression: float = 0.0, relative_to_copy: bool = False
            ) -> list[Change]:
    """Every case of either report: slower than the baseline by more than the measured spread is a regression.

    ``relative_to_copy`` compares each case's time divided by the copy time measured in the same rounds (the
    inverse of % of copy), so that a machine that is slower as a whole (another job, another frequency) does not
    read as a regression; the spread is then the op's plus the copy's.
    """
    def index(report):
        return {_case_key(r): r for r in report["results"] if r.get("time") and "median_s" in r["time"]
                and (not relative_to_copy or (r.get("copy") or {}).get("median_s"))}

    def figure(r):
        t = r["time"]
        if not relative_to_copy:
            return t["median_s"], t["spread"]
        return t["median_s"] / r["copy"]["median_s"], t["spread"] + r["copy"]["spread"]

    old, new = index(baseline), index(current)
    changes = []
    for key in list(dict.fromkeys([*new, *old])):
        a, b = old.get(key), new.get(key)
        r = b or a
        common = dict(backend=r["backend"], label=r["label"], shape=tuple(r["shape"]), dtype=r["dtype"])
        if a is None or b is None:
            changes.append(Change(**common, baseline_s=a and a["time"]["median_s"],
                                  current_s=b and b["time"]["median_s"], change=None, tolerance=None,
                                  verdict="new" if a is None else "missing"))
            continue
        (fa, sa), (fb, sb) = figure(a), figure(b)
        change = fb / fa - 1
        tolerance = max(sa, sb, min_regression)
        verdict = "regression" if change > tolerance else "faster" if change < -tolerance else "same"
        changes.append(Change(**common, baseline_s=a["time"]["median_s"], current_s=b["time"]["median_s"],
                              change=change, tolerance=tolerance, verdict=verdict))
    return changes


def compare_table(changes: list[Change]) -> str:
    def ms(v):
        return "" if v is None else f"{v * 1e3:.3g}"

    rows = [[c.backend, c.label, size_label(c.shape), c.dtype, ms(c.baseline_s), ms(c.current_s),
             "" if c.change is None else f"{100 * c.change:+.0f}%",
             "" if c.tolerance is None else f"{100 * c.tolerance:.0f}%",
             "REGRESSION" if c.verdict == "regression" else c.verdict] for c in changes]
    return tabulate(rows, headers=["backend", "op", "size", "dtype", "baseline ms", "now ms", "change",
                                   "spread", "verdict"], disable_numparse=True)


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DarkspecError("--compare", str(path), "a bench JSON file written by darkspec bench",
                            code="bad-baseline", reason=str(error)) from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise DarkspecError("--compare", str(path), f"a bench JSON file of schema {SCHEMA}", code="bad-baseline")
    return report


# --------------------------------------------------------------------------------------------------------------
# Entry points: run() (keyword options), add_arguments()/run_args() for a CLI subcommand, main() for python -m.


def run(*, quick: bool = False, backends=(), only: bool = False, sizes=None, dtypes=None,
        output: Path | str = DEFAULT_OUTPUT, compare_with: Path | str | None = None,
        current: Path | str | None = None, fail_on_regression: bool = False, min_regression: float = 0.0,
        relative_to_copy: bool = False, torch_threads: int | None = 1, out=None, progress=None) -> int:
    """Measure (or, with ``current``, load) a report; print the tables; write bench.json and bench.png into
    ``output``; with ``compare_with`` print the comparison. Exit status: 0; 1 on a regression when
    ``fail_on_regression``; 2 when nothing could be measured. Raises DarkspecError for bad options."""
    out = out or sys.stdout
    baseline = load_report(Path(compare_with)) if compare_with else None
    if current is not None:
        if baseline is None:
            raise DarkspecError("--current", str(current), "only together with --compare", code="bad-option")
        report = load_report(Path(current))
    else:
        name = "quick" if quick else "full"
        if baseline is not None and not quick and not sizes:
            name = baseline["profile"]["name"] if baseline["profile"]["name"] in PROFILES else name
            sizes = sizes or [tuple(s) for s in baseline["profile"]["sizes"]]
        profile = PROFILES[name]
        if sizes:
            profile = replace(profile, sizes=tuple(parse_size(s) if isinstance(s, str) else tuple(s) for s in sizes))
        report = run_matrix(select_backends(backends, only), profile, dtypes=dtypes, progress=progress,
                            torch_threads=torch_threads)
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        report["chart"] = {"file": PNG_NAME, "renderer": write_chart(report, output / PNG_NAME)}
        (output / JSON_NAME).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report), file=out)
    print(file=out)
    print(summary_table(report), file=out)
    for line in notes(report):
        print(line, file=out)
    if current is None:
        print(f"\n{report['duration_s']:.1f} s; wrote {output / JSON_NAME} and {output / PNG_NAME} "
              f"(chart: {report['chart']['renderer']})", file=out)
    if not report["results"]:
        print("darkspec bench: nothing was measured", file=out)
        return 2
    if baseline is None:
        return 0
    changes = compare(baseline, report, min_regression, relative_to_copy)
    print(file=out)
    if baseline["machine"].get("cpu_model") != report["machine"].get("cpu_model"):
        print(f"note: the baseline was measured on {baseline['machine'].get('cpu_model')}", file=out)
    print(compare_table(changes), file=out)
    regressions = [c for c in changes if c.verdict == "regression"]
    basis = "time / same-run copy time" if relative_to_copy else "median time"
    print(f"{len(regressions)} regression(s) beyond the measured spread ({basis})", file=out)
    return 1 if regressions and fail_on_regression else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats: a smoke run of under a minute")
    parser.add_argument("--backend", action="append", default=[], metavar="SPEC",
                        help="a backend name or package.module:ClassName, added to the discovered ones (repeatable)")
    parser.add_argument("--only", action="store_true", help="measure only the --backend ones")
    parser.add_argument("--size", action="append", default=None, metavar="NxCxHxW",
                        help="an input size instead of the profile's (repeatable)")
    parser.add_argument("--dtype", action="append", default=None, help="only this dtype (repeatable)")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="torch.set_num_threads for the torch backends and the eager baseline (default 1, like "
                        "the one-thread copy baseline; 0: torch's default)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR",
                        help=f"folder for {JSON_NAME} and {PNG_NAME} (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--compare", type=Path, metavar="BASELINE.json",
                        help="flag cases slower than this earlier run by more than the measured spread")
    parser.add_argument("--current", type=Path, metavar="RESULT.json",
                        help="with --compare: compare this saved run instead of measuring")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="with --compare: exit 1 when a case regressed")
    parser.add_argument("--relative-to-copy", action="store_true",
                        help="with --compare: compare time divided by the same-run copy time (a machine that is "
                        "slower as a whole is then not a regression)")
    parser.add_argument("--min-regression", type=float, default=0.0, metavar="FRACTION",
                        help="with --compare: ignore slowdowns below this fraction even where the spread is smaller")


def run_args(args: argparse.Namespace) -> int:
    return run(quick=args.quick, backends=args.backend, only=args.only, sizes=args.size, dtypes=args.dtype,
               output=args.output, compare_with=args.compare, current=args.current,
               fail_on_regression=args.fail_on_regression, min_regression=args.min_regression,
               relative_to_copy=args.relative_to_copy,
               torch_threads=args.torch_threads or None, progress=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darkspec.conformance.bench",
                                     description="The throughput matrix of every available backend.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_args(args)
    except DarkspecError as error:
        print(f"darkspec: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
