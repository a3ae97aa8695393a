"""nox sessions: ``conformance`` (the suite's main job), ``tests`` (the project's own tests) and ``lint``."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

CONSTRAINTS = ("-c", "constraints.txt")
#: A strict editable install: the package is a tree of links under build/, so the package-dir mapping resolves
#: statically (mypy, IDEs) and a module that is not in the package cannot be imported by accident.
STRICT_EDITABLE = ("--config-settings", "editable_mode=strict", "-e")


@nox.session
def conformance(session):
    """The conformance matrix of every known backend through the pytest plugin (one xdist worker per core), with
    reports/conformance.json and reports/conformance.xml; then the out-of-tree example backend, installed as a
    backend author installs theirs, through ``pytest --darkspec-backend toy`` in an empty directory."""
    session.install(*CONSTRAINTS, ".[torch,onnx,opencv]", "./examples/toy_backend")
    session.run("darkspec", "conformance", *session.posargs)
    session.chdir(session.create_tmp())
    session.run("pytest", "--darkspec-backend", "toy", "-n", "2", "-p", "no:cacheprovider")


@nox.session
def tests(session):
    """The test suite, with the oracles (torch, onnx), the third-party runtimes (onnxruntime, OpenCV) and matplotlib
    (darkspec check --plot) installed.
    Set DARKSPEC_HYPOTHESIS_PROFILE=thorough for a long hypothesis run."""
    session.install(*CONSTRAINTS, *STRICT_EDITABLE, ".[test,oracles,onnx,opencv,plot]")
    session.run("pytest", "-n", "2", "-q", *session.posargs)


@nox.session
def bench(session):
    """The throughput matrix of every available backend (reports/bench.json, reports/bench-*.png). ``nox -s bench --
    --quick`` is the smoke run (it never gates on speed); ``-- --compare OLD.json`` flags regressions beyond the
    measured spread."""
    session.install(*CONSTRAINTS, ".[bench]")
    session.run("python", "-m", "darkspec.bench", *session.posargs)


@nox.session
def lint(session):
    """ruff over the repository and mypy over the installed package (configuration in pyproject.toml)."""
    session.install(*CONSTRAINTS, *STRICT_EDITABLE, ".[lint,test,oracles]")
    session.run("ruff", "check", ".")
    session.run("mypy", "-p", "darkspec")
