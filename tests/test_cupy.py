"""The cupy backend (spec/cupy-backend.md): the kernels compile, they compute what the reference computes, the weight
gradient is deterministic and the reorgs are bit-exact.

Three kinds of test, so that a machine without a GPU still checks the kernels:

- compilation: every kernel file through nvcc (PTX for sm_90, then ptxas) and through NVRTC, which needs no device;
  a kernel that does not compile fails here on any machine that has the compiler;
- the kernels on the CPU: the same .cu sources compiled with the host C++ compiler under a small CUDA emulation
  (threads as fibers, __syncthreads as a barrier, shared memory per block) and run by the real backend code through
  its executor interface; the conformance suite, the golden replays, determinism and bit-exactness run on them;
- the kernels on the GPU, through CuPy: skipped, with the reason, where no CUDA device is present.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from darkspec.backends import cupy_backend
from darkspec.backends.base import Capability
from darkspec.backends.reference import ReferenceBackend
from darkspec.backends.cupy_backend import (
    CONTRACT_DEFINES,
    ACTIVATIONS,
    KERNEL_FILES,
    NVRTC_OPTIONS,
    CupyBackend,
    cupy_unavailable_reason,
    kernel_names,
    kernel_source,
)
from darkspec.conformance import recordings as rec
from darkspec.conformance.report import cell
from darkspec.conformance.suite import refusal_calls, refusal_problem, run_property, run_suite
from darkspec.conformance.vectors import FAIL, PASS, replay
from darkspec.errors import DarkspecError
from darkspec.reference import activations, contract, reorg, shortcut
from darkspec.reference.shortcut import ShortcutParams

from conftest import GOLDEN

KERNELS = Path(cupy_backend.__file__).resolve().parent / "kernels"


def _cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program: on PATH, or in $CUDA_HOME/bin or $CUDA_PATH/bin."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / name).exists():
            return str(Path(home) / "bin" / name)
    return None


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.M))


# --- compilation -------------------------------------------------------------------------------------------------


def test_the_kernel_sources_ship_with_the_package():
    for filename in KERNEL_FILES:
        assert kernel_source(filename) == (KERNELS / filename).read_text(encoding="utf-8")
    assert set(kernel_names()) == set(KERNEL_FILES)


def test_every_elementwise_activation_has_a_kernel_code():
    elementwise = set(activations.ALEXEYAB_NAMES) | set(activations.PJREDDIE_NAMES)
    elementwise -= activations.GRADIENT_ABORTS
    assert set(ACTIVATIONS) == elementwise
    source = kernel_source("shortcut.cu")
    for name, code in ACTIVATIONS.items():
        assert re.search(rf"\bDS_{name.upper()} = {code}\b", source), name


@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_every_kernel_compiles_with_nvcc_for_sm_90(filename, tmp_path):
    nvcc = _cuda_tool("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed (a CUDA toolkit); the NVRTC and host compilations still check the kernels")
    ptx = tmp_path / f"{filename}.ptx"
    command = [nvcc, "-ptx", "-arch=sm_90", *NVRTC_OPTIONS, *(f"-D{d}" for d in CONTRACT_DEFINES),
               str(KERNELS / filename), "-o", str(ptx)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    assert set(kernel_names()[filename]) <= _entries(ptx.read_text())
    ptxas = _cuda_tool("ptxas")  # the PTX assembled to sm_90 machine code: resource limits are checked too
    if ptxas:
        result = subprocess.run([ptxas, "-arch=sm_90", str(ptx), "-o", str(tmp_path / f"{filename}.cubin")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def _nvrtc():
    """CuPy's NVRTC bindings, or skip with the reason."""
    try:
        from cupy.cuda import nvrtc
    except Exception as error:
        pytest.skip(f"cupy is not importable ({type(error).__name__}: {error}): no NVRTC compilation here")
    try:
        nvrtc.getVersion()
    except Exception as error:
        pytest.skip(f"NVRTC cannot be loaded ({type(error).__name__}); pip install nvidia-cuda-nvrtc")
    return nvrtc


@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_every_kernel_compiles_with_nvrtc_without_a_device(filename):
    # cupy.RawModule.compile() asks the device for its architecture; NVRTC itself needs none, so the check calls it
    # directly with the backend's options and sm_90.
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(kernel_source(filename), filename, (), ())
    try:
        try:
            nvrtc.compileProgram(program, (*NVRTC_OPTIONS, *(f"-D{d}" for d in CONTRACT_DEFINES), "-arch=compute_90"))
        except nvrtc.NVRTCError as error:
            pytest.fail(f"NVRTC: {error}\n{nvrtc.getProgramLog(program)}")
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert set(kernel_names()[filename]) <= _entries(ptx.rstrip("\x00"))


def test_the_kernels_take_the_contracts_constants_from_python():
    # eps and the relu floor are defined once, in darkspec.reference.contract: the source refuses to compile
    # without them and holds no copy of their values.
    source = kernel_source("shortcut.cu")
    assert not re.search(r"#define DS_(NORMALIZATION_EPS|RELU_FLOOR)\b", source)
    for name, value in (("DS_NORMALIZATION_EPS", contract.NORMALIZATION_EPS), ("DS_RELU_FLOOR", contract.RELU_FLOOR)):
        assert f"{name}={value!r}" in CONTRACT_DEFINES
        for module in {cupy_backend.module_of(n) for names in kernel_names().values() for n in names}:
            assert f"{name}={value!r}" in module[1]
    compiler = shutil.which("g++") or shutil.which("cpp")
    if compiler is None:
        pytest.skip("no host C preprocessor (g++)")
    bare = subprocess.run([compiler, "-E", "-P", "-x", "c++", "-"], input=source, capture_output=True, text=True)
    assert bare.returncode != 0 and "DS_NORMALIZATION_EPS" in bare.stderr


def test_each_module_the_backend_compiles_holds_the_kernels_it_launches_from_it():
    # The backend compiles shortcut.cu once per storage type, index width and family (DS_SKIP_* definitions).
    everything = set()
    for filename, names in kernel_names().items():
        # only the contract's definitions: every kernel (what CI compiles)
        assert _instantiated(kernel_source(filename), CONTRACT_DEFINES) == set(names)
        for name in names:
            for index in ("i32", "i64"):
                module = cupy_backend.module_of(name, index)
                assert module[0] == filename
                held = _instantiated(kernel_source(filename), module[1])
                assert name in held
                everything |= held
    assert everything == {name for names in kernel_names().values() for name in names}
    small = _instantiated(kernel_source("shortcut.cu"), cupy_backend.module_of("shortcut_forward_f32_i32")[1])
    assert small == {"shortcut_forward_f32_i32", "shortcut_backward_f32_i32", "shortcut_weight_reduce_f32",
                     "shortcut_update_gpu_f32", "shortcut_update_cpu_f32"}


# --- the kernels on the CPU -------------------------------------------------------------------------------------------

_SHIM = r"""
// A small CUDA emulation for testing kernels on the CPU: a block's threads are fibers (ucontext) run in turn by a
// scheduler; __syncthreads switches back to it, and it resumes every fiber once all have arrived or finished.
// __shared__ becomes static (one block runs at a time). Only what the darkspec kernels use is defined.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>
#include <functional>
#include <vector>

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };

namespace ds_emu {
uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;
enum { RUNNING = 0, WAITING = 1, DONE = 2 };
struct Fiber { ucontext_t ctx; int state; };
static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static std::vector<std::vector<char>> stacks;
static int current;
static const std::function<void()>* body;
static void entry() { (*body)(); fibers[current].state = DONE; }
inline void sync() { fibers[current].state = WAITING; swapcontext(&fibers[current].ctx, &scheduler); }

static int launch(const unsigned* grid, const unsigned* block, const std::function<void()>& fn) {
    body = &fn;
    grid_dim = {grid[0], grid[1], grid[2]};
    block_dim = {block[0], block[1], block[2]};
    const unsigned n = block[0] * block[1] * block[2];
    fibers.assign(n, Fiber());
    stacks.resize(n);
    for (auto& s : stacks) s.resize(1 << 16);
    for (unsigned bz = 0; bz < grid[2]; ++bz)
    for (unsigned by = 0; by < grid[1]; ++by)
    for (unsigned bx = 0; bx < grid[0]; ++bx) {
        block_idx = {bx, by, bz};
        for (unsigned t = 0; t < n; ++t) {
            getcontext(&fibers[t].ctx);
            fibers[t].ctx.uc_stack.ss_sp = stacks[t].data();
            fibers[t].ctx.uc_stack.ss_size = stacks[t].size();
            fibers[t].ctx.uc_link = &scheduler;
            makecontext(&fibers[t].ctx, entry, 0);
            fibers[t].state = RUNNING;
        }
        for (;;) {
            bool waiting = false;
            for (unsigned t = 0; t < n; ++t) {
                if (fibers[t].state == DONE) continue;
                current = (int)t;
                thread_idx = {t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                fibers[t].state = RUNNING;
                swapcontext(&scheduler, &fibers[t].ctx);
                waiting |= fibers[t].state == WAITING;
            }
            if (!waiting) break;
        }
    }
    return 0;
}
}  // namespace ds_emu

#define threadIdx ds_emu::thread_idx
#define blockIdx ds_emu::block_idx
#define blockDim ds_emu::block_dim
#define gridDim ds_emu::grid_dim
#define __syncthreads() ds_emu::sync()
#define __global__ DS_EMU_KERNEL
#define __device__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static

inline unsigned __float_as_uint(float v) { unsigned u; memcpy(&u, &v, 4); return u; }
inline float __uint_as_float(unsigned u) { float v; memcpy(&v, &u, 4); return v; }
inline long long __double_as_longlong(double v) { long long u; memcpy(&u, &v, 8); return u; }
inline double __longlong_as_double(long long u) { double v; memcpy(&v, &u, 8); return v; }
"""

# What each kernel parameter type takes at the boundary, as CuPy packs it: pointers take device arrays of the
# element's dtype (pointer tables: uint64 addresses), scalars take NumPy scalars of exactly the C type's size.
_POINTEES = {"float": np.float32, "double": np.float64, "longlong": np.int64, "unsignedchar": np.uint8,
             "unsignedshort": np.uint16, "unsignedint": np.uint32, "unsignedlonglong": np.uint64}
_SCALARS = {"int": (np.int32, ctypes.c_int32), "longlong": (np.int64, ctypes.c_int64),
            "float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double)}


@dataclasses.dataclass
class _Param:
    ctype: str  # as written, with the name removed
    kind: str  # "pointer" or "scalar"
    dtype: type


def _parse_param(text: str) -> _Param:
    ctype = re.sub(r"\s*\b\w+\s*$", "", text.strip())
    plain = re.sub(r"\bconst\b|__restrict__|\s", "", ctype)
    stars = plain.count("*")
    base = plain.rstrip("*")
    if stars == 0:
        return _Param(ctype, "scalar", _SCALARS[base][0])
    return _Param(ctype, "pointer", np.uint64 if stars > 1 else _POINTEES[base])


def _instantiated(source: str, defines=()) -> set[str]:
    """The extern "C" kernels a source instantiates under the given definitions (preprocessor only)."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("cpp")
    if compiler is None:
        pytest.skip("no host C preprocessor (g++)")
    command = [compiler, "-E", "-P", "-x", "c++", *(f"-D{d}" for d in defines), "-"]
    expanded = subprocess.run(command, input=source, capture_output=True, text=True, check=True).stdout
    return set(re.findall(r'extern "C" __global__ void (\w+)\s*\(', expanded))


class HostExecutor:
    """Runs the kernel sources on the CPU with the emulation above; arrays are NumPy arrays. Every launch checks its
    arguments against the kernel's C signature the way CuPy would pack them (a wrong scalar type or a wrong array
    dtype fails here, not only on a GPU)."""

    def __init__(self, build: Path):
        self.signatures: dict[str, list[_Param]] = {}
        self.libraries: dict[str, ctypes.CDLL] = {}
        compiler = shutil.which("g++") or shutil.which("c++")
        (build / "emu.h").write_text(_SHIM)
        for filename in KERNEL_FILES:
            source = build / filename
            source.write_text(kernel_source(filename))
            flags = ["-std=c++17", "-include", str(build / "emu.h"), "-x", "c++", *(f"-D{d}" for d in CONTRACT_DEFINES)]
            expanded = subprocess.run([compiler, "-E", "-P", *flags, str(source)], capture_output=True, text=True,
                                      check=True).stdout
            wrappers = []
            for name, params in re.findall(r'extern "C" DS_EMU_KERNEL void (\w+)\s*\(([^)]*)\)', expanded):
                parsed = [_parse_param(p) for p in params.split(",")]
                self.signatures[name] = parsed
                call = ", ".join(f"*({p.ctype}*)args[{i}]" for i, p in enumerate(parsed))
                wrappers.append(f'extern "C" int emu_{name}(const unsigned* g, const unsigned* b, void** args) '
                                f'{{ std::function<void()> fn = [&]() {{ {name}({call}); }}; '
                                f'return ds_emu::launch(g, b, fn); }}')
            unit = build / f"{filename}.emu.cpp"
            unit.write_text(f'#include "{source}"\n' + "\n".join(wrappers) + "\n")
            library = build / f"{filename}.so"
            subprocess.run([compiler, "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-DDS_EMU_KERNEL=",
                            *flags, str(unit), "-o", str(library)], check=True, capture_output=True, text=True)
            self.libraries[filename] = ctypes.CDLL(str(library))
        self.launches: list[tuple[str, tuple, tuple]] = []
        self._module_names: dict[tuple, set[str]] = {}

    def compile(self, module):
        """The library holding every kernel of the module's file; the module's own selection is checked at launch."""
        return self.libraries[module[0]]

    def module_names(self, module) -> set[str]:
        """The kernels that the module ``(filename, defines)`` instantiates, as the preprocessor sees them."""
        if module not in self._module_names:
            filename, defines = module
            self._module_names[module] = _instantiated(kernel_source(filename), defines)
        return self._module_names[module]

    def to_device(self, array):
        return np.array(array, copy=True, order="C")

    def empty(self, shape, dtype):
        return np.frombuffer(b"\x7e" * (int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype).reshape(shape).copy()

    def pointers(self, arrays):
        return np.array([a.ctypes.data for a in arrays], dtype=np.uint64)

    def to_host(self, array):
        return np.array(array, copy=True)

    def version(self):
        return "host emulation"

    def launch(self, module, name, grid, block, args):
        assert name in self.module_names(module), f"{name} is not in the module {module} the backend launches it from"
        filename = module[0]
        params = self.signatures[name]
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
        keep, pointers = [], []
        for i, (value, param) in enumerate(zip(args, params)):
            where = f"{name} argument {i} ({param.ctype})"
            if param.kind == "pointer":
                assert isinstance(value, np.ndarray), f"{where}: {type(value).__name__}, not an array"
                assert value.dtype == param.dtype, f"{where}: array of {value.dtype}, expected {np.dtype(param.dtype)}"
                assert value.flags.c_contiguous, where
                cell_ = ctypes.c_void_p(value.ctypes.data)
            else:
                assert type(value) is param.dtype, f"{where}: {type(value).__name__}, expected {param.dtype.__name__}"
                cell_ = _SCALARS[re.sub(r"\s", "", param.ctype)][1](value.item())
            keep.append(cell_)
            pointers.append(ctypes.cast(ctypes.pointer(cell_), ctypes.c_void_p))
        grid = tuple(int(g) for g in grid)
        block = tuple(int(b) for b in block)
        assert all(g >= 1 for g in grid) and 1 <= block[0] * block[1] * block[2] <= 1024, (grid, block)
        self.launches.append((name, grid, block))
        argv = (ctypes.c_void_p * max(1, len(pointers)))(*pointers)
        status = getattr(self.libraries[filename], f"emu_{name}")(
            (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), argv)
        assert status == 0


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no host C++ compiler (g++): the kernels cannot run on the CPU here")
    return HostExecutor(tmp_path_factory.mktemp("cupy-kernels"))


class CpuLabelled(CupyBackend):
    """The backend declaring its capabilities with the default device: the golden replays ask for that one."""

    def capabilities(self):
        return frozenset(dataclasses.replace(c, device="cpu") for c in super().capabilities())


def test_the_emulated_kernels_pass_every_capability_they_declare(host):
    backend = CupyBackend(host)
    report = run_suite(backend, "ci")
    assert report.unavailable is None
    failures = [f"{r.capability.label()} {r.capability.dtype}: {r.first_failure}" for r in report.results
                if not r.passed]
    assert not failures, "\n".join(failures)
    assert all(cell(report, c.label()).startswith("pass") for c in backend.capabilities())


def test_the_emulated_kernels_replay_every_golden_case(host):
    backend = CpuLabelled(host)
    results = [replay(recording, backend) for recording in rec.iter_recordings(GOLDEN)]
    failed = [result.line() for result in results if result.verdict == FAIL]
    assert not failed, "\n".join(failed)
    skipped = [result.line() for result in results if result.verdict not in (PASS, FAIL)]
    assert not skipped, "\n".join(skipped)


def test_the_backend_declares_the_reference_grid_on_the_gpu():
    backend = CupyBackend()
    reference = {dataclasses.replace(c, device="cuda") for c in ReferenceBackend().capabilities()}
    assert backend.capabilities() == reference
    assert {c.device for c in backend.capabilities()} == {"cuda"}
    assert backend.quirks() == ReferenceBackend().quirks()


def test_availability_gives_the_reason_and_the_fix_without_a_gpu():
    reason = cupy_unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA device is present")
    assert CupyBackend().availability() == reason
    assert "pip install" in reason or "GPU" in reason
    report = run_suite(CupyBackend(), "quick")
    assert report.unavailable == reason and not report.results


def _fusion(seed, shape=(3, 16, 9, 7), n_from=2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    froms = [rng.standard_normal(shape).astype(dtype) for _ in range(n_from)]
    weights = rng.standard_normal((n_from + 1) * shape[1]).astype(dtype)
    delta = rng.standard_normal(shape).astype(dtype)
    return x, froms, weights, delta


def _weight_gradient_is_deterministic(backend, shape):
    x, froms, weights, delta = _fusion(1, shape)
    params = ShortcutParams("per_channel", "softmax", "linear")
    runs = [backend.shortcut_backward(x, froms, weights, delta, params=params, dialect="darknet-gpu")
            for _ in range(3)]
    first = runs[0].weight_updates.tobytes()
    assert all(r.weight_updates.tobytes() == first for r in runs)
    assert all(r.delta.tobytes() == runs[0].delta.tobytes() for r in runs)
    expected = shortcut.backward(x, froms, weights, delta, params=params, dialect="darknet-gpu")
    np.testing.assert_allclose(runs[0].weight_updates, expected.weight_updates, rtol=1e-5, atol=1e-5)


def _reorg_is_bit_exact(backend, shape, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[::7] = -0.0
    flat[3::11] = np.inf
    bits = flat.view(f"u{flat.itemsize}")
    bits[5::13] = np.array(-1, dtype=f"i{flat.itemsize}").view(bits.dtype)  # NaN with every payload bit set
    for old in (False, True):
        forward = reorg.reorg_old_forward if old else reorg.reorg3d_forward
        for reverse in (False, True):
            expected = forward(x, 2, reverse)
            actual = backend.reorg_forward(x, 2, reverse, old)
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            assert actual.tobytes() == expected.tobytes(), (old, reverse)
            back = backend.reorg_backward(expected, 2, reverse, old, previous_delta=np.zeros_like(x))
            assert back.tobytes() == x.tobytes(), (old, reverse)


def _float32_matches_the_reference_bit_for_bit(backend, activation_names):
    # --fmad=false, the reference's order of operations and activations evaluated in double and rounded once: the
    # float32 forward and every delta are the reference's bits (the weight gradient is a sum in another order).
    x, froms, weights, delta = _fusion(7, (2, 5, 6, 7))
    froms[1] = np.ascontiguousarray(froms[1][:, :3])  # a narrower input: the PRN rule
    for normalization in ("none", "relu", "softmax"):
        for dialect in ("darknet-gpu", "exact"):
            for activation in activation_names:
                params = ShortcutParams("per_channel", normalization, activation)
                out = backend.shortcut_forward(x, froms, weights, params=params, dialect=dialect)
                grads = backend.shortcut_backward(x, froms, weights, delta, params=params, dialect=dialect)
                expected = shortcut.backward(x, froms, weights, delta, params=params, dialect=dialect)
                label = (normalization, dialect, activation)
                assert out.tobytes() == shortcut.forward(x, froms, weights, params=params, dialect=dialect).tobytes(), \
                    label
                assert grads.delta.tobytes() == expected.delta.tobytes(), label
                for actual, wanted in zip(grads.input_deltas, expected.input_deltas):
                    assert actual.tobytes() == wanted.tobytes(), label
                np.testing.assert_allclose(grads.weight_updates, expected.weight_updates, rtol=2e-6, atol=1e-6)


def test_emulated_float32_matches_the_reference_bit_for_bit(host):
    _float32_matches_the_reference_bit_for_bit(CupyBackend(host), ("linear", "leaky", "logistic", "tanh", "swish",
                                                                   "mish", "gelu"))


def test_emulated_weight_gradient_is_deterministic(host):
    _weight_gradient_is_deterministic(CupyBackend(host), (2, 8, 11, 13))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_emulated_reorgs_are_bit_exact(host, dtype):
    _reorg_is_bit_exact(CupyBackend(host), (2, 16, 4, 6), dtype)


def test_emulated_wider_input_gets_zeros_past_the_output_and_every_element_is_written(host):
    # The emulator fills new arrays with a sentinel: an element a kernel forgot to write shows up here.
    x, froms, weights, delta = _fusion(3, (2, 3, 5, 5))
    rng = np.random.default_rng(4)
    froms = [rng.standard_normal((2, 6, 5, 5)).astype(np.float32), rng.standard_normal((2, 1, 5, 5)).astype(np.float32)]
    params = ShortcutParams("per_channel", "relu", "leaky")
    weights = rng.standard_normal(9).astype(np.float32)
    for dialect in ("darknet-cpu", "darknet-gpu", "exact"):
        actual = CupyBackend(host).shortcut_backward(x, froms, weights, delta, params=params, dialect=dialect)
        expected = shortcut.backward(x, froms, weights, delta, params=params, dialect=dialect)
        assert np.all(actual.input_deltas[1][:, 3:] == 0)
        for a, e in zip(actual.input_deltas, expected.input_deltas):
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_emulated_large_planes_use_several_chunks_and_full_blocks(host):
    backend = CupyBackend(host)
    x, froms, weights, delta = _fusion(5, (1, 2, 48, 50), n_from=1)
    weights = weights[:2]  # per_feature: one weight per input
    params = ShortcutParams("per_feature", "softmax", "swish")
    host.launches.clear()
    actual = backend.shortcut_backward(x, froms, weights, delta, params=params, dialect="darknet-gpu")
    name, grid, block = host.launches[0]
    assert name == "shortcut_backward_f32_i32" and block == (256, 1, 1) and grid == (2, 2, 1)
    expected = shortcut.backward(x, froms, weights, delta, params=params, dialect="darknet-gpu")
    np.testing.assert_allclose(actual.delta, expected.delta, rtol=1e-6)
    np.testing.assert_allclose(actual.weight_updates, expected.weight_updates, rtol=1e-5)


@pytest.mark.parametrize("mutant", [
    # a barrier left out: the normalization reads phi before every thread has written it
    ("__syncthreads();\n    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {\n        if (norm",
     "for (int i = threadIdx.x; i < n_in; i += blockDim.x) {\n        if (norm", "shortcut", "darknet-cpu", "forward"),
    # the softmax surrogate without its (1 - what)
    ("factor = scale * (T(1) - scale);", "factor = scale;", "shortcut", "darknet-gpu", "backward"),
], ids=["missing-barrier", "softmax-surrogate"])
def test_the_emulation_catches_a_broken_kernel(mutant, tmp_path, monkeypatch):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no host C++ compiler (g++): the kernels cannot run on the CPU here")
    original, broken, op, dialect, pass_ = mutant
    assert original in kernel_source("shortcut.cu")
    source = kernel_source
    monkeypatch.setattr(sys.modules[__name__], "kernel_source",
                        lambda name: source(name).replace(original, broken) if name == "shortcut.cu" else source(name))
    backend = CupyBackend(HostExecutor(tmp_path))
    result = run_property(backend, Capability(op, dialect, "float32", pass_, "cuda"), 10)
    assert result.failures


def test_emulated_prepared_call_only_launches_and_counts_the_least_bytes(host):
    backend = CupyBackend(host)
    x, froms, weights, delta = _fusion(6, (2, 4, 5, 6))
    params = ShortcutParams("per_channel", "softmax", "linear")
    call = backend.prepare_shortcut(x, froms, weights, delta, params=params, dialect="darknet-gpu")
    host.launches.clear()
    call.forward()
    call.backward()
    assert [name for name, *_ in host.launches] == ["shortcut_forward_f32_i32", "shortcut_backward_f32_i32",
                                                     "shortcut_weight_reduce_f32"]
    assert call.bytes_forward == 4 * x.nbytes + weights.nbytes  # 3 inputs and the weights read, 1 output written
    assert call.bytes_backward == 8 * x.nbytes + 3 * weights.nbytes  # + delta, accumulator; d and 3 deltas written
    assert call.output().tobytes() == backend.shortcut_forward(x, froms, weights, params=params,
                                                               dialect="darknet-gpu").tobytes()
    expected = backend.shortcut_backward(x, froms, weights, delta, params=params, dialect="darknet-gpu")
    assert call.gradients().weight_updates.tobytes() == expected.weight_updates.tobytes()


class NoDevice:
    """An executor that fails at any device work: a refusal must come before all of it."""

    def __getattr__(self, name):
        raise AssertionError(f"device work ({name}) before the refusal")


def _refusals():
    backend = CupyBackend(NoDevice())
    for capability in sorted(backend.capabilities()):
        for code, mistake, call in refusal_calls(backend, capability):
            yield pytest.param(code, mistake, call, id=f"{capability.label()}-{capability.dtype}-{mistake}")


@pytest.mark.parametrize("code, mistake, call", _refusals())
def test_every_refusal_of_the_op_records_comes_before_any_device_work(code, mistake, call):
    # Runs on any machine: no kernel is compiled or launched for a bad call.
    assert refusal_problem(CupyBackend(NoDevice()), code, mistake, call) is None


def test_the_kernels_own_limits_are_refused_before_any_device_work():
    x = np.zeros((1, 2, 2, 2), np.float32)
    with pytest.raises(DarkspecError) as raised:
        CupyBackend(NoDevice()).shortcut_forward(x, [x] * 64, None, params=ShortcutParams(), dialect="exact")
    assert raised.value.code == "cupy-too-many-inputs"


# --- the kernels on the GPU -------------------------------------------------------------------------------------------

GPU_REASON = cupy_unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"cupy backend unavailable: {GPU_REASON}")


@needs_gpu
def test_the_kernels_compile_through_cupy_rawmodule():
    # The path the backend takes: RawModule(code, options).compile() per module, for this device's architecture.
    executor = cupy_backend.CupyExecutor()
    modules: dict[tuple, list[str]] = {}
    for names in kernel_names().values():
        for name in names:
            modules.setdefault(cupy_backend.module_of(name, "i64" if "i64" in name else "i32"), []).append(name)
    for module, names in modules.items():
        compiled = executor.compile(module)
        for name in names:
            compiled.get_function(name)


@needs_gpu
def test_the_gpu_passes_every_capability_it_declares():
    report = run_suite(CupyBackend(), "quick")
    failures = [f"{r.capability.label()} {r.capability.dtype}: {r.first_failure}" for r in report.results
                if not r.passed]
    assert report.unavailable is None and not failures, "\n".join(failures)


@needs_gpu
def test_the_gpu_replays_every_golden_case():
    backend = CpuLabelled()
    results = [replay(recording, backend) for recording in rec.iter_recordings(GOLDEN)]
    failed = [result.line() for result in results if result.verdict != PASS]
    assert not failed, "\n".join(failed)


@needs_gpu
def test_the_gpu_float32_linear_fusion_matches_the_reference_bit_for_bit():
    _float32_matches_the_reference_bit_for_bit(CupyBackend(), ("linear",))


@needs_gpu
def test_the_gpu_weight_gradient_is_deterministic():
    _weight_gradient_is_deterministic(CupyBackend(), (8, 64, 38, 38))


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_the_gpu_reorgs_are_bit_exact(dtype):
    _reorg_is_bit_exact(CupyBackend(), (4, 64, 26, 26), dtype)


def test_the_spec_page_names_every_kernel_and_only_tests_that_exist():
    page = (Path(__file__).resolve().parents[1] / "spec" / "cupy-backend.md").read_text(encoding="utf-8")
    for filename in KERNEL_FILES:
        assert filename in page
    for stem in ("shortcut_forward", "shortcut_backward", "shortcut_weight_reduce", "shortcut_update_gpu",
                 "shortcut_update_cpu", "pjreddie_forward", "pjreddie_backward", "reorg_gather"):
        assert stem in page, stem
    assert "not yet verified on GPU hardware" in " ".join(page.split())
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", page))
    tests = Path(__file__).resolve().parent
    defined = {name for path in tests.glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE)}
    assert named and named <= defined, named - defined
