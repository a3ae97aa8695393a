"""The GPU check: the cupy and torch-cuda backends through the conformance suite, their tests and the bench.

Run it from the repository root on a machine with an NVIDIA GPU whose Python already holds darkspec's dependencies
(cupy-cuda13x, nvidia-cuda-nvrtc, a CUDA build of torch, numpy, hypothesis, pytest, pytest-xdist, pytest-timeout,
tabulate, setuptools; matplotlib for the chart). It installs nothing from a package index:

    python3 benchmarks/gpu_check.py OUT_DIR

Steps, each with its own time limit inside one overall budget (8 minutes by default, ``--budget``):

1. the machine: the GPU and its driver (``nvidia-smi``); without one it stops at once, with exit status 3;
2. the imports: every module the later steps need; it stops with the list of what is missing (exit status 4);
3. the install: ``pip install --no-deps --no-build-isolation --no-index -e .``;
4. the conformance suite on ``cupy`` and ``torch-cuda`` (profile ``ci``, golden cases included);
5. the GPU tests: ``tests/test_cupy.py`` and ``tests/test_torch.py``, where the GPU tests run instead of skipping;
6. the bench for the GPU backends (the throughput matrix, its JSON and its chart).

A step that fails does not stop the ones after it. Everything goes to OUT_DIR: ``gpu_check.log`` (the whole
output), ``summary.json`` (each step's verdict and time, the GPU and the versions), the conformance and bench
reports and the tests' JUnit XML. The exit status is 0 when every step passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU, MISSING_IMPORTS = 3, 4
#: The modules the steps import: (module, the package that provides it).
REQUIRED_MODULES = (
    ("numpy", "numpy"), ("tabulate", "tabulate"), ("hypothesis", "hypothesis"), ("pytest", "pytest"),
    ("xdist", "pytest-xdist"), ("pytest_timeout", "pytest-timeout"), ("setuptools", "setuptools"),
    ("cupy", "cupy-cuda13x"), ("torch", "torch (a CUDA build)"),
)
#: Wanted but not needed: the bench draws its chart with matplotlib and prints its table without it.
OPTIONAL_MODULES = (("matplotlib", "matplotlib"),)
GPU_BACKENDS = ("cupy", "torch-cuda")


@dataclass
class Step:
    name: str
    verdict: str
    seconds: float
    command: str


class Log:
    """Everything printed, to the terminal and to OUT_DIR/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def write(self, text: str):
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()

    def banner(self, text: str, started: float):
        self.write(f"\n==== {text} (t={time.monotonic() - started:.0f}s) ====\n")


def missing_modules(modules) -> list[str]:
    """The packages whose module cannot be found, as "module (package)"."""
    return [f"{module} ({package})" for module, package in modules if importlib.util.find_spec(module) is None]


def gpu_description() -> str | None:
    """The GPUs nvidia-smi lists (name, driver, memory), or None where there is no NVIDIA GPU and driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        listing = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = listing.stdout.strip()
    return text if listing.returncode == 0 and text else None


class Check:
    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.log = Log(out / "gpu_check.log")
        self.steps: list[Step] = []
        self.facts: dict[str, object] = {}

    def limit(self, cap: float, reserve: float) -> float:
        """At most ``cap`` seconds, and not past the deadline less ``reserve`` kept for the steps after it."""
        return max(10.0, min(cap, self.deadline - reserve - time.monotonic()))

    def run(self, name: str, command: list[str], cap: float, reserve: float, env: dict | None = None) -> bool:
        seconds = self.limit(cap, reserve)
        self.log.banner(f"{name} (limit {seconds:.0f}s)", self.started)
        begin = time.monotonic()
        try:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                       start_new_session=True)
        except OSError as error:
            return self.record(name, f"FAIL (cannot start: {error})", begin, command)
        verdict = self._follow(process, begin + seconds)
        return self.record(name, verdict, begin, command)

    def _follow(self, process: subprocess.Popen, deadline: float) -> str:
        """Copies the step's output to the log as it comes; ends the step's whole process group at the deadline."""
        assert process.stdout is not None
        copier = threading.Thread(target=lambda: [self.log.write(line) for line in process.stdout], daemon=True)
        copier.start()
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            copier.join(timeout=5)
            return "TIMEOUT"
        copier.join(timeout=5)
        return "pass" if process.returncode == 0 else f"FAIL ({process.returncode})"

    def record(self, name: str, verdict: str, begin: float, command: list[str]) -> bool:
        self.steps.append(Step(name, verdict, round(time.monotonic() - begin, 1), " ".join(command)))
        return verdict == "pass"

    def summary(self) -> int:
        self.log.banner("summary", self.started)
        width = max(len(step.name) for step in self.steps) if self.steps else 10
        for step in self.steps:
            self.log.write(f"{step.name:<{width}}  {step.verdict:<12} {step.seconds:7.1f}s\n")
        total = time.monotonic() - self.started
        self.log.write(f"total: {total:.0f}s; everything is in {self.out}\n")
        failed = any(step.verdict != "pass" for step in self.steps)
        (self.out / "summary.json").write_text(json.dumps(
            {"passed": not failed, "seconds": round(total, 1), **self.facts,
             "steps": [asdict(step) for step in self.steps]}, indent=2) + "\n", encoding="utf-8")
        return 1 if failed else 0

    def stop(self, status: int, message: str) -> int:
        self.log.write(f"gpu_check: {message}\n")
        (self.out / "summary.json").write_text(json.dumps({"passed": False, "stopped": message, **self.facts},
                                                          indent=2) + "\n", encoding="utf-8")
        return status


VERSIONS = """
import json, platform, cupy, numpy, torch, darkspec
device = cupy.cuda.runtime.getDeviceProperties(0)
print(json.dumps({"python": platform.python_version(), "darkspec": darkspec.__version__, "numpy": numpy.__version__,
                  "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                  "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "torch_sees_gpu": torch.cuda.is_available(), "device": device["name"].decode()}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder for the log and every report (created if needed)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget)
    python = sys.executable

    check.log.banner("machine", check.started)
    gpu = gpu_description()
    check.log.write(f"python {sys.version.split()[0]} at {python}\nGPU: {gpu or 'none'}\n")
    if gpu is None:
        return check.stop(NO_GPU, "no NVIDIA GPU here (nvidia-smi is missing or lists no GPU): this check needs a "
                                  "machine with an NVIDIA GPU and its driver; on a CPU-only machine run "
                                  "`nox -s conformance`, where the GPU backends read `unavailable`")
    check.facts["gpu"] = gpu

    check.log.banner("imports", check.started)
    missing = missing_modules(REQUIRED_MODULES)
    for module in missing_modules(OPTIONAL_MODULES):
        check.log.write(f"optional, not installed: {module}: the bench prints its table without a chart\n")
    if missing:
        return check.stop(MISSING_IMPORTS, "missing Python packages (this check installs nothing from an index): "
                                           + ", ".join(missing))
    check.log.write("every module the check needs imports\n")

    check.run("install darkspec", [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                   "--no-index", "-e", "."], cap=120, reserve=360)
    versions = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True, cwd=ROOT)
    if versions.returncode == 0:
        check.facts["versions"] = json.loads(versions.stdout)
        check.log.write(f"versions: {versions.stdout}")
    else:
        check.log.write(f"versions: cannot be read:\n{versions.stderr}")

    backends = [flag for name in GPU_BACKENDS for flag in ("--backend", name)]
    check.run("conformance (cupy, torch-cuda; profile ci)",
              [python, "-m", "darkspec", "conformance", *backends, "--profile", "ci",
               "--report-dir", str(out / "conformance")], cap=200, reserve=160)
    check.run("GPU tests", [python, "-m", "pytest", "tests/test_cupy.py", "tests/test_torch.py", "-q", "-rs",
                            "-p", "no:cacheprovider", f"--junitxml={out / 'gpu_tests.xml'}"], cap=120, reserve=90)
    check.run("bench (GPU backends)", [python, "-m", "darkspec", "bench", *backends, "--only",
                                       "--size", "16x256x76x76", "--threads", "1", "--no-baselines", "--no-darknet",
                                       "--case", "per_channel.softmax", "--output", str(out / "bench")],
              cap=150, reserve=0)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
