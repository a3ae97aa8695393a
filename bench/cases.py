"""What the bench measures: the cases (op, pass, configuration), the sizes, and the least data each case must move."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from darkspec.errors import DarkspecError
from darkspec.reference import reorg
from darkspec.reference.shortcut import UpdateParams, weight_count

#: The update step measured: Darknet's darknet-cpu rule with typical YOLO training settings.
UPDATE = UpdateParams(learning_rate=0.001, momentum=0.9, decay=0.0005, batch=64)


@dataclass(frozen=True)
class Case:
    """One configuration of one op and pass. The shortcut's n_from is the number of from= inputs (1-4)."""

    op: str  # "shortcut", "reorg3d" or "reorg"
    pass_: str  # "forward", "backward" or "update"
    n_from: int = 0
    weights_type: str = "none"
    normalization: str = "none"
    activation: str = "linear"
    reverse: bool = False
    stride: int = 2

    @property
    def key(self) -> str:
        """A stable identifier (JSON, compare mode, --case)."""
        if self.op == "shortcut" and self.pass_ == "update":
            return f"shortcut.update.n{self.n_from}.{self.weights_type}"
        if self.op == "shortcut":
            return f"shortcut.{self.pass_}.n{self.n_from}.{self.weights_type}.{self.normalization}.{self.activation}"
        return f"{self.op}.{self.pass_}.reverse{int(self.reverse)}.stride{self.stride}"

    @property
    def configuration(self) -> str:
        """The case within its op and pass, for tables and charts."""
        if self.op == "shortcut" and self.pass_ == "update":
            return f"n={self.n_from} {self.weights_type}"
        if self.op == "shortcut":
            return f"n={self.n_from} {self.weights_type}/{self.normalization} {self.activation}"
        return f"reverse={int(self.reverse)} stride={self.stride}"

    @property
    def group(self) -> str:
        """One chart per group: the op and its pass."""
        return f"{self.op} {self.pass_}"

    @property
    def label(self) -> str:
        return f"{self.group} {self.configuration}"

    def weights(self, shape) -> int:
        return weight_count(self.weights_type, self.n_from, shape[1]) if self.op == "shortcut" else 0

    def skip_reason(self, shape) -> str | None:
        """Why darkspec refuses this op on this size, or None."""
        if self.op == "shortcut":
            return None
        try:
            reorg.plan(self.op, shape, self.stride, self.reverse)
        except DarkspecError as error:
            return str(error)
        return None


#: The configurations of [shortcut]: every weights type and normalization, 1 to 4 from= inputs.
FUSIONS = ((1, "none", "none"), (2, "per_feature", "relu"), (3, "per_channel", "softmax"), (4, "per_channel", "none"))
#: Activations: the cheap piecewise-linear ones, and two transcendental ones bound by arithmetic.
FORWARD_ACTIVATIONS = ("linear", "leaky", "relu", "mish", "logistic")
BACKWARD_ACTIVATIONS = ("linear", "leaky", "mish", "logistic")
#: Activations whose cost is memory, not arithmetic: held to >= 85% of copy bandwidth (issue 16's targets).
CHEAP_ACTIVATIONS = ("linear", "leaky", "relu")

REORGS = (Case("reorg3d", "forward"), Case("reorg3d", "forward", reverse=True), Case("reorg", "forward"))

FULL_CASES = (
    *(Case("shortcut", "forward", n, w, z, a) for a in FORWARD_ACTIVATIONS for n, w, z in FUSIONS),
    *(Case("shortcut", "backward", n, w, z, a) for a in BACKWARD_ACTIVATIONS for n, w, z in FUSIONS),
    Case("shortcut", "update", 2, "per_feature"),
    Case("shortcut", "update", 3, "per_channel"),
    *REORGS,
)
#: The smoke run's cases: each pass and op once, two activations, every weights type.
QUICK_CASES = (
    Case("shortcut", "forward", 1, "none", "none", "linear"),
    Case("shortcut", "forward", 3, "per_channel", "softmax", "leaky"),
    Case("shortcut", "backward", 2, "per_feature", "relu", "logistic"),
    Case("shortcut", "update", 3, "per_channel"),
    *REORGS[::2],
)


def bytes_moved(case: Case, shape, dtype) -> int:
    """The least data the case must move: each input it depends on read once, each output written once.

    With T = N*C*H*W elements, n from-inputs and W weights:

    - shortcut forward: reads x, the n froms and the weights, writes the output: (n+2)*T + W.
    - shortcut backward (the gradient of each input and of the weights from the output's gradient): reads the
      output's gradient; the output too where the activation's gradient needs it (not linear); x and the froms
      where there is a weight gradient; the weights. Writes n+1 input gradients and the weight gradient:
      T + [T] + [(n+1)*T] + W + (n+1)*T + W.
    - shortcut update: reads the weights and the accumulator, writes both: 4*W.
    - reorg3d / reorg (permutations): reads T, writes T.
    """
    elements, itemsize = math.prod(shape), np.dtype(dtype).itemsize
    if case.op != "shortcut":
        return 2 * elements * itemsize
    weights, inputs = case.weights(shape), case.n_from + 1
    if case.pass_ == "forward":
        return ((inputs + 1) * elements + weights) * itemsize
    if case.pass_ == "update":
        return 4 * weights * itemsize
    reads = elements * (1 + (case.activation != "linear") + (inputs if weights else 0)) + weights
    return (reads + inputs * elements + weights) * itemsize


def set_bytes(case: Case, shape, dtype) -> int:
    """The bytes of one set of input arrays (everything handed to the call)."""
    elements, itemsize = math.prod(shape), np.dtype(dtype).itemsize
    if case.op != "shortcut":
        return 2 * elements * itemsize
    if case.pass_ == "update":
        return 2 * case.weights(shape) * itemsize
    tensors = case.n_from + 2 + (case.pass_ == "backward") * (case.n_from + 3)
    return (tensors * elements + 2 * case.weights(shape)) * itemsize


@dataclass(frozen=True)
class Profile:
    name: str
    cases: tuple[Case, ...]
    sizes: tuple[tuple[int, int, int, int], ...]
    threads: tuple[int, ...]
    warmup: int
    min_repeats: int
    max_repeats: int
    #: Rounds go on past min_repeats until this many seconds have passed in the case (or max_repeats).
    min_time_s: float
    #: Input sets to rotate among: enough for 2x the last-level cache, within these bounds.
    max_sets: int
    set_budget_bytes: int


PROFILES = {
    "quick": Profile("quick", QUICK_CASES, ((1, 16, 8, 8), (1, 64, 13, 13)), threads=(1,), warmup=1,
                     min_repeats=5, max_repeats=9, min_time_s=0.05, max_sets=4, set_budget_bytes=64 << 20),
    "full": Profile("full", FULL_CASES, ((1, 64, 13, 13), (4, 128, 26, 26), (8, 256, 52, 52), (16, 256, 76, 76)),
                    threads=(1, 2), warmup=2, min_repeats=7, max_repeats=30, min_time_s=0.5, max_sets=16,
                    set_budget_bytes=3 << 30),
}


def rotation_sets(per_set: int, profile: Profile, llc_bytes: int) -> int:
    """How many input sets to rotate among so that a set is out of the cache when its turn comes again."""
    wanted = math.ceil(2 * llc_bytes / max(per_set, 1))
    affordable = profile.set_budget_bytes // max(per_set, 1)
    return max(2, min(wanted, profile.max_sets, affordable))


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise DarkspecError("--size", text, "NxCxHxW: four positive integers, e.g. 8x256x52x52", code="bad-size")
    return dims  # type: ignore[return-value]


def size_label(shape) -> str:
    return "x".join(str(d) for d in shape)


def make_sets(case: Case, shape, dtype, count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` independent input sets, values in [-1, 1) (weights in [0.5, 1.5)): the keyword arguments of the
    op's call (x, froms, weights, delta, weight_updates)."""
    dtype = np.dtype(dtype)

    def tensor(dims=shape):
        a = rng.random(dims, dtype=dtype)
        a *= 2
        a -= 1
        return a

    nweights = case.weights(shape)

    def weights():
        return (rng.random(nweights) + 0.5).astype(dtype) if nweights else None

    if case.op != "shortcut":
        return [{"x": tensor()} for _ in range(count)]
    if case.pass_ == "update":
        return [{"weights": weights(), "weight_updates": tensor((nweights,))} for _ in range(count)]
    return [{"x": tensor(), "froms": [tensor() for _ in range(case.n_from)], "weights": weights(),
             "delta": tensor() if case.pass_ == "backward" else None,
             "weight_updates": np.zeros(nweights, dtype) if nweights and case.pass_ == "backward" else None}
            for _ in range(count)]
