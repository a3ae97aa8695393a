"""Throughput of the cupy backend's [shortcut] kernels on one GPU (spec/cupy-backend.md, "Throughput").

The case: a 3-input [shortcut] (the previous layer and two from= layers) with per_channel weights, softmax
normalization and a linear activation, in the darknet-gpu dialect, float32, 16x256x76x76 by default. For the forward
and the backward pass it reports:

- the median time of >= 20 timed runs after warm-up, from CUDA events around the kernel launches only (the arrays
  stay on the device: no host copies are timed), with the 20th and 80th percentiles;
- the bytes the pass must move at least: every input read once, every output written once (forward: 3 inputs, the
  weights, 1 output; backward: 3 inputs, the delta, the weights and the accumulator read, d, 3 input deltas and the
  accumulator written), and the GB/s that gives;
- the same bytes moved by a device-to-device copy (cudaMemcpyAsync of half as many bytes, which reads them once and
  writes them once), timed the same way in the same run, and the kernel's share of that bandwidth;
- the time of the eager PyTorch formulation ``x*w0 + a*w1 + b*w2`` on the same GPU and the same buffers (the
  backward: autograd of that expression with the same delta), and how many times faster the kernel is.

It also checks the result of sample 0 against the reference, and that two backward runs give the same weight
gradient bit for bit. Usage: ``python benchmarks/gpu_throughput.py [--shape B C H W] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
from tabulate import tabulate


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


class Timer:
    """CUDA-event timing of a callable that only enqueues device work, on the current stream."""

    def __init__(self, cupy, repeats: int, warmup: int):
        self.cupy, self.repeats, self.warmup = cupy, repeats, warmup

    def __call__(self, fn) -> dict:
        cp = self.cupy
        for _ in range(self.warmup):
            fn()
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(self.repeats):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))  # milliseconds
        return {"median_ms": percentile(times, 50), "p20_ms": percentile(times, 20), "p80_ms": percentile(times, 80),
                "runs": len(times)}


class TorchTimer:
    def __init__(self, torch, repeats: int, warmup: int):
        self.torch, self.repeats, self.warmup = torch, repeats, warmup

    def __call__(self, fn) -> dict:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return {"median_ms": percentile(times, 50), "p20_ms": percentile(times, 20), "p80_ms": percentile(times, 80),
                "runs": len(times)}


def copy_call(cupy, nbytes: int):
    """A device-to-device copy that moves ``nbytes`` in all: reads nbytes/2, writes nbytes/2."""
    half = max(1, nbytes // 2)
    source = cupy.empty(half, dtype=cupy.uint8)
    target = cupy.empty(half, dtype=cupy.uint8)
    return lambda: target.data.copy_from_device_async(source.data, half)


def torch_calls(call, what):
    """Eager PyTorch on the same device buffers: forward and (autograd) backward of x*w0 + a*w1 + b*w2."""
    try:
        import torch
    except Exception as error:
        return None, f"torch is not importable ({type(error).__name__}: {error})"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device (a CPU build of torch?)"
    x, a, b = (torch.as_tensor(t, device="cuda") for t in call.inputs)
    delta = torch.as_tensor(call.delta_d, device="cuda")
    channels = x.shape[1]
    w = [torch.tensor(what[i], device="cuda").reshape(1, channels, 1, 1) for i in range(3)]

    def forward():
        return x * w[0] + a * w[1] + b * w[2]

    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, *w)]
    out = leaves[0] * leaves[3] + leaves[1] * leaves[4] + leaves[2] * leaves[5]

    def backward():
        return torch.autograd.grad(out, leaves, delta, retain_graph=True)

    return (torch, forward, backward), f"torch {torch.__version__}"


def check_sample_zero(call, x, froms, weights, delta, params):
    """The kernels' forward and deltas of sample 0 against the reference (samples are independent)."""
    from darkspec.conformance.compare import compare, largest_magnitude, tolerance_for
    from darkspec.reference import shortcut

    expected = shortcut.forward(x[:1], [f[:1] for f in froms], weights, params=params, dialect="darknet-gpu")
    tolerance = tolerance_for(np.float32, largest_magnitude(x[:1], *(f[:1] for f in froms), expected))
    rows = [compare("forward output", expected, call.output()[:1], tolerance)]
    grads = call.gradients()
    reference = shortcut.backward(x[:1], [f[:1] for f in froms], weights, delta[:1], params=params,
                                  dialect="darknet-gpu")
    rows.append(compare("backward delta", reference.delta, grads.delta[:1], tolerance))
    for i, (e, a) in enumerate(zip(reference.input_deltas, grads.input_deltas)):
        rows.append(compare(f"backward input delta {i}", e, a[:1], tolerance))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 256, 76, 76], metavar=("B", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (>= 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("reports") / "gpu_throughput.json")
    args = parser.parse_args(argv)
    args.repeats = max(args.repeats, 20)

    from darkspec.backends.cupy_backend import CupyBackend, cupy_unavailable_reason
    from darkspec.reference import shortcut
    from darkspec.reference.shortcut import ShortcutParams

    reason = cupy_unavailable_reason()
    if reason:
        print(f"gpu_throughput: the cupy backend is unavailable: {reason}", file=sys.stderr)
        return 2
    import cupy

    backend = CupyBackend()
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    x, a, b, delta = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    weights = rng.standard_normal(3 * shape[1]).astype(np.float32)
    params = ShortcutParams("per_channel", "softmax", "linear")
    call = backend.prepare_shortcut(x, [a, b], weights, delta, params=params, dialect="darknet-gpu")
    timer = Timer(cupy, args.repeats, args.warmup)
    print(f"device: {backend.version()}")
    print(f"case: [shortcut] x + 2 from, per_channel softmax, linear, darknet-gpu, float32 {list(shape)}; "
          f"{args.repeats} timed runs after {args.warmup} warm-up runs")

    results = {}
    for pass_, fn, nbytes in (("forward", call.forward, call.bytes_forward),
                              ("backward", call.backward, call.bytes_backward)):
        kernel = timer(fn)
        copy = timer(copy_call(cupy, nbytes))
        results[pass_] = {"bytes": nbytes, "kernel": kernel, "copy": copy,
                          "gbps": nbytes / kernel["median_ms"] / 1e6, "copy_gbps": nbytes / copy["median_ms"] / 1e6}

    what = shortcut.normalize_weights(weights.reshape(3, -1), shortcut.Normalization.SOFTMAX, relu_floor=1e-3)
    torch_parts, torch_note = torch_calls(call, what)
    if torch_parts:
        torch, forward, backward = torch_parts
        torch_timer = TorchTimer(torch, args.repeats, args.warmup)
        results["forward"]["torch"] = torch_timer(forward)
        results["backward"]["torch"] = torch_timer(backward)

    rows = []
    for pass_, r in results.items():
        k = r["kernel"]
        t = r.get("torch")
        rows.append([
            pass_, f"{k['median_ms']:.4f}", f"{k['p20_ms']:.4f}-{k['p80_ms']:.4f}", f"{r['bytes'] / 1e6:.1f}",
            f"{r['gbps']:.0f}", f"{r['copy_gbps']:.0f}", f"{100 * r['gbps'] / r['copy_gbps']:.1f}%",
            f"{t['median_ms']:.4f}" if t else "-", f"{t['median_ms'] / k['median_ms']:.2f}x" if t else "-",
        ])
    print()
    print(tabulate(rows, headers=["pass", "median ms", "p20-p80 ms", "MB moved", "GB/s", "copy GB/s", "% of copy",
                                  "torch eager ms", "kernel speed-up"]))
    print(f"(torch: {torch_note})")

    # Determinism: the weight gradient of two runs, bit for bit.
    call.backward()
    first = cupy.asnumpy(call.updates_d).tobytes()
    call.backward()
    deterministic = cupy.asnumpy(call.updates_d).tobytes() == first
    checks = check_sample_zero(call, x, [a, b], weights, delta, params)
    print()
    print(tabulate([[c.name, "pass" if c.passed else "FAIL", c.max_ulp, f"{c.max_abs:.3g}"] for c in checks]
                   + [["weight gradient, two runs", "same bits" if deterministic else "DIFFERENT", "-", "-"]],
                   headers=["check", "verdict", "max ulp", "max abs"]))

    report = {"device": backend.version(), "platform": platform.platform(), "shape": list(shape),
              "repeats": args.repeats, "warmup": args.warmup, "results": results, "torch": torch_note,
              "deterministic_weight_gradient": deterministic,
              "checks": [{"name": c.name, "passed": c.passed, "max_ulp": c.max_ulp} for c in checks]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nreport: {args.json}")
    return 0 if deterministic and all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
