"""One record per op (the way PyTorch's OpInfo holds one per operator): what the suite, the tests and the bench
need to know about an op, in one place.

Each record holds the op's contract (darkspec.reference.contract: passes per dialect, dtypes, error codes), the
activations each dialect evaluates, the strategies that draw valid inputs for a capability
(darkspec.conformance.strategies) and the tolerance rule of its comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from hypothesis import strategies as st

from darkspec.backends.base import Capability
from darkspec.conformance import strategies
from darkspec.conformance.compare import Tolerance, tolerance_for
from darkspec.reference import contract
from darkspec.reference.contract import OpContract
from darkspec.reference.dialects import Dialect


@dataclass(frozen=True)
class OpRecord:
    contract: OpContract
    #: capability -> a strategy of valid cases for it
    cases: Callable[[Capability], st.SearchStrategy]
    #: (dtype, largest magnitude involved) -> the tolerance of a comparison with the reference
    tolerance: Callable[[np.dtype, float], Tolerance]
    #: dialect -> the activations a case may use
    activations: Callable[[str], tuple[str, ...]] = lambda dialect: ()

    @property
    def name(self) -> str:
        return self.contract.name


def _shortcut_cases(capability: Capability) -> st.SearchStrategy:
    dtype = np.dtype(capability.dtype).type
    if capability.pass_ == "update":
        return strategies.update_cases(dtype=dtype)
    activation = st.sampled_from(contract.evaluated_activations(capability.dialect))
    if capability.dialect == Dialect.PJREDDIE.value:
        return activation.flatmap(lambda name: strategies.pjreddie_cases(dtype=dtype, activation=name))
    return activation.flatmap(lambda name: strategies.shortcut_cases(dtype=dtype, activation=name))


def _reorg_cases(old: bool) -> Callable[[Capability], st.SearchStrategy]:
    return lambda capability: strategies.reorg_cases(old=old, dtype=np.dtype(capability.dtype).type)


def _permutation(dtype, magnitude) -> Tolerance:
    """A reorg moves values: bit-exact."""
    return Tolerance.exact()


SHORTCUT = OpRecord(contract.SHORTCUT, _shortcut_cases, tolerance_for, contract.evaluated_activations)
REORG3D = OpRecord(contract.REORG3D, _reorg_cases(old=False), _permutation)
REORG = OpRecord(contract.REORG, _reorg_cases(old=True), _permutation)

RECORDS: dict[str, OpRecord] = {record.name: record for record in (SHORTCUT, REORG3D, REORG)}
