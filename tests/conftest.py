"""Test configuration: hypothesis profiles and the location of the golden data."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# quick: a smoke run; ci: the default, derandomized so every run draws the same examples; thorough: opt-in.
settings.register_profile("quick", max_examples=10, deadline=None, derandomize=True)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("DARKSPEC_HYPOTHESIS_PROFILE", "ci"))

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    return GOLDEN


def matrix_rows(output: str) -> dict[str, list[str]]:
    """The rows of the conformance matrix printed in ``output``: op/dialect/pass -> one cell per backend."""
    label = re.compile(r"^(shortcut|reorg3d|reorg)/[^/\s]+/[^/\s]+\s")
    return {line.split()[0]: re.split(r"\s{2,}", line.strip())[1:] for line in output.splitlines() if label.match(line)}


def run_in(directory, *command, timeout=600):
    """``python -m COMMAND...`` in ``directory``, as a user runs it, with the tests' backends importable."""
    return subprocess.run([sys.executable, "-m", *command], cwd=directory, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)})
