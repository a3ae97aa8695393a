"""The contract every backend shares: the ops, the passes of each dialect, the dtypes, the activations each dialect
evaluates, the constants of the math and the error codes of spec/shortcut.md and spec/reorg.md.

Backends declare their capabilities from these tables and kernels take their constants from here, so that no
implementation carries its own copy of a rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from darkspec.errors import DarkspecError
from darkspec.reference import activations
from darkspec.reference.dialects import Dialect, parse_dialect

#: Added to the normalization sum before dividing (a float32 constant in Darknet; spec/shortcut.md#normalization).
NORMALIZATION_EPS = 1e-4
#: The GPU path and inference-time folding clamp relu-normalized weights from below at this value.
RELU_FLOOR = 1e-3

#: [reorg3d] and [reorg] are the same in every Darknet that has them: one dialect.
REORG_DIALECT = "darknet"

_TRAINING = ("forward", "backward", "update")


@dataclass(frozen=True)
class OpContract:
    """One op as every backend must see it."""

    name: str
    #: dialect -> the passes it has, in order
    passes: dict[str, tuple[str, ...]]
    #: the dtypes backends declare the op in (the reference computes each)
    dtypes: tuple[str, ...]
    #: dtypes the spec refuses with bad-dtype (examples: the spec refuses every dtype outside ``dtypes``)
    refused_dtypes: tuple[str, ...]
    #: the error codes of the op's spec table, each a refusal some bad call gets
    error_codes: tuple[str, ...]
    spec: str

    @property
    def dialects(self) -> tuple[str, ...]:
        return tuple(self.passes)

    @property
    def all_passes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for passes in self.passes.values() for p in passes))


SHORTCUT = OpContract(
    "shortcut",
    # darknet-inference has only a forward; the pjreddie shortcut has no weights to update.
    passes={d.value: {Dialect.DARKNET_INFERENCE: ("forward",), Dialect.PJREDDIE: ("forward", "backward")}.get(
        d, _TRAINING) for d in Dialect},
    dtypes=("float32", "float64"),
    refused_dtypes=("float16", "int32"),
    error_codes=(
        "bad-shape", "bad-dtype", "spatial-mismatch", "weights-size", "weights-not-finite", "unknown-weights-type",
        "unknown-weights-normalization", "unknown-dialect", "unknown-quirk", "unknown-activation",
        "activation-not-evaluated", "activation-gradient-aborts", "pass-not-in-dialect", "bad-batch",
        "pjreddie-single-from", "pjreddie-no-weights", "pjreddie-spatial-ratio",
    ),
    spec="spec/shortcut.md#errors",
)

_REORG_CODES = ("reorg-bad-stride", "reorg-bad-reverse", "reorg-bad-shape", "reorg-bad-delta-shape",
                "reorg-size-not-divisible")
#: A reorg only moves values: the spec defines it for every dtype, so none is refused for being another one.
REORG3D = OpContract("reorg3d", passes={REORG_DIALECT: ("forward", "backward")}, dtypes=("float32", "float64"),
                     refused_dtypes=(), error_codes=(*_REORG_CODES, "reorg3d-reverse-channels"),
                     spec="spec/reorg.md#10-errors")
REORG = OpContract("reorg", passes={REORG_DIALECT: ("forward", "backward")}, dtypes=("float32", "float64"),
                   refused_dtypes=(), error_codes=(*_REORG_CODES, "reorg-old-channels"), spec="spec/reorg.md#10-errors")

OPS: dict[str, OpContract] = {op.name: op for op in (SHORTCUT, REORG3D, REORG)}


def passes(op: str, dialect: str) -> tuple[str, ...]:
    """The passes ``op`` has in ``dialect`` (none for a dialect the op does not have)."""
    return OPS[op].passes.get(dialect, ())


def require_pass(op: str, dialect: Dialect | str, pass_: str) -> None:
    """Refuse a pass the dialect does not have, with ``pass-not-in-dialect``."""
    dialect = parse_dialect(dialect) if op == SHORTCUT.name else dialect
    name = getattr(dialect, "value", dialect)
    if pass_ not in passes(op, name):
        having = [d for d, p in OPS[op].passes.items() if pass_ in p]
        raise DarkspecError("dialect", name, f"one with a {pass_} pass: {', '.join(having)}",
                            code="pass-not-in-dialect")


#: The dialects whose relu normalization clamps the weights from below at RELU_FLOOR.
FLOORED_DIALECTS = frozenset({Dialect.DARKNET_GPU, Dialect.DARKNET_INFERENCE})


def relu_floor_of(dialect: Dialect | str) -> float | None:
    """The floor of relu normalization in ``dialect``, or None where relu has none."""
    return RELU_FLOOR if parse_dialect(dialect) in FLOORED_DIALECTS else None


def library_of(dialect: Dialect | str) -> str:
    """Which Darknet's activations a dialect uses."""
    return "pjreddie" if parse_dialect(dialect) == Dialect.PJREDDIE else "alexeyab"


def evaluated_activations(dialect: Dialect | str) -> tuple[str, ...]:
    """The activations [shortcut] evaluates in ``dialect`` (the others are unknown there, or output 0 in Darknet)."""
    names = activations.PJREDDIE_NAMES if library_of(dialect) == "pjreddie" else activations.ALEXEYAB_NAMES
    return tuple(n for n in names if n not in activations.SHORTCUT_UNEVALUATED)
