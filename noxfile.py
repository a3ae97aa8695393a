"""nox sessions: ``conformance`` (the suite's main job) and ``tests`` (the project's own tests)."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

CONSTRAINTS = ("-c", "constraints.txt")


@nox.session
def conformance(session):
    """The conformance matrix of every known backend, with JSON and JUnit reports in reports/."""
    session.install(*CONSTRAINTS, ".[torch,onnx,opencv]")
    session.run("darkspec", "conformance", *session.posargs)


@nox.session
def tests(session):
    """The test suite, with the oracles (torch, onnx) and the third-party runtimes (onnxruntime, OpenCV) installed.
    Set DARKSPEC_HYPOTHESIS_PROFILE=thorough for a long hypothesis run."""
    session.install(*CONSTRAINTS, "-e", ".[test,oracles,onnx,opencv]")
    session.run("pytest", "-n", "2", "-q", *session.posargs)


@nox.session
def bench(session):
    """The throughput matrix of every available backend (reports/bench.json, reports/bench-*.png). ``nox -s bench --
    --quick`` is the smoke run (it never gates on speed); ``-- --compare OLD.json`` flags regressions beyond the
    measured spread."""
    session.install(*CONSTRAINTS, ".[bench]")
    session.run("python", "-m", "darkspec.bench", *session.posargs)
