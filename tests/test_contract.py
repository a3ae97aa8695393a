"""The contract (darkspec.reference.contract): one table of ops, passes, dtypes and error codes that the spec, the
reference and every backend's declarations agree with."""

import re
from pathlib import Path

import numpy as np
import pytest

from darkspec.backends.base import capability_grid
from darkspec.backends.cupy_backend import CupyBackend
from darkspec.backends.reference import ReferenceBackend
from darkspec.backends.torch_backend import TorchBackend
from darkspec.conformance.ops import RECORDS
from darkspec.errors import DarkspecError
from darkspec.reference import contract
from darkspec.reference.dialects import Dialect

SPEC = Path(__file__).resolve().parents[1] / "spec"


def _spec_codes(filename: str, heading: str) -> set[str]:
    """The codes in the first column of the spec's error table."""
    text = (SPEC / filename).read_text(encoding="utf-8")
    table = text[text.index(heading):]
    return {code for row in table.splitlines() if row.startswith("| `")
            for code in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])}


def test_error_codes_are_the_spec_tables():
    assert set(contract.SHORTCUT.error_codes) == _spec_codes("shortcut.md", "## Errors")
    reorg_codes = _spec_codes("reorg.md", "## 10. Errors")
    assert set(contract.REORG3D.error_codes) | set(contract.REORG.error_codes) == reorg_codes
    assert "reorg-old-channels" not in contract.REORG3D.error_codes
    assert "reorg3d-reverse-channels" not in contract.REORG.error_codes


def test_passes_per_dialect_are_the_specs():
    # spec/shortcut.md: darknet-inference is forward only; pjreddie has no weights to update.
    assert contract.passes("shortcut", "darknet-inference") == ("forward",)
    assert contract.passes("shortcut", "pjreddie") == ("forward", "backward")
    for dialect in ("darknet-cpu", "darknet-gpu", "exact"):
        assert contract.passes("shortcut", dialect) == ("forward", "backward", "update")
    assert set(contract.SHORTCUT.dialects) == {d.value for d in Dialect}
    for op in ("reorg3d", "reorg"):
        assert contract.OPS[op].passes == {contract.REORG_DIALECT: ("forward", "backward")}


@pytest.mark.parametrize("op, dialect, pass_", [("shortcut", "darknet-inference", "backward"),
                                                ("shortcut", "darknet-inference", "update"),
                                                ("shortcut", "pjreddie", "update")])
def test_a_pass_outside_the_dialect_is_refused(op, dialect, pass_):
    with pytest.raises(DarkspecError) as raised:
        contract.require_pass(op, dialect, pass_)
    assert raised.value.code == "pass-not-in-dialect"


def test_constants_are_the_specs_values():
    # spec/shortcut.md#normalization: eps = 0.0001, the relu floor 0.001; the floor only where the spec says.
    assert contract.NORMALIZATION_EPS == 0.0001 and contract.RELU_FLOOR == 0.001
    floored = {d.value for d in Dialect if contract.relu_floor_of(d) is not None}
    assert floored == {"darknet-gpu", "darknet-inference"}


def test_evaluated_activations_leave_out_what_shortcut_zeroes():
    assert "hard_mish" not in contract.evaluated_activations("darknet-cpu")
    assert "mish" in contract.evaluated_activations("darknet-gpu")
    assert "mish" not in contract.evaluated_activations("pjreddie")  # pjreddie's Darknet has no mish


@pytest.mark.parametrize("backend, device", [(ReferenceBackend(), "cpu"), (TorchBackend(), "cpu"),
                                             (CupyBackend(), "cuda")])
def test_full_backends_declare_the_contract_grid(backend, device):
    declared = backend.capabilities()
    assert declared == capability_grid(device=device)
    assert {(c.op, c.dialect, c.pass_) for c in declared} == {
        (op.name, dialect, pass_) for op in contract.OPS.values() for dialect, passes in op.passes.items()
        for pass_ in passes}
    assert {c.dtype for c in declared} == {np.dtype(np.float32).name, np.dtype(np.float64).name}


def test_every_op_has_one_record():
    assert set(RECORDS) == set(contract.OPS)
    for name, record in RECORDS.items():
        assert record.contract is contract.OPS[name]


def test_every_error_code_has_a_bad_call_in_its_op_record():
    for name, record in RECORDS.items():
        called = {e.code for e in record.error_inputs}
        assert called | set(record.refused_by_types) == set(record.contract.error_codes), name
        assert not called & set(record.refused_by_types)


def test_codes_no_call_reaches_are_refused_by_the_arguments_own_type():
    for code, construct in RECORDS["shortcut"].refused_by_types.items():
        with pytest.raises(DarkspecError) as raised:
            construct()
        assert raised.value.code == code


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_error_input_gets_its_code_from_the_reference(name):
    record = RECORDS[name]
    reference = ReferenceBackend()
    for capability in sorted(c for c in reference.capabilities() if c.op == name):
        for error in record.errors_for(capability, reference.quirks()):
            call = error.build(capability)
            with pytest.raises(DarkspecError) as raised:
                getattr(reference, call.method)(*call.args.values(), **call.settings)
            assert raised.value.code == error.code, (capability, error.mistake)
        valid = record.valid_call(capability)
        getattr(reference, valid.method)(*valid.args.values(), **valid.settings)  # the base of every bad call runs
