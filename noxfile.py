"""nox sessions: ``conformance`` (the suite's main job) and ``tests`` (the project's own tests)."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

CONSTRAINTS = ("-c", "constraints.txt")


@nox.session
def conformance(session):
    """Replay the Darknet recordings in golden/ through the reference."""
    session.install(*CONSTRAINTS, ".")
    session.run("darkspec", "vectors", "golden/darknet-vectors", *session.posargs)


@nox.session
def tests(session):
    """The test suite, with the oracles (torch, onnx) installed. Set DARKSPEC_HYPOTHESIS_PROFILE=thorough for a
    long hypothesis run."""
    session.install(*CONSTRAINTS, "-e", ".[test,oracles]")
    session.run("pytest", "-n", "2", "-q", *session.posargs)
