"""The multi-input weighted ``[shortcut]`` layer: forward, backward, update and weight folding (spec/shortcut.md).

Tensors are NCHW. ``x`` is the previous layer's output (input slot 0); ``froms`` are the outputs of the ``from=``
layers in cfg order (input slots 1..n). Darknet's sign convention is kept throughout: a *delta* is the negative
gradient of the loss, and ``weight_updates`` accumulate negative gradients that the update adds to the weights.

Every function is pure: it returns new arrays and never writes into its arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from darkspec.errors import DarkspecError
from darkspec.reference import activations
from darkspec.reference.contract import NORMALIZATION_EPS, RELU_FLOOR, library_of, relu_floor_of, require_pass
from darkspec.reference.dialects import Dialect, Quirk, parse_dialect, parse_quirks


class WeightsType(str, enum.Enum):
    NONE = "none"
    PER_FEATURE = "per_feature"
    PER_CHANNEL = "per_channel"


class Normalization(str, enum.Enum):
    NONE = "none"
    RELU = "relu"
    SOFTMAX = "softmax"


@dataclass(frozen=True)
class ShortcutParams:
    """The typed settings of one ``[shortcut]`` section that the math depends on."""

    weights_type: WeightsType = WeightsType.NONE
    weights_normalization: Normalization = Normalization.NONE
    activation: str = "linear"
    #: pjreddie only: scale of the previous layer's output and of the from layer's output.
    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "weights_type", _enum_value(WeightsType, "weights_type", self.weights_type))
        object.__setattr__(
            self,
            "weights_normalization",
            _enum_value(Normalization, "weights_normalization", self.weights_normalization),
        )


@dataclass(frozen=True)
class ShortcutGradients:
    """What backward produces.

    ``delta`` is the layer's delta after Darknet multiplied it by the activation's gradient. ``input_deltas[i]`` is
    what backward adds into input slot i's delta (slot 0 is the previous layer); Darknet adds, it never overwrites.
    ``weight_updates`` is the accumulator after backward (``None`` without weights).
    """

    delta: np.ndarray
    input_deltas: list[np.ndarray]
    weight_updates: np.ndarray | None


@dataclass(frozen=True)
class UpdateParams:
    """The settings of one update step (``[net]`` and per-layer keys)."""

    learning_rate: float
    momentum: float
    decay: float
    batch: int
    learning_rate_scale: float = 1.0
    # darknet-gpu only:
    loss_scale: float = 1.0
    iteration: int = 1
    burn_in: int = 0
    burnin_update: int = 0
    dont_update: int = 0
    train_only_bn: bool = False


def _enum_value(enum_type, setting, value):
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise DarkspecError(setting, value, allowed, code=f"unknown-{setting.replace('_', '-')}") from None


# --- weights: count, layout, initial values ------------------------------------------------------------------


def weights_per_input(weights_type: WeightsType, channels: int) -> int:
    """How many weights each input slot has: 0 (none), 1 (per_feature) or C (per_channel)."""
    return {WeightsType.NONE: 0, WeightsType.PER_FEATURE: 1, WeightsType.PER_CHANNEL: channels}[weights_type]


def weight_count(weights_type: WeightsType, n_from: int, channels: int) -> int:
    """``nweights``: (n+1) slots times 0, 1 or C."""
    return (n_from + 1) * weights_per_input(WeightsType(weights_type), channels)


def initial_weights(weights_type: WeightsType, n_from: int, channels: int, dtype=np.float32) -> np.ndarray:
    """Darknet starts every weight at exactly 1."""
    return np.ones(weight_count(weights_type, n_from, channels), dtype=dtype)


def _weights_table(weights: np.ndarray, n_from: int) -> np.ndarray:
    """The flat weights as a table ``[slot, k]``: flat index ``slot * L + k`` with L = 1 or C."""
    return weights.reshape(n_from + 1, -1)


# --- normalization --------------------------------------------------------------------------------------------


def normalization_phi(table: np.ndarray, normalization: Normalization, relu_floor: float | None) -> np.ndarray:
    """``phi`` of a ``[slot, k]`` table in its dtype: exp(w - max_i w) for softmax, relu(w) for relu, or
    max(w, relu_floor) where the floor applies."""
    dtype = table.dtype
    if normalization == Normalization.SOFTMAX:
        return np.exp((table - table.max(axis=0)).astype(np.float64)).astype(dtype)
    if relu_floor is None:
        return np.where(table > 0, table, dtype.type(0))
    floor = dtype.type(relu_floor)
    return np.where(table > floor, table, floor)


def normalization_total(phi: np.ndarray) -> np.ndarray:
    """``eps + phi_0 + phi_1 + ... + phi_n`` per k, summed left to right in phi's dtype, as Darknet sums."""
    total = np.full(phi.shape[1], NORMALIZATION_EPS, dtype=phi.dtype)
    for row in phi:
        total = total + row
    return total


def normalize_weights(table: np.ndarray, normalization: Normalization, *, relu_floor: float | None) -> np.ndarray:
    """The normalized weights ``what[slot, k] = phi / (eps + phi_0 + ... + phi_n)`` of a ``[slot, k]`` table, as
    Darknet computes them. The eps is added after the max subtraction, so softmax is not exactly shift-invariant.
    """
    if normalization == Normalization.NONE:
        return table.copy()
    phi = normalization_phi(table, normalization, relu_floor)
    return phi / normalization_total(phi)


def fold_weights(weights: np.ndarray, params: ShortcutParams, n_from: int) -> np.ndarray:
    """Inference-time folding: the raw weights replaced by their normalized values (with the 0.001 floor).

    After folding the layer behaves as ``weights_normalization=none`` with these weights.
    """
    table = _weights_table(np.asarray(weights), n_from)
    return normalize_weights(table, params.weights_normalization, relu_floor=RELU_FLOOR).reshape(-1)


# --- checks shared by every pass ------------------------------------------------------------------------------


def check_inputs(x, froms, weights, params: ShortcutParams, dialect: Dialect):
    """The refusals of the inputs (spec/shortcut.md#errors), shared by every implementation so that each refuses with
    the same code; returns (x, froms, weights) as arrays, weights None without weights."""
    x = np.asarray(x)
    froms = [np.asarray(f) for f in froms]
    if x.ndim != 4 or min(x.shape) < 1:
        raise DarkspecError("x.shape", x.shape, "an NCHW array (4 dimensions, each at least 1: a Darknet layer is "
                            "never empty)", code="bad-shape")
    if x.dtype not in (np.float32, np.float64):
        raise DarkspecError("x.dtype", str(x.dtype), "float32, float64", code="bad-dtype")
    batch, channels, height, width = x.shape
    for i, f in enumerate(froms):
        if f.ndim != 4 or f.shape[0] != batch or min(f.shape) < 1:
            raise DarkspecError(
                f"froms[{i}].shape", f.shape, f"an NCHW array with batch {batch}, like x", code="bad-shape"
            )
        if f.dtype != x.dtype:
            raise DarkspecError(f"froms[{i}].dtype", str(f.dtype), f"{x.dtype}, the dtype of x", code="bad-dtype")
        if dialect != Dialect.PJREDDIE and f.shape[2:] != x.shape[2:]:
            raise DarkspecError(
                f"froms[{i}] spatial size",
                f.shape[2:],
                f"{x.shape[2:]}, the previous layer's (only the pjreddie dialect resamples)",
                code="spatial-mismatch",
            )
    expected = weight_count(params.weights_type, len(froms), channels)
    if expected == 0:
        if weights is not None and np.asarray(weights).size:
            raise DarkspecError(
                "weights", f"{np.asarray(weights).size} values", "none with weights_type=none", code="weights-size"
            )
        return x, froms, None
    if weights is None:
        raise DarkspecError("weights", None, f"{expected} values for weights_type={params.weights_type.value}",
                            code="weights-size")
    weights = np.asarray(weights)
    if weights.shape != (expected,):
        raise DarkspecError(
            "weights.shape",
            weights.shape,
            f"({expected},): (n+1)={len(froms) + 1} slots x {expected // (len(froms) + 1)}",
            code="weights-size",
        )
    if weights.dtype != x.dtype:
        raise DarkspecError("weights.dtype", str(weights.dtype), f"{x.dtype}, the dtype of x", code="bad-dtype")
    if not np.all(np.isfinite(weights)):
        raise DarkspecError("weights", "non-finite values", "finite numbers", code="weights-not-finite")
    return x, froms, weights


def check_call(pass_: str, x, froms, weights, params: ShortcutParams, dialect, quirks):
    """Every refusal of a [shortcut] forward or backward before anything is computed, shared by every
    implementation: the pass, the inputs, the activation and pjreddie's rules. Returns (x, froms, weights, dialect,
    quirks) as arrays, Dialect and the quirks that apply (a backward also checks its own inputs:
    ``check_backward_inputs``)."""
    dialect = parse_dialect(dialect)
    require_pass("shortcut", dialect, pass_)
    quirks = cpu_quirks(parse_quirks(quirks), dialect)
    x, froms, weights = check_inputs(x, froms, weights, params, dialect)
    check_activation(params, dialect, quirks)
    if dialect == Dialect.PJREDDIE:
        check_pjreddie(froms, weights)
        pjreddie_index_map(froms[0].shape, x.shape)
    return x, froms, weights, dialect, quirks


def check_backward_inputs(x, weights, delta, weight_updates):
    """The refusals a backward adds to check_inputs' (on its results): a delta like x, and a weight-update
    accumulator (if given) like the weights; returns (delta, weight_updates) as arrays."""
    delta = np.asarray(delta)
    if delta.shape != x.shape or delta.dtype != x.dtype:
        raise DarkspecError(
            "delta", f"{delta.dtype}{list(delta.shape)}", f"{x.dtype}{list(x.shape)}, like x", code="bad-shape"
        )
    if weight_updates is None or weights is None:
        return delta, None
    weight_updates = np.asarray(weight_updates)
    if weight_updates.shape != weights.shape or weight_updates.dtype != weights.dtype:
        raise DarkspecError("weight_updates", f"{weight_updates.dtype}{list(weight_updates.shape)}",
                            f"{weights.dtype}{list(weights.shape)}, like weights", code="bad-shape")
    return delta, weight_updates


def check_activation(params: ShortcutParams, dialect: Dialect, quirks) -> None:
    """Refuse an activation the dialect's Darknet lacks, or one [shortcut] does not evaluate (unless a quirk asks)."""
    activations.check_name(params.activation, library_of(dialect))
    if params.activation in activations.SHORTCUT_UNEVALUATED and Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS not in quirks:
        raise DarkspecError(
            "activation",
            params.activation,
            "an activation that [shortcut] evaluates (Darknet's [shortcut] outputs 0 for this one; "
            f"enable the quirk {Quirk.SHORTCUT_UNEVALUATED_ACTIVATIONS.value} to reproduce that)",
            code="activation-not-evaluated",
        )


# --- the weighted sum and its PRN rule --------------------------------------------------------------------------


def _flat(a: np.ndarray) -> np.ndarray:
    """A per-sample flat view ``[b, s]`` with s = c*H*W + y*W + x."""
    return a.reshape(a.shape[0], -1)


def prn_overlap(output_size: int, input_size: int) -> int:
    """The PRN rule: input element s (flat, per sample) meets output element s for s < min(S, A), nowhere else.

    With equal spatial sizes this is "the first min(C_out, C_in) channels".
    """
    return min(output_size, input_size)


def _slot_weights(what: np.ndarray, slot: int, sample_size: int) -> np.ndarray:
    """The normalized weight of every flat output position s for one input slot (k = s // (S / L))."""
    per_input = what.shape[1]
    return np.repeat(what[slot], sample_size // per_input)


def _normalized(weights, params, n_from, dialect):
    """The ``[slot, k]`` table of weights the sum multiplies by, or None without weights."""
    if weights is None:
        return None
    if dialect == Dialect.DARKNET_INFERENCE:
        return _weights_table(fold_weights(weights, params, n_from), n_from)
    return normalize_weights(_weights_table(weights, n_from), params.weights_normalization,
                             relu_floor=relu_floor_of(dialect))


def _weighted_sum(x, froms, what, quirks, from_input_shapes):
    """out[b, s] = x[b, s] * what_0(s) + sum over i with s < A_i of from_i[b, s] * what_{i+1}(s), left to right."""
    flat_x = _flat(x)
    sample_size = flat_x.shape[1]
    if (
        Quirk.CPU_FASTPATH_INPUT_DIMS in quirks
        and what is None
        and len(froms) == 1
        and from_input_shapes is not None
        and tuple(from_input_shapes[0]) == x.shape[1:]
    ):
        return _fastpath_sum(x, froms[0])
    out = flat_x * _slot_weights(what, 0, sample_size) if what is not None else flat_x.copy()
    scratch = np.empty_like(out)  # each product rounded into it, then added: no temporaries per input
    for i, add in enumerate(froms):
        flat_add = _flat(add)
        m = prn_overlap(sample_size, flat_add.shape[1])
        term = flat_add[:, :m] if what is None else np.multiply(
            flat_add[:, :m], _slot_weights(what, i + 1, sample_size)[:m], out=scratch[:, :m])
        out[:, :m] += term
    return out.reshape(x.shape)


def _fastpath_sum(x, add):
    """Quirk cpu-fastpath-input-dims: out[j] = x[j] + add[j] over the whole batch, flat, with no PRN test.

    Positions past the end of ``add``'s buffer read memory Darknet does not own: they are NaN here (undefined).
    """
    flat_x = x.reshape(-1)
    flat_add = add.reshape(-1)
    out = np.full_like(flat_x, np.nan)
    m = min(flat_x.size, flat_add.size)
    out[:m] = flat_x[:m] + flat_add[:m]
    return out.reshape(x.shape)


def cpu_quirks(quirks, dialect):
    """The quirks of Darknet's CPU code do not exist on its GPU path."""
    cpu_only = {Quirk.CPU_FASTPATH_INPUT_DIMS, Quirk.CPU_RELU6_ZERO}
    return quirks - cpu_only if parse_dialect(dialect) == Dialect.DARKNET_GPU else quirks


def _zeroed_by_quirk(params, quirks) -> bool:
    """Darknet's [shortcut] outputs 0 for this activation (allowed only under the quirk that asks for it)."""
    name = params.activation
    return name in activations.SHORTCUT_UNEVALUATED or (name == "relu6" and Quirk.CPU_RELU6_ZERO in quirks)


def _activate(pre, params, dialect, quirks):
    if _zeroed_by_quirk(params, quirks):
        return np.zeros_like(pre)
    return activations.activate(params.activation, pre, library_of(dialect))


def activation_factor(pre, out, params, dialect, quirks):
    name = params.activation
    if dialect == Dialect.EXACT:
        # the derivative of what the forward computed: 0 where a quirk made the forward 0
        return np.zeros_like(pre) if _zeroed_by_quirk(params, quirks) else activations.derivative(name, pre)
    if name in activations.GRADIENT_ABORTS:
        raise DarkspecError(
            "activation",
            name,
            "an activation with a gradient (Darknet's backward aborts with an error for this one)",
            code="activation-gradient-aborts",
        )
    if name in activations.SHORTCUT_UNEVALUATED:
        return np.zeros_like(out)  # [shortcut]'s gradient() has no case for it either
    return activations.darknet_gradient(name, out, pre, gpu=dialect == Dialect.DARKNET_GPU)


# --- forward ----------------------------------------------------------------------------------------------------


def forward(
    x,
    froms: Sequence,
    weights=None,
    params: ShortcutParams = ShortcutParams(),
    dialect: Dialect | str = Dialect.DARKNET_CPU,
    quirks=frozenset(),
    from_input_shapes=None,
) -> np.ndarray:
    """The layer's output: the activation of the weighted sum of all inputs (spec/shortcut.md#forward).

    ``from_input_shapes`` (the from layers' own *input* C, H, W) matters only under the quirk
    cpu-fastpath-input-dims.
    """
    x, froms, weights, dialect, quirks = check_call("forward", x, froms, weights, params, dialect, quirks)
    if dialect == Dialect.PJREDDIE:
        return _activate(_pjreddie_sum(x, froms, weights, params), params, dialect, quirks)
    what = _normalized(weights, params, len(froms), dialect)
    pre = _weighted_sum(x, froms, what, quirks, from_input_shapes)
    return _activate(pre, params, dialect, quirks)


# --- backward ---------------------------------------------------------------------------------------------------


def backward(
    x,
    froms: Sequence,
    weights,
    delta,
    params: ShortcutParams = ShortcutParams(),
    dialect: Dialect | str = Dialect.DARKNET_CPU,
    quirks=frozenset(),
    weight_updates=None,
    from_input_shapes=None,
) -> ShortcutGradients:
    """Deltas to every input and the weight-update accumulator (spec/shortcut.md#backward).

    ``delta`` is the delta arriving at the layer's output; ``weight_updates`` the accumulator before backward
    (zeros if not given). The forward is recomputed from the inputs, so no state is carried between passes.
    """
    x, froms, weights, dialect, quirks = check_call("backward", x, froms, weights, params, dialect, quirks)
    delta, weight_updates = check_backward_inputs(x, weights, delta, weight_updates)
    if dialect == Dialect.PJREDDIE:
        return _pjreddie_backward(x, froms, weights, delta, params, quirks)

    what = _normalized(weights, params, len(froms), dialect)
    pre = _weighted_sum(x, froms, what, quirks, from_input_shapes)
    out = _activate(pre, params, dialect, quirks)
    d = delta * activation_factor(pre, out, params, dialect, quirks)

    inputs = [x, *froms]
    input_deltas = [_input_delta(d, inputs[slot], what, slot) for slot in range(len(inputs))]
    new_updates = None
    if what is not None:
        table = _weights_table(weights, len(froms))
        if weight_updates is None:
            weight_updates = np.zeros_like(weights)
        init = _weights_table(np.asarray(weight_updates, dtype=weights.dtype), len(froms))
        new_updates = _accumulate_weight_updates(d, inputs, table, what, init, params, dialect).reshape(-1)
    return ShortcutGradients(delta=d, input_deltas=input_deltas, weight_updates=new_updates)


def _input_delta(d, source, what, slot):
    """What backward adds into one input's delta: d * what_slot(s) where s < min(S, A), the PRN rule's adjoint."""
    flat_d = _flat(d)
    sample_size = flat_d.shape[1]
    contribution = np.zeros((source.shape[0], source[0].size), dtype=d.dtype)
    m = prn_overlap(sample_size, contribution.shape[1])
    scale = 1 if what is None else _slot_weights(what, slot, sample_size)[:m]
    contribution[:, :m] = flat_d[:, :m] * scale
    return contribution.reshape(source.shape)


def _slot_terms(d, inputs, slot_count):
    """d[b, s] * input_slot[b, s] per slot, zero where the PRN rule gives no contribution: shape [slot, b, s]."""
    flat_d = _flat(d)
    terms = np.zeros((slot_count, *flat_d.shape), dtype=d.dtype)
    for slot, source in enumerate(inputs):
        flat_source = _flat(source)
        m = prn_overlap(flat_d.shape[1], flat_source.shape[1])
        terms[slot, :, :m] = flat_d[:, :m] * flat_source[:, :m]
    return terms


def _per_weight(terms, per_input):
    """Regroup ``[slot, b, s]`` terms as ``[slot, k, j]``, j running over the terms of weight k in Darknet's order
    (sample by sample, then position)."""
    slots, batch, size = terms.shape
    grouped = terms.reshape(slots, batch, per_input, size // per_input).transpose(0, 2, 1, 3)
    return grouped.reshape(slots, per_input, -1)


def _accumulate_weight_updates(d, inputs, table, what, init, params, dialect):
    terms = _slot_terms(d, inputs, table.shape[0])
    if dialect == Dialect.DARKNET_CPU:
        # The CPU adds delta*input (the gradient w.r.t. the *normalized* weight) one element at a time, in order.
        grouped = _per_weight(terms, table.shape[1])
        sequence = np.concatenate([init[..., None], grouped], axis=-1)
        return np.cumsum(sequence, axis=-1, dtype=d.dtype)[..., -1]
    if dialect == Dialect.DARKNET_GPU:
        return init + _gpu_weight_gradient(terms, what, params)
    return init + _exact_weight_gradient(terms, table, what, params).astype(d.dtype)


def _gpu_weight_gradient(terms, what, params):
    """The GPU surrogate: delta*input times what (relu) or what*(1 - what) (softmax), non-finite terms dropped.

    The GPU sums in no fixed order; the reference sums exactly (in float64) and rounds once.
    """
    if params.weights_normalization == Normalization.RELU:
        factor = what
    elif params.weights_normalization == Normalization.SOFTMAX:
        factor = what * (1 - what)
    else:
        factor = np.ones_like(what)
    per_input = what.shape[1]
    grouped = _per_weight(terms, per_input) * factor[..., None]
    grouped = np.where(np.isfinite(grouped), grouped, 0)
    return grouped.astype(np.float64).sum(axis=-1).astype(terms.dtype)


def _exact_weight_gradient(terms, table, what, params):
    """The true derivative of sum(delta * pre-activation) w.r.t. the raw weights, in float64."""
    g = _per_weight(terms, table.shape[1]).astype(np.float64).sum(axis=-1)  # w.r.t. the normalized weights
    w = table.astype(np.float64)
    what = what.astype(np.float64)
    normalization = params.weights_normalization
    if normalization == Normalization.NONE:
        return g
    total = normalization_total(normalization_phi(w, normalization, None))
    mixed = (g * what).sum(axis=0)
    if normalization == Normalization.RELU:
        return (w > 0) / total * (g - mixed)
    # softmax with max subtraction: the eps term makes the first argmax (Darknet's m) carry an extra term.
    argmax = (np.arange(w.shape[0])[:, None] == w.argmax(axis=0)[None, :])
    return what * (g - mixed) - argmax * mixed * NORMALIZATION_EPS / total


# --- update -----------------------------------------------------------------------------------------------------


def check_update_inputs(weights, weight_updates, hyper: UpdateParams,
                        dialect) -> tuple[np.ndarray, np.ndarray, Dialect]:
    """The refusals of an update step, for every implementation: returns (weights, weight_updates, dialect)."""
    dialect = parse_dialect(dialect)
    weights = np.asarray(weights)
    weight_updates = np.asarray(weight_updates)
    if weight_updates.shape != weights.shape or weight_updates.dtype != weights.dtype:
        raise DarkspecError(
            "weight_updates", f"{weight_updates.dtype}{list(weight_updates.shape)}",
            f"{weights.dtype}{list(weights.shape)}, like weights", code="bad-shape",
        )
    if weights.dtype not in (np.float32, np.float64):
        raise DarkspecError("weights.dtype", str(weights.dtype), "float32, float64", code="bad-dtype")
    if hyper.batch < 1:
        raise DarkspecError("batch", hyper.batch, "an integer >= 1", code="bad-batch")
    require_pass("shortcut", dialect, "update")
    return weights, weight_updates, dialect


@dataclass(frozen=True)
class UpdateStep:
    """The scalars of one update step, rounded in the weights' dtype: ``weight_updates += decay * weights`` (the
    CPU rule), on the GPU non-finite updates become 0, non-finite weights 1/(i+1) and updates are clipped to ±1
    (``repair_and_clip``), then ``weights += rate * weight_updates`` and ``weight_updates *= momentum``."""

    decay: np.floating
    rate: np.floating
    momentum: np.floating
    repair_and_clip: bool


def update_step(hyper: UpdateParams, dialect: Dialect, t) -> UpdateStep | None:
    """The step the dialect takes (``t``: the dtype's scalar type), or None where the GPU skips the update."""
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf propagate as Darknet lets them
        if dialect == Dialect.DARKNET_GPU:
            if not gpu_updates_now(hyper):
                return None
            rate = t(hyper.learning_rate) * t(hyper.learning_rate_scale) / t(hyper.loss_scale)
            return UpdateStep(t(0), rate / t(hyper.batch), t(hyper.momentum), repair_and_clip=True)
        rate = t(hyper.learning_rate) * t(hyper.learning_rate_scale)
        return UpdateStep(-t(hyper.decay) * t(hyper.batch), rate / t(hyper.batch), t(hyper.momentum),
                          repair_and_clip=False)


def update(weights, weight_updates, hyper: UpdateParams, dialect: Dialect | str = Dialect.DARKNET_CPU):
    """One update step: returns (new weights, new weight_updates) (spec/shortcut.md#update)."""
    weights, weight_updates, dialect = check_update_inputs(weights, weight_updates, hyper, dialect)
    t = weights.dtype.type
    step = update_step(hyper, dialect, t)
    if step is None:
        return weights.copy(), weight_updates.copy()
    with np.errstate(invalid="ignore", over="ignore"):
        if step.repair_and_clip:
            weight_updates = np.where(np.isfinite(weight_updates), weight_updates, t(0))
            weights = np.where(np.isfinite(weights), weights, gpu_weight_repair(weights.size, weights.dtype)
                               .reshape(weights.shape))
            weight_updates = np.clip(weight_updates, t(-1), t(1))
        else:
            weight_updates = weight_updates + step.decay * weights
        weights = weights + step.rate * weight_updates
        return weights, weight_updates * step.momentum


def gpu_weight_repair(count: int, dtype) -> np.ndarray:
    """The value the GPU update writes over a non-finite weight i: 1/(i+1)."""
    t = np.dtype(dtype).type
    return t(1) / (np.arange(count, dtype=dtype) + t(1))


def gpu_updates_now(hyper: UpdateParams) -> bool:
    """The GPU skips the whole update during burn-in, for train_only_bn, and until dont_update has passed."""
    if hyper.burnin_update and hyper.burnin_update * hyper.burn_in > hyper.iteration:
        return False
    return not hyper.train_only_bn and hyper.dont_update < hyper.iteration


# --- pjreddie's two-input shortcut ------------------------------------------------------------------------------


def pjreddie_index_map(source_shape, dest_shape):
    """pjreddie's spatial rule: (source slices, destination slices) of the element pairs that meet.

    stride = W_src // W_dst and sample = W_dst // W_src (each at least 1); for channels k < min(C), rows
    j < min(H) and columns i < min(W), source (k, j*stride, i*stride) meets destination (k, j*sample, i*sample).
    Darknet asserts that the height ratios equal the width ratios.
    """
    _, c1, h1, w1 = source_shape
    _, c2, h2, w2 = dest_shape
    stride, sample = w1 // w2, w2 // w1
    if stride != h1 // h2 or sample != h2 // h1:
        raise DarkspecError(
            "from spatial size", (h1, w1), f"one whose height and width ratios to {(h2, w2)} are equal "
            "(pjreddie asserts this)", code="pjreddie-spatial-ratio",
        )
    stride, sample = max(stride, 1), max(sample, 1)
    c, h, w = min(c1, c2), min(h1, h2), min(w1, w2)
    source = (slice(None), slice(0, c), slice(0, h * stride, stride), slice(0, w * stride, stride))
    dest = (slice(None), slice(0, c), slice(0, h * sample, sample), slice(0, w * sample, sample))
    return source, dest


def check_pjreddie(froms, weights):
    """pjreddie's shortcut takes exactly one from layer and no weights."""
    if len(froms) != 1:
        raise DarkspecError("from", f"{len(froms)} layers", "exactly one layer in the pjreddie dialect",
                            code="pjreddie-single-from")
    if weights is not None:
        raise DarkspecError("weights_type", "weighted", "none in the pjreddie dialect", code="pjreddie-no-weights")


def _pjreddie_sum(x, froms, weights, params):
    """out = x, then out[dest] = alpha * out[dest] + beta * from[source] where the two meet."""
    check_pjreddie(froms, weights)
    t = x.dtype.type
    source, dest = pjreddie_index_map(froms[0].shape, x.shape)
    out = x.copy()
    out[dest] = t(params.alpha) * out[dest] + t(params.beta) * froms[0][source]
    return out


def _pjreddie_backward(x, froms, weights, delta, params, quirks):
    """The previous layer gets alpha * delta everywhere (even where the forward did not scale by alpha); the from
    layer gets beta * delta where the two met."""
    pre = _pjreddie_sum(x, froms, weights, params)  # refuses what the forward refuses
    out = _activate(pre, params, Dialect.PJREDDIE, quirks)
    d = delta * activation_factor(pre, out, params, Dialect.PJREDDIE, quirks)
    t = x.dtype.type
    source, dest = pjreddie_index_map(froms[0].shape, x.shape)
    from_delta = np.zeros_like(froms[0])
    from_delta[source] = t(params.beta) * d[dest]
    return ShortcutGradients(delta=d, input_deltas=[t(params.alpha) * d, from_delta], weight_updates=None)
