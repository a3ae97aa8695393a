"""Timers and the measurement loop: interleaved rounds, every contender of a case once per round, medians."""

from __future__ import annotations

import ctypes
import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class Timer:
    """Times calls on one device (here: the CPU, with ``time.perf_counter``).

    ``time_call(run, i)`` runs ``run(i)`` once and returns the seconds the work took, finished. ``copy_call(nbytes,
    sets)`` returns a ``run(i)`` that copies nbytes/2 bytes between two buffers of set i: read plus write, as many
    bytes as the op it is compared with. A backend that computes elsewhere (a GPU) returns its own Timer from an
    optional method ``bench_timer()`` (see :class:`CudaEventTimer`); its cases are then compared with the copy
    bandwidth of its own device.
    """

    name = "time.perf_counter"
    device = "cpu"

    def time_call(self, run: Callable[[int], Any], i: int) -> float:
        start = time.perf_counter()
        run(i)
        return time.perf_counter() - start

    def copy_call(self, nbytes: int, sets: int) -> Callable[[int], Any]:
        """torch's copy where torch is importable (it uses torch's thread count, like the torch contenders), else
        ``np.copyto`` (one thread)."""
        half = max(1, nbytes // 2)
        torch = sys.modules.get("torch")
        if torch is not None:
            sources = [torch.ones(half, dtype=torch.uint8) for _ in range(sets)]
            targets = [torch.zeros(half, dtype=torch.uint8) for _ in range(sets)]  # touched: no page faults timed
            return lambda i: targets[i].copy_(sources[i])
        sources = [np.full(half, 1, dtype=np.uint8) for _ in range(sets)]
        targets = [np.full(half, 2, dtype=np.uint8) for _ in range(sets)]
        return lambda i: np.copyto(targets[i], sources[i])


CPU_TIMER = Timer()


class CudaEventTimer(Timer):
    """CUDA events around the call on the current stream, then a synchronize on the end event; the copy is a
    device-to-device copy. ``events`` makes an event pair (cupy's or torch's), ``elapsed_s`` reads it, ``empty``
    makes a device buffer of n bytes."""

    def __init__(self, name: str, device: str, events, elapsed_s, empty):
        self.name, self.device = name, device
        self._events, self._elapsed_s, self._empty = events, elapsed_s, empty

    def time_call(self, run, i):
        start, end = self._events()
        start.record()
        run(i)
        end.record()
        end.synchronize()
        return self._elapsed_s(start, end)

    def copy_call(self, nbytes, sets):
        half = max(1, nbytes // 2)
        sources = [self._empty(half) for _ in range(sets)]
        targets = [self._empty(half) for _ in range(sets)]
        for buffer in sources + targets:
            buffer[:] = 1  # touched before timing
        return lambda i: targets[i].__setitem__(slice(None), sources[i])


def timer_for(backend) -> Timer:
    supplied = getattr(backend, "bench_timer", None)
    return supplied() if callable(supplied) else CPU_TIMER


@dataclass
class Contender:
    """One thing timed in a case: a backend, a baseline or the copy. ``run(i)`` computes on input set i;
    ``result(i)`` returns what the last ``run(i)`` computed as named NumPy arrays (None for the copy)."""

    name: str
    kind: str  # "backend", "baseline" or "copy"
    timer: Timer
    run: Callable[[int], Any]
    result: Callable[[int], dict] | None = None
    dialect: str | None = None
    path: str = ""  # how the call reaches the computation
    threads: int | None = None
    samples: list = field(default_factory=list)
    first_call_s: float | None = None
    error: str | None = None


def measure(contenders: list[Contender], sets: int, warmup: int, min_repeats: int, max_repeats: int,
            min_time_s: float) -> None:
    """Warm-up rounds, then timed rounds until min_repeats and min_time_s (or max_repeats) are reached, each
    contender once per round. Every call reads the set after the one the call before it read, whoever made it, so
    no call finds its inputs in the cache because the call before it just read them."""
    calls = 0

    def one(c: Contender, keep: bool):
        nonlocal calls
        calls += 1
        try:
            seconds = c.timer.time_call(c.run, calls % sets)
        except Exception as error:  # noqa: BLE001 - a failing contender is reported in its cell, not raised
            c.error = f"{type(error).__name__}: {error}"
            c.samples.clear()
            return
        if keep:
            c.samples.append(seconds)

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(warmup):
            for c in contenders:
                if c.error is None:
                    one(c, keep=False)
        start, rounds = time.perf_counter(), 0
        while rounds < min_repeats or (rounds < max_repeats and time.perf_counter() - start < min_time_s):
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


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed blocks for reuse (no mmap of large blocks, no trimming), as a caching allocator
    would: a contender that allocates its outputs then pays for the allocation, not for the kernel zeroing fresh
    pages on every call. Every contender runs under the same allocator. Returns what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1):
            return "glibc malloc: no mmap for large blocks, no trimming (freed memory is reused)"
    except (OSError, AttributeError):
        pass
    return "the platform's default allocator"
