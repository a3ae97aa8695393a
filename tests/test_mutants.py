"""The suite can fail: every deliberately broken backend is caught."""

import pytest

from darkspec.cli import main
from darkspec.conformance.mutants import MUTANTS, hunt, killer

from conftest import GOLDEN


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_is_killed_by_the_golden_cases_and_properties(mutant):
    assert killer(hunt(mutant, "ci", [GOLDEN])), f"{mutant.name} survived"


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_is_killed_by_the_properties_alone(mutant):
    """Recordings are a sample: the hypothesis checks must catch each mistake without them."""
    assert killer(hunt(mutant, "ci", [])), f"{mutant.name} survived the property checks"


def test_mutants_command_reports_what_killed_each(capsys):
    assert main(["mutants", "--profile", "quick", "--golden", str(GOLDEN)]) == 0
    out = capsys.readouterr().out
    assert f"{len(MUTANTS)} killed, 0 survived" in out
    assert all(m.name in out for m in MUTANTS)
