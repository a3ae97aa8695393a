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
    """Recordings are a sample: the hypothesis and refusal checks must catch each mistake without them."""
    assert killer(hunt(mutant, "ci", [])), f"{mutant.name} survived the property checks"


@pytest.mark.parametrize("name", ["no-input-validation", "generic-refusal-code"])
def test_validation_mistakes_are_killed_by_the_refusal_check(name):
    # Valid inputs cannot tell these from the reference: only the bad calls of the op records can.
    mutant = next(m for m in MUTANTS if m.name == name)
    report = hunt(mutant, "quick", [])
    assert all(r.passed for r in report.results if r.check == "properties")
    assert "(refusals)" in (killer(report) or ""), f"{name} survived the refusal check"


def test_mutants_command_reports_what_killed_each(capsys):
    assert main(["mutants", "--profile", "quick", "--golden", str(GOLDEN)]) == 0
    out = capsys.readouterr().out
    assert f"{len(MUTANTS)} killed, 0 survived" in out
    assert all(m.name in out for m in MUTANTS)
