"""Test configuration: hypothesis profiles and the location of the golden data."""

import os
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
