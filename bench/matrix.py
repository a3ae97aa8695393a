"""The matrix: every case, size, dtype and thread count; each contender checked against the reference, then timed."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import darkspec
from darkspec.backends.reference import ReferenceBackend
from darkspec.backends.registry import discover, load
from darkspec.bench import contenders as cont
from darkspec.bench.cases import CHEAP_ACTIVATIONS, Case, Profile, bytes_moved, make_sets, rotation_sets, \
    set_bytes, size_label
from darkspec.bench.timing import CPU_TIMER, Contender, keep_freed_memory, measure, stats, timer_for
from darkspec.conformance.compare import Tolerance, compare, largest_magnitude, tolerance_for
from darkspec.conformance.suite import sum_tolerance
from darkspec.provenance import git_revision

SCHEMA = "darkspec-bench/2"
REFERENCE = ReferenceBackend()


# --- the check before timing -----------------------------------------------------------------------------------------


def expected_result(case: Case, dialect: str, inputs: dict) -> dict:
    return cont.named(cont.numpy_call(REFERENCE, case, dialect, inputs)(), case.pass_)


#: Activations whose gradient jumps at a pre-activation of 0: there, two implementations that round the weighted sum
#: differently may fall on either side, so the deltas of those elements are not compared.
KINKED_AT_ZERO = ("leaky", "relu")


def first_problem(case: Case, inputs: dict, expected: dict, actual: dict) -> str | None:
    """The first array of the contender's result that differs from the reference's beyond the conformance suite's
    tolerance (permutations: bit-exact); every array a pass produces must be there but the delta after the
    activation's gradient, which autograd does not return."""
    missing = [name for name in expected if name not in actual and name != "delta"]
    if missing:
        return f"no {', '.join(missing)} in the result"
    if case.op != "shortcut":
        comparison = compare("output", expected["output"], np.asarray(actual["output"]), Tolerance.exact())
        return None if comparison.passed else comparison.describe()
    arrays = [a for a in inputs.values() if isinstance(a, np.ndarray)] + list(inputs.get("froms") or [])
    dtype = next(iter(expected.values())).dtype
    tolerance = tolerance_for(dtype, largest_magnitude(*arrays, *expected.values()))
    at_kink = None
    if case.pass_ == "backward" and case.activation in KINKED_AT_ZERO:
        linear = replace(case, pass_="forward", activation="linear")
        pre = cont.numpy_call(REFERENCE, linear, "darknet-cpu", inputs)()
        at_kink = np.abs(pre) <= tolerance.atol
    for name, want in expected.items():
        if name not in actual:
            continue
        own = tolerance
        if name == "weight_updates" and case.pass_ == "backward":
            own = sum_tolerance(dtype, inputs["delta"], [inputs["x"], *inputs["froms"]], inputs["weight_updates"],
                                want)
        undefined = at_kink if at_kink is not None and want.shape == at_kink.shape else None
        comparison = compare(name, want, np.asarray(actual[name]), own, undefined=undefined)
        if not comparison.passed:
            return comparison.describe()
    return None


def checked_first_call(c: Contender, case: Case, inputs: dict, expected_by_dialect: dict) -> None:
    """Runs the contender once on set 0 (its compile time, for torch.compile) and compares its result with the
    reference's: a contender that fails gets an error and no figure."""
    try:
        start = time.perf_counter()
        c.timer.time_call(c.run, 0)
        c.first_call_s = time.perf_counter() - start
        if c.dialect not in expected_by_dialect:
            expected_by_dialect[c.dialect] = expected_result(case, c.dialect, inputs)
        problem = first_problem(case, inputs, expected_by_dialect[c.dialect], c.result(0))
    except Exception as error:  # noqa: BLE001 - a failing contender is reported, not raised
        c.error = f"{type(error).__name__}: {error}"
        return
    if problem:
        c.error = f"wrong result, not timed: {problem}"


# --- the machine ---------------------------------------------------------------------------------------------------


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
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_model": model or platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "usable_cores": usable, "memory_bytes": memory, "llc_bytes": llc_bytes(), "load_average": load_average,
            "system": platform.platform(), "architecture": platform.machine()}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def select_backends(specs=(), only: bool = False) -> list:
    """Every backend discover() knows (unless ``only``) plus those named; one per name, an available one first."""
    found = [] if only else discover()
    found += [load(spec) for spec in specs]
    chosen: dict = {}
    for backend in found:
        current = chosen.get(backend.name)
        if current is None or (current.availability() and not backend.availability()):
            chosen[backend.name] = backend
    return list(chosen.values())


# --- the matrix ----------------------------------------------------------------------------------------------------


def run_matrix(backends: list, profile: Profile, dtypes=("float32",), progress=None, seed: int = 0,
               baselines: bool = True, compile_baseline: bool = True, darknet: bool = True,
               case_filter=None) -> dict:
    """Measure every case of the profile and return the report (the content of bench.json).

    ``baselines=False`` leaves the PyTorch baselines out, ``darknet=False`` Darknet's functions;
    ``case_filter(case)`` keeps only some cases.
    """
    started = time.perf_counter()
    machine = machine_info()
    allocator = keep_freed_memory()
    torch = cont.import_torch() if baselines or any(b.name.startswith("torch") for b in backends) \
        else sys.modules.get("torch")
    darknet_functions, darknet_reason = cont.load_darknet() if darknet else (None, "not asked for")
    available = [b for b in backends if not b.availability()]
    cases = [c for c in profile.cases if case_filter is None or case_filter(c)]
    threads_before = torch.get_num_threads() if torch is not None else None
    rng = np.random.default_rng(seed)
    results, skipped = [], []
    plan = [(threads, shape, dtype, case) for threads in profile.threads for shape in profile.sizes
            for dtype in dtypes for case in cases]
    try:
        for number, (threads, shape, dtype, case) in enumerate(plan, 1):
            reason = case.skip_reason(shape)
            if reason:
                skipped.append({"key": case.key, "shape": list(shape), "dtype": dtype, "reason": reason})
                continue
            if torch is not None:
                torch.set_num_threads(threads)
            case_start = time.perf_counter()
            results += run_case(case, shape, dtype, available, profile, torch if baselines else None,
                                compile_baseline, darknet_functions, rng, machine["llc_bytes"], threads)
            if progress:
                print(f"[{number}/{len(plan)}] {threads} thread(s) {size_label(shape)} {dtype} {case.label}: "
                      f"{time.perf_counter() - case_start:.1f} s", file=progress, flush=True)
    finally:
        if torch is not None:
            torch.set_num_threads(threads_before)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "darkspec_version": darkspec.__version__,
        "git_revision": git_revision(),
        "profile": {"name": profile.name, "sizes": [list(s) for s in profile.sizes], "dtypes": list(dtypes),
                    "threads": list(profile.threads), "cases": [c.key for c in cases], "warmup": profile.warmup,
                    "min_repeats": profile.min_repeats, "max_repeats": profile.max_repeats,
                    "min_time_s": profile.min_time_s, "max_sets": profile.max_sets,
                    "set_budget_bytes": profile.set_budget_bytes, "seed": seed},
        "machine": machine,
        "allocator": allocator,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": getattr(torch, "__version__", None) or _version("torch"),
                     "matplotlib": _version("matplotlib"), "darkspec": darkspec.__version__},
        "backends": [{"name": b.name, "available": not b.availability(), "reason": b.availability(),
                      "version": None if b.availability() else b.version(),
                      "timer": None if b.availability() else timer_for(b).name} for b in backends],
        "baselines": {"torch": torch is not None and baselines, "torch_compile": torch is not None and baselines
                      and compile_baseline, "darknet": darknet_functions.version if darknet_functions
                      else f"not measured: {darknet_reason}"},
        "bytes_rule": "each input the case depends on read once, each output written once",
        "copy_rule": "the same device copying as many bytes (half read, half written) on as many rotating sets, "
                     "with the case's thread count",
        "results": results,
        "skipped": skipped,
        "duration_s": time.perf_counter() - started,
    }


def run_case(case: Case, shape, dtype, backends, profile: Profile, torch, compile_baseline, darknet_functions,
             rng, llc, threads) -> list[dict]:
    nbytes = bytes_moved(case, shape, dtype)
    per_set = set_bytes(case, shape, dtype)
    count = rotation_sets(per_set, profile, llc)
    sets = make_sets(case, shape, dtype, count, rng)
    cont.compiled_module_cache_reset(torch or sys.modules.get("torch"))
    contenders = []
    for backend in backends:
        capability = cont.capability_for(backend, case, dtype, shape)
        if capability is None:
            continue
        try:
            c = cont.backend_contender(backend, case, capability.dialect, sets)
        except Exception as error:  # noqa: BLE001 - a backend that cannot even prepare is reported
            c = Contender(backend.name, "backend", CPU_TIMER, run=None, dialect=capability.dialect,
                          error=f"{type(error).__name__}: {error}")
        c.device = capability.device
        contenders.append(c)
    if not contenders:
        return []
    if torch is not None:
        contenders += cont.torch_baselines(torch, case, shape, sets, compile_baseline)
    if darknet_functions is not None:
        found = darknet_functions.contender(case, shape, dtype, sets)
        contenders += [found] if found else []
    expected: dict = {}
    for c in contenders:
        c.threads = c.threads or (threads if c.name.startswith("torch") else None)
        if c.error is None:
            checked_first_call(c, case, sets[0], expected)
    copies: dict[str, Contender] = {}
    for c in contenders:
        if c.timer.device not in copies:
            copies[c.timer.device] = Contender(f"copy ({c.timer.device})", "copy", c.timer,
                                               c.timer.copy_call(nbytes, count))
    timed = [c for c in contenders if c.error is None]
    measure(list(copies.values()) + timed, count, profile.warmup, profile.min_repeats, profile.max_repeats,
            profile.min_time_s)

    def figures(c: Contender) -> dict:
        if c.error or not c.samples:
            return {"error": c.error or "no samples"}
        out = stats(c.samples)
        out["gbps"] = nbytes / out["median_s"] / 1e9
        return out

    results = []
    for c in contenders:
        copy = figures(copies[c.timer.device])
        own = figures(c)
        result = {
            "backend": c.name, "kind": c.kind, "device": getattr(c, "device", "cpu"), "timer": c.timer.name,
            "dialect": c.dialect, "path": c.path, "threads": c.threads, "case_threads": threads,
            "op": case.op, "pass": case.pass_, "key": case.key, "group": case.group,
            "configuration": case.configuration, "label": case.label, "n_from": case.n_from,
            "weights_type": case.weights_type, "normalization": case.normalization, "activation": case.activation,
            "cheap_activation": case.activation in CHEAP_ACTIVATIONS, "reverse": case.reverse,
            "stride": case.stride, "shape": list(shape), "dtype": dtype, "bytes": nbytes, "sets": count,
            "footprint_bytes": count * per_set, "cache_cold": count * per_set >= 2 * llc,
            "first_call_s": c.first_call_s, "time": own, "gbps": own.get("gbps"), "copy": copy,
            "pct_of_copy": None, "error": own.get("error"),
        }
        if result["gbps"] and copy.get("gbps"):
            result["pct_of_copy"] = 100.0 * result["gbps"] / copy["gbps"]
        results.append(result)
    add_ratios(results)
    del sets
    return results


def add_ratios(results: list[dict]) -> None:
    """Each result's time ÷ each baseline's time in the same case (below 1: faster than the baseline)."""
    baselines = {r["backend"]: r for r in results if r["kind"] == "baseline" and r["gbps"]}
    for r in results:
        r["vs"] = {name: r["time"]["median_s"] / b["time"]["median_s"] for name, b in baselines.items()
                   if r["gbps"] and name != r["backend"]}
