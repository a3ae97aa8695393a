"""PyTorch implementation: ``nn.Module``s for real models, and the ``torch`` backend that checks them.

- :class:`WeightedShortcut`, :class:`Reorg3d`, :class:`ReorgOld` are drop-in modules. The shortcut's weights are
  one ``nn.Parameter`` in Darknet's flat layout (slot-major: ``weights[slot * L + k]``).
- ``dialect="exact"`` is plain autograd. The Darknet dialects run through :class:`DarknetShortcutFunction`, whose
  backward reproduces Darknet's activation gradients and its surrogate weight gradient (spec/shortcut.md).
- :func:`darknet_update_` is Darknet's update rule for a training loop.
- The forward and the Darknet dialects' backward run block by block over channel planes (:func:`blocks`): each
  block of the output stays in the cache while every input's block is added into it and the activation runs on it
  in place, so each input is read once and the output written once, with no full-size temporary; the backward
  reads the output's gradient once, writes each input's gradient once and sums delta*input per plane in the
  input's dtype (the CPU dialect) in a fixed order. The PRN rule is a slice of views.
- The reorg modules are reshape/permute/reshape of the flat buffer (no index is built).

Sign convention: PyTorch gradients are dL/d(.), Darknet deltas are -dL/d(.); the modules speak PyTorch, the
backend class converts at the NumPy boundary.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np
import torch

from darkspec.backends.base import REORG_DIALECT, Backend, Prepared, capability_grid
from darkspec.errors import DarkspecError
from darkspec.reference import reorg as reorg_reference
from darkspec.reference.contract import NORMALIZATION_EPS, relu_floor_of, require_pass
from darkspec.reference.dialects import Dialect, parse_dialect
from darkspec.reference.shortcut import (
    Normalization,
    ShortcutGradients,
    ShortcutParams,
    UpdateParams,
    check_activation,
    check_backward_inputs,
    check_call,
    check_update_inputs,
    pjreddie_index_map,
    update_step,
    weight_count,
)

# --- activations: forward, Darknet's gradient factor (of y and x) -------------------------------------------------

_SELU_LAMBDA, _SELU_ALPHA = 1.0507, 1.6732
_GELU_A, _GELU_B, _GELU_GRAD_B, _GELU_GRAD_C1, _GELU_GRAD_C3 = 0.797885, 0.035677, 0.0356774, 0.398942, 0.0535161


def _kept(x, inside, clamped):
    """x where ``inside``, else ``clamped`` with no gradient: derivative 1 inside, 0 on the flat parts and kinks."""
    return torch.where(inside, x, clamped.detach())


def _stair(x):
    n, half = torch.floor(x), torch.floor(x / 2)
    return torch.where((torch.remainder(n, 2) != 0) & (x != n), (x - n) + half, half)


def _in_double(expression):
    """The expression evaluated in double, then rounded to the tensor's dtype; autograd's derivative through it is
    then a double one, rounded once, as the reference's."""
    return lambda x: expression(x.double()).to(x.dtype)


#: gelu, swish and mish in double: their float32 autograd derivative takes 1 - sigmoid near 1 and multiplies its
#: rounding error by up to x (~34 at x = 5 for gelu), far beyond 4·ε·M of the exact dialect's backward.
FORWARD = {
    "linear": lambda x: x,
    "leaky": lambda x: torch.where(x > 0, x, 0.1 * x),
    "revleaky": lambda x: torch.where(x > 0, x, 0.1 * x),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu6": lambda x: _kept(x, (x > 0) & (x < 6), torch.clamp(x, 0, 6)),
    "logistic": torch.sigmoid,
    "loggy": lambda x: torch.tanh(x / 2),
    "tanh": torch.tanh,
    "elu": lambda x: torch.where(x >= 0, x, torch.expm1(torch.clamp(x, max=0))),
    "selu": lambda x: torch.where(x >= 0, _SELU_LAMBDA * x,
                                  _SELU_LAMBDA * _SELU_ALPHA * torch.expm1(torch.clamp(x, max=0))),
    "gelu": _in_double(lambda x: x * torch.sigmoid(2 * (_GELU_A * x + _GELU_B * x ** 3))),
    "relie": lambda x: torch.where(x > 0, x, 0.01 * x),
    "ramp": lambda x: torch.where(x > 0, x, torch.zeros_like(x)) + 0.1 * x,
    "plse": lambda x: torch.where(x < -4, 0.01 * (x + 4), torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5)),
    "hardtan": lambda x: _kept(x, (x > -1) & (x < 1), torch.clamp(x, -1, 1)),
    "lhtan": lambda x: torch.where((x > 0) & (x < 1), x, torch.where(x <= 0, 0.001 * x, 0.001 * (x - 1) + 1)),
    "stair": _stair,
    "swish": _in_double(lambda x: x * torch.sigmoid(x)),
    "mish": _in_double(lambda x: x * torch.tanh(torch.logaddexp(x, torch.zeros_like(x)))),
}


#: pjreddie's own double-precision expressions (spec/activations.md), whose cancellation near 0 shows in its results.
PJREDDIE_FORWARD = {
    **FORWARD,
    "loggy": _in_double(lambda x: 2 / (1 + torch.exp(-x)) - 1),
    "tanh": _in_double(lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1)),
}


def forward_of(name: str, dialect: Dialect):
    """The activation's forward as the dialect's Darknet computes it."""
    return (PJREDDIE_FORWARD if dialect == Dialect.PJREDDIE else FORWARD)[name]


def _mish_factor(y, x):
    softplus = torch.logaddexp(x, torch.zeros_like(x))
    t = torch.tanh(softplus)
    return t + x * torch.sigmoid(x) * (1 - t * t)


def _gelu_factor(y, x):
    # Darknet's input-derivative formula evaluated on the output y: not the derivative (spec/activations.md).
    v = _GELU_GRAD_B * y ** 3 + _GELU_A * y
    sech = 1 / torch.cosh(v)
    return 0.5 * torch.tanh(v) + (_GELU_GRAD_C3 * y ** 3 + _GELU_GRAD_C1 * y) * sech * sech + 0.5


def _step(condition, where_true, where_false):
    return lambda y, x: torch.where(condition(y), torch.full_like(y, where_true), torch.full_like(y, where_false))


DARKNET_FACTOR = {
    "linear": lambda y, x: torch.ones_like(y),
    "leaky": _step(lambda y: y > 0, 1.0, 0.1),
    "revleaky": _step(lambda y: y > 0, 1.0, 0.1),
    "relu": _step(lambda y: y > 0, 1.0, 0.0),
    "relu6": _step(lambda y: (y > 0) & (y < 6), 1.0, 0.0),
    "logistic": lambda y, x: (1 - y) * y,
    "loggy": lambda y, x: 2 * (1 - (y + 1) / 2) * ((y + 1) / 2),
    "tanh": lambda y, x: 1 - y * y,
    "elu": lambda y, x: torch.where(y >= 0, torch.ones_like(y), y + 1),
    "selu": lambda y, x: torch.where(y >= 0, torch.full_like(y, _SELU_LAMBDA), y + _SELU_LAMBDA * _SELU_ALPHA),
    "gelu": _gelu_factor,
    "relie": _step(lambda y: y > 0, 1.0, 0.01),
    "ramp": _step(lambda y: y > 0, 1.1, 0.1),
    "plse": _step(lambda y: (y < 0) | (y > 1), 0.01, 0.125),
    "hardtan": _step(lambda y: (y > -1) & (y < 1), 1.0, 0.0),
    "lhtan": _step(lambda y: (y > 0) & (y < 1), 1.0, 0.001),
    "stair": _step(lambda y: torch.floor(y) == y, 0.0, 1.0),
    "swish": lambda y, x: y + torch.sigmoid(x) * (1 - y),
    "mish": _mish_factor,
}
#: In-place forms with the same bits as FORWARD (tests/test_torch.py checks each): the blocked passes apply them to a
#: block of the output while it is in the cache. The others run FORWARD on the block and copy it back.
FORWARD_INPLACE = {
    "linear": lambda x: x,
    "leaky": lambda x: torch.nn.functional.leaky_relu_(x, 0.1),
    "revleaky": lambda x: torch.nn.functional.leaky_relu_(x, 0.1),
    "relie": lambda x: torch.nn.functional.leaky_relu_(x, 0.01),
    # x > 0 ? x : 0, NaN included (threshold_ keeps NaN: the second pass, in the cache, zeroes it)
    "relu": lambda x: torch.threshold_(x, 0.0, 0.0).nan_to_num_(0.0, math.inf, -math.inf),
    "logistic": torch.sigmoid_,
    "tanh": torch.tanh_,
}


def in_place_of(name: str, dialect: Dialect):
    """The activation applied in place, as the dialect's Darknet computes it."""
    forward = forward_of(name, dialect)
    if forward is FORWARD[name] and name in FORWARD_INPLACE:
        return FORWARD_INPLACE[name]
    return lambda block: block.copy_(forward(block))


#: The GPU kernel divides revleaky's delta by leaky's factor instead of multiplying.
GPU_DARKNET_FACTOR = {**DARKNET_FACTOR, "revleaky": _step(lambda y: y > 0, 1.0, 10.0)}


# --- weights: normalization and the surrogate gradients -------------------------------------------------------------


def normalized_weights(table: torch.Tensor, normalization: Normalization, relu_floor: float | None) -> torch.Tensor:
    """``what[slot, k]``: phi / (eps + phi_0 + ... + phi_n), summed left to right (spec/shortcut.md#normalization).

    Differentiable: autograd through it is the ``exact`` dialect's weight gradient.
    """
    if normalization == Normalization.NONE:
        return table
    if normalization == Normalization.SOFTMAX:
        phi = torch.exp(table - table.max(dim=0).values)
    elif relu_floor is None:
        phi = torch.where(table > 0, table, torch.zeros_like(table))
    else:
        phi = torch.where(table > relu_floor, table, torch.full_like(table, relu_floor))
    total = torch.full_like(phi[0], NORMALIZATION_EPS)
    for row in phi:
        total = total + row
    return phi / total


def _surrogate_factor(what: torch.Tensor, normalization: Normalization, dialect: Dialect) -> torch.Tensor:
    """What Darknet multiplies delta*input by for each weight: 1 on the CPU, the diagonal term on the GPU."""
    if dialect != Dialect.DARKNET_GPU or normalization == Normalization.NONE:
        return torch.ones_like(what)
    return what if normalization == Normalization.RELU else what * (1 - what)


# --- the fused sum ----------------------------------------------------------------------------------------------------


def _per_element(what_row: torch.Tensor) -> torch.Tensor:
    """One slot's weights shaped to broadcast over NCHW: (1, L, 1, 1), L = 1 or C."""
    return what_row.reshape(1, -1, 1, 1)


def weighted_sum(x: torch.Tensor, froms, what: torch.Tensor | None, out: torch.Tensor | None = None):
    """x*what_0 + sum_i from_i*what_i, accumulated in place in one output (``out`` if given); a from input reaches
    the first min(C, C_i) channels (the PRN rule for equal spatial sizes) through slices of views, never padded
    copies. Differentiable (the ``exact`` dialect's autograd); :func:`fused_forward` computes the same bits."""
    channels = x.shape[1]
    if what is None and froms and froms[0].shape[1] >= channels:
        # the first full-width input in the same pass as the copy of x: one traversal less
        out = torch.add(x, froms[0][:, :channels], out=out) if out is not None else x + froms[0][:, :channels]
        froms = froms[1:]
    elif what is None:
        out = x.clone() if out is None else out.copy_(x)
    else:
        out = torch.mul(x, _per_element(what[0]), out=out) if out is not None else torch.mul(x, _per_element(what[0]))
    for slot, add in enumerate(froms, start=1):
        c = min(channels, add.shape[1])
        if what is None:
            out[:, :c].add_(add[:, :c])
        else:
            weight = _per_element(what[slot])
            out[:, :c].addcmul_(add[:, :c], weight if weight.shape[1] == 1 else weight[:, :c])
    return out


#: Elements per block of the blocked passes: an output block stays in the cache while every input's block is added
#: into it and the activation runs on it, so that the output is written to memory once and each input read once.
BLOCK_ELEMENTS = 1 << 20


def blocks(shape):
    """(batch slice, first channel, end channel) blocks of about BLOCK_ELEMENTS covering an NCHW tensor, in order:
    whole samples where they fit, else runs of channel planes of one sample."""
    batch, channels = shape[0], shape[1]
    plane = math.prod(shape[2:])
    sample = channels * plane
    if batch * sample <= BLOCK_ELEMENTS or plane == 0:
        return [(slice(None), 0, channels)]
    if sample <= BLOCK_ELEMENTS:
        step = BLOCK_ELEMENTS // sample
        return [(slice(n, n + step), 0, channels) for n in range(0, batch, step)]
    step = max(1, BLOCK_ELEMENTS // plane)
    return [(slice(n, n + 1), c, min(c + step, channels)) for n in range(batch) for c in range(0, channels, step)]


def fused_forward(x, froms, what, out, activate_, pre=None):
    """``out = act(weighted_sum(x, froms, what))`` block by block (the same bits as weighted_sum, then the activation):
    each input is read once and the output written once. With ``pre``, the pre-activation is written there too."""
    for batch, start, end in blocks(x.shape):
        target = (out if pre is None else pre)[batch, start:end]
        weighted_sum(x[batch, start:end], [f[batch, start:min(end, f.shape[1])] for f in froms if f.shape[1] > start],
                     None if what is None else _block_weights(what, froms, start, end), target)
        if pre is None:
            activate_(target)
        else:
            out[batch, start:end].copy_(target)
            activate_(out[batch, start:end])
    return out


def _block_weights(what, froms, start, end):
    """The weights table of the slots that reach channels [start, end) (slot 0 and every from wider than start)."""
    slots = [0] + [slot for slot, f in enumerate(froms, start=1) if f.shape[1] > start]
    return what[slots, start:end] if what.shape[1] > 1 else what[slots]


def _pjreddie_sum(x, add, alpha, beta):
    source, dest = pjreddie_index_map(tuple(add.shape), tuple(x.shape))
    out = x.clone()
    out[dest] = alpha * out[dest] + beta * add[source]
    return out


class DarknetShortcutFunction(torch.autograd.Function):
    """The Darknet dialects' forward and backward: Darknet's activation gradient and surrogate weight gradient.

    ``forward(ctx, settings, weights, x, *froms)``; ``settings`` is a :class:`_Settings`. It keeps the output for
    the activation's gradient, and the pre-activation only where that gradient needs it (mish, swish).
    """

    @staticmethod
    def forward(ctx, settings, weights, x, *froms):
        keep_pre = settings.params.activation in NEEDS_PRE_ACTIVATION or settings.dialect == Dialect.PJREDDIE
        out, pre = settings.forward(weights, x, froms, keep_pre=keep_pre)
        ctx.settings, ctx.kept_pre = settings, keep_pre
        empty = torch.empty(0)
        ctx.save_for_backward(weights if weights is not None else empty, x, pre if pre is not None else empty, out,
                              *froms)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        settings = ctx.settings
        weights, x, pre, out, *froms = ctx.saved_tensors
        pre = pre if ctx.kept_pre else None
        if settings.dialect == Dialect.PJREDDIE:
            g = grad_out * settings.activation_factor(out, pre)
            return (None, None, *_pjreddie_grads(g, x, froms[0], settings.params))
        what = settings.what(weights) if weights.numel() else None
        grads, table = fused_backward(grad_out, out, pre, [x, *froms], what, settings)
        weight_grad = None
        if what is not None:
            factor = _surrogate_factor(what, settings.params.weights_normalization, settings.dialect)
            per_weight = table.sum(dim=1) if what.shape[1] > 1 else table.sum(dim=(1, 2)).reshape(-1, 1)
            weight_grad = (per_weight.to(grad_out.dtype) * factor).reshape(-1)
        return (None, weight_grad, *grads)


#: Leaky-style steps (factor 1 where y > 0, else the slope): aten's leaky_relu_backward multiplies the same way.
SLOPE_OF_STEP = {"leaky": 0.1, "revleaky": 0.1, "relie": 0.01}
#: Activations whose Darknet gradient needs the pre-activation besides the output (DARKNET_FACTOR's x).
NEEDS_PRE_ACTIVATION = frozenset({"mish", "swish"})


def _pjreddie_grads(g, x, add, params):
    source, dest = pjreddie_index_map(tuple(add.shape), tuple(x.shape))
    grad_add = torch.zeros_like(add)
    grad_add[source] = params.beta * g[dest]
    return params.alpha * g, grad_add


def fused_backward(grad_out, out, pre, inputs, what, settings):
    """Every input's gradient and the per-plane sums of delta*input, block by block: the output's gradient (and the
    output, for the activation's gradient) read once, each input read once where there are weights, each input's
    gradient written once, no full-size temporary. Returns (gradients, table[slot, n, c] of plane sums or None).

    Without weights an input's gradient is the output's gradient after the activation's, zero past it (the PRN
    rule); full-width inputs share that one tensor, as autograd's own gradient of a sum does. The plane sums are
    reduced in the input's dtype on the CPU dialect, which adds the terms in the dtype (spec/shortcut.md), in float64
    on the GPU one, as the reference does; each plane is summed whole and the planes are added in a fixed order."""
    channels = grad_out.shape[1]
    linear = settings.params.activation == "linear"
    if what is None:
        g = grad_out if linear else _blockwise_factor(grad_out, out, pre, settings)
        return [g if s.shape[1] == channels else _prn_gradient(g, s) for s in inputs], None
    grads = [torch.empty_like(s) if s.shape[1] <= channels else torch.zeros_like(s) for s in inputs]
    accumulate = torch.float64 if settings.dialect == Dialect.DARKNET_GPU else grad_out.dtype
    table = torch.zeros((len(inputs), grad_out.shape[0], channels), dtype=accumulate, device=grad_out.device)
    for batch, start, end in blocks(grad_out.shape):
        g = grad_out[batch, start:end]
        if not linear:
            g = settings.times_factor(g, out[batch, start:end], None if pre is None else pre[batch, start:end])
        for slot, source in enumerate(inputs):
            stop = min(end, source.shape[1])
            if stop <= start:
                continue
            term, block = g[:, :stop - start], source[batch, start:stop]
            weight = what[slot].reshape(1, -1, 1, 1)
            grads[slot][batch, start:stop] = term * (weight if weight.shape[1] == 1 else weight[:, start:stop])
            table[slot, batch, start:stop] = (term * block).flatten(2).sum(dim=2, dtype=accumulate)
    return grads, table


def _blockwise_factor(grad_out, out, pre, settings):
    """grad_out times the activation's Darknet gradient, computed block by block into one new tensor."""
    g = torch.empty_like(grad_out)
    for batch, start, end in blocks(grad_out.shape):
        settings.times_factor(grad_out[batch, start:end], out[batch, start:end],
                              None if pre is None else pre[batch, start:end], into=g[batch, start:end])
    return g


def _prn_gradient(g, source):
    """The gradient of an input of another width: g over the channels it reaches, zero past them."""
    grad = torch.zeros_like(source)
    c = min(g.shape[1], source.shape[1])
    grad[:, :c] = g[:, :c]
    return grad


class _Settings:
    """What the function needs besides tensors (autograd.Function takes it as a plain argument)."""

    def __init__(self, params: ShortcutParams, dialect: Dialect, n_from: int):
        self.params, self.dialect, self.n_from = params, dialect, n_from

    def pre_activation(self, weights, x, froms, out=None):
        """The weighted sum before the activation, differentiable (autograd through it is the exact dialect)."""
        if self.dialect == Dialect.PJREDDIE:
            pre = _pjreddie_sum(x, froms[0], self.params.alpha, self.params.beta)
            return pre if out is None else out.copy_(pre)
        return weighted_sum(x, froms, self.what(weights), out)

    def forward(self, weights, x, froms, out=None, keep_pre=False):
        """(output, pre-activation or None): the activation applied to the weighted sum, blocked and in place where
        the dialect allows, into ``out`` if given. Not differentiable."""
        if self.dialect == Dialect.PJREDDIE:
            pre = _pjreddie_sum(x, froms[0], self.params.alpha, self.params.beta)
            result = forward_of(self.params.activation, self.dialect)(pre)
            return (result if out is None else out.copy_(result)), pre
        out = torch.empty_like(x) if out is None else out
        pre = torch.empty_like(x) if keep_pre else None
        fused_forward(x, froms, self.what(weights), out, in_place_of(self.params.activation, self.dialect), pre)
        return out, pre

    def activation_factor(self, out, pre):
        """Darknet's gradient factor of the activation (the Darknet dialects)."""
        factors = GPU_DARKNET_FACTOR if self.dialect == Dialect.DARKNET_GPU else DARKNET_FACTOR
        return factors[self.params.activation](out, pre)

    def times_factor(self, grad, out, pre, into=None):
        """grad times the activation's Darknet gradient factor (into ``into`` if given): one kernel where PyTorch
        has one with the same bits, else the product with :meth:`activation_factor`."""
        slope = SLOPE_OF_STEP.get(self.params.activation)
        if slope is not None and self.dialect != Dialect.DARKNET_GPU:
            result = torch.ops.aten.leaky_relu_backward(grad, out, slope, True)
            return result if into is None else into.copy_(result)
        return torch.mul(grad, self.activation_factor(out, pre), out=into)

    def what(self, weights):
        if weights is None or not weights.numel():
            return None
        table = weights.reshape(self.n_from + 1, -1)
        return normalized_weights(table, self.params.weights_normalization, relu_floor_of(self.dialect))


# --- modules ----------------------------------------------------------------------------------------------------------


class WeightedShortcut(torch.nn.Module):
    """Darknet's multi-input weighted ``[shortcut]``: ``module(x, *froms)``, x the previous layer's output.

    ``weight`` is an ``nn.Parameter`` of ``(n_from + 1) * L`` values in Darknet's layout (None without weights),
    initialized to 1 as Darknet does. ``dialect="exact"`` trains with autograd's true gradient; the Darknet
    dialects reproduce Darknet's backward.
    """

    def __init__(self, n_from: int, channels: int, weights_type="none", weights_normalization="none",
                 activation="linear", dialect="darknet-cpu", alpha=1.0, beta=1.0):
        super().__init__()
        self.params = ShortcutParams(weights_type, weights_normalization, activation, alpha, beta)
        self.dialect = parse_dialect(dialect)
        check_activation(self.params, self.dialect, frozenset())  # the reference's refusal, with its code
        self.n_from, self.channels = n_from, channels
        count = weight_count(self.params.weights_type, n_from, channels)
        self.weight = torch.nn.Parameter(torch.ones(count)) if count else None

    def forward(self, x, *froms, out: torch.Tensor | None = None):
        """``out``: a preallocated output to write into (inference only: autograd needs fresh tensors)."""
        if out is not None and torch.is_grad_enabled() and (x.requires_grad or self.weight is not None):
            raise DarkspecError("out", "a preallocated tensor", "out=None while autograd records (use torch.no_grad())",
                                code="out-with-autograd")
        if len(froms) != self.n_from:
            raise DarkspecError("froms", f"{len(froms)} inputs", f"{self.n_from}, as constructed", code="bad-shape")
        if x.shape[1] != self.channels:
            raise DarkspecError("x.shape", tuple(x.shape), f"{self.channels} channels", code="bad-shape")
        settings = self.settings()
        recording = torch.is_grad_enabled() and (x.requires_grad or any(f.requires_grad for f in froms)
                                                 or self.weight is not None)
        if not recording:
            with torch.no_grad():
                return settings.forward(self.weight, x, froms, out)[0]
        if self.dialect == Dialect.EXACT:
            return FORWARD[self.params.activation](settings.pre_activation(self.weight, x, froms))
        return DarknetShortcutFunction.apply(settings, self.weight, x, *froms)

    def settings(self) -> "_Settings":
        return _Settings(self.params, self.dialect, self.n_from)

    @torch.no_grad()
    def load_darknet_weights(self, block, offset: int = 0) -> int:
        """Copy this layer's weights from the flat float32 values of a Darknet ``.weights`` file (after its header),
        starting at ``offset``; returns the offset after them. A shortcut stores exactly ``nweights`` raw
        (unnormalized) values there, and nothing at all without weights."""
        values = np.frombuffer(block, dtype="<f4") if isinstance(block, (bytes, bytearray)) else np.asarray(block)
        if self.weight is None:
            return offset
        end = offset + self.weight.numel()
        if end > values.size:
            raise DarkspecError("weights block", f"{values.size - offset} values left",
                                f"at least {self.weight.numel()} for this layer", code="weights-size")
        self.weight.copy_(torch.from_numpy(np.array(values[offset:end], dtype=np.float32)))
        return end


class _PermutedReorg(torch.nn.Module):
    """A reorg as reshape/permute/reshape of the flat buffer, from the dims Darknet's reorg_cpu is handed (the
    reference's plan): a gather (space to depth) or a scatter (depth to space). Autograd's backward is the inverse
    permutation."""

    variant = reorg_reference.REORG3D

    def __init__(self, stride: int, reverse: bool = False):
        super().__init__()
        self.stride, self.reverse = stride, reverse

    def forward(self, x):
        layer = reorg_reference.plan(self.variant, tuple(x.shape), self.stride, self.reverse)
        (width, height, channels), s, batch = layer.dims, layer.stride, x.shape[0]
        small = channels // (s * s)
        if layer.forward_flag:  # scatter: x laid out as (b, dy, dx, c2, j, i)
            permuted = x.reshape(batch, s, s, small, height, width).permute(0, 3, 4, 1, 5, 2)
        else:  # gather: x laid out as (b, c2, j, dy, i, dx)
            permuted = x.reshape(batch, small, height, s, width, s).permute(0, 3, 5, 1, 2, 4)
        return permuted.reshape(layer.out_shape)


class Reorg3d(_PermutedReorg):
    """``[reorg3d]``: space-to-depth (ONNX SpaceToDepth), or Darknet's reverse=1 (spec/reorg.md)."""


class ReorgOld(_PermutedReorg):
    """The old ``[reorg]`` YOLOv2 was trained with (spec/reorg.md)."""

    variant = reorg_reference.REORG_OLD


# --- the update rule --------------------------------------------------------------------------------------------------


@torch.no_grad()
def darknet_update_(weights: torch.Tensor, weight_updates: torch.Tensor, hyper: UpdateParams,
                    dialect="darknet-cpu") -> None:
    """Darknet's update, in place (spec/shortcut.md#update), with the reference's step (its scalars rounded in the
    weights' dtype). ``weight_updates`` holds Darknet's accumulator: the *negative* gradient summed since the last
    step (``-weights.grad``)."""
    dialect = parse_dialect(dialect)
    require_pass("shortcut", dialect, "update")
    step = update_step(hyper, dialect, np.dtype(str(weights.dtype).removeprefix("torch.")).type)
    if step is None:
        return
    if step.repair_and_clip:
        weight_updates.copy_(torch.where(torch.isfinite(weight_updates), weight_updates, 0.0))
        repair = 1 / (torch.arange(weights.numel(), dtype=weights.dtype, device=weights.device) + 1)
        weights.copy_(torch.where(torch.isfinite(weights), weights, repair.reshape(weights.shape)))
        weight_updates.clamp_(-1, 1)
    else:
        weight_updates.add_(weights, alpha=float(step.decay))
    weights.add_(weight_updates, alpha=float(step.rate))
    weight_updates.mul_(float(step.momentum))


# --- the backend ------------------------------------------------------------------------------------------------------

class TorchBackend(Backend):
    """The modules above behind darkspec's NumPy boundary, on ``device`` (``cpu`` or ``cuda``)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.name = "torch" if device == "cpu" else f"torch-{device}"

    def availability(self):
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            return "no CUDA device visible to torch (a CPU build, or no GPU); the torch backend runs on the CPU"
        return None

    def capabilities(self):
        return capability_grid(device=self.device)

    def version(self):
        return f"torch {torch.__version__} ({self.device})"

    def _tensor(self, array, grad=False):
        return torch.tensor(np.asarray(array), device=self.device, requires_grad=grad)

    def _checked(self, pass_, x, froms, weights, params, dialect, quirks):
        """The reference's refusals of a [shortcut] call, before any tensor exists; (x, froms, weights) as arrays.
        The modules reproduce none of Darknet's quirks: a case that needs one is refused."""
        x, froms, weights, dialect, quirks = check_call(pass_, x, froms, weights, params, dialect, quirks)
        if quirks:
            raise DarkspecError("quirks", sorted(q.value for q in quirks), "none (the torch backend reproduces no "
                                "quirk; see its quirks())", code="quirk-not-reproduced")
        return x, froms, weights

    def _module(self, x, froms, weights, params, dialect) -> WeightedShortcut:
        module = WeightedShortcut(len(froms), x.shape[1], params.weights_type, params.weights_normalization,
                                  params.activation, dialect, params.alpha, params.beta)
        module = module.to(device=self.device, dtype=self._tensor(np.empty(0, x.dtype)).dtype)
        if module.weight is not None:
            with torch.no_grad():
                module.weight.copy_(self._tensor(weights))
        return module

    def _reorg_module(self, old: bool, stride, reverse) -> torch.nn.Module:
        return (ReorgOld if old else Reorg3d)(stride, reverse)

    def _callable(self, module: torch.nn.Module):
        """What runs a module: the module itself (the torch-compile backend: the module under torch.compile)."""
        return module

    def shortcut_forward(self, x, froms, weights, *, params, dialect, quirks=frozenset(), **_):
        x, froms, weights = self._checked("forward", x, froms, weights, params, dialect, quirks)
        module = self._module(x, froms, weights, params, dialect)
        with torch.no_grad():
            return self._callable(module)(self._tensor(x), *(self._tensor(f) for f in froms)).cpu().numpy()

    def shortcut_backward(self, x, froms, weights, delta, *, params, dialect, quirks=frozenset(), weight_updates=None,
                          **_):
        x, froms, weights = self._checked("backward", x, froms, weights, params, dialect, quirks)
        delta, weight_updates = check_backward_inputs(x, weights, delta, weight_updates)
        module = self._module(x, froms, weights, params, dialect)
        settings = module.settings()
        inputs = [self._tensor(a, grad=True) for a in (x, *froms)]
        delta_t = self._tensor(delta)
        pre = settings.pre_activation(module.weight, inputs[0], inputs[1:])
        if module.dialect == Dialect.EXACT:
            pre.retain_grad()
            FORWARD[params.activation](pre).backward(-delta_t)
            d = -pre.grad
        else:
            self._callable(module)(*inputs).backward(-delta_t)
            out = forward_of(params.activation, module.dialect)(pre.detach())
            d = delta_t * settings.activation_factor(out, pre.detach())
        updates = None
        if module.weight is not None:
            init = np.zeros_like(weights) if weight_updates is None else np.asarray(weight_updates)
            updates = init - module.weight.grad.cpu().numpy()
        return ShortcutGradients(delta=d.detach().cpu().numpy(), input_deltas=[-a.grad.cpu().numpy() for a in inputs],
                                 weight_updates=updates)

    def prepare(self, op, pass_, inputs, settings):
        """The modules on tensors that share the NumPy inputs' memory: the forward into a reused output, the
        backward as autograd's gradients on a graph built once, the update in place on copies."""
        if op != "shortcut":
            if pass_ != "forward":
                return None
            module = self._callable(self._reorg_module(op == "reorg", settings["stride"], settings["reverse"]))
            return _prepared_call(module, self._shared(inputs["x"]))
        if pass_ == "update":
            weights, updates = self._tensor(inputs["weights"]), self._tensor(inputs["weight_updates"])
            return Prepared(lambda: darknet_update_(weights, updates, settings["hyper"], settings["dialect"]),
                            lambda: (weights.cpu().numpy(), updates.cpu().numpy()))
        module = self._module(inputs["x"], inputs["froms"], inputs["weights"], settings["params"], settings["dialect"])
        if pass_ == "forward":
            x, froms = self._shared(inputs["x"]), [self._shared(f) for f in inputs["froms"]]
            out = torch.empty_like(x)
            run = self._callable(module)
            return Prepared(torch.no_grad()(lambda: run(x, *froms, out=out)), lambda: out.cpu().numpy())
        return _prepared_backward(module, self._callable(module),
                                  [self._tensor(a, grad=True) for a in (inputs["x"], *inputs["froms"])],
                                  self._shared(inputs["delta"]), inputs["weight_updates"])

    def _shared(self, array):
        return torch.from_numpy(array).to(self.device)

    def shortcut_update(self, weights, weight_updates, hyper, dialect):
        weights, weight_updates, dialect = check_update_inputs(weights, weight_updates, hyper, dialect)
        w, wu = self._tensor(weights), self._tensor(weight_updates)
        darknet_update_(w, wu, hyper, dialect)
        return w.cpu().numpy(), wu.cpu().numpy()

    def reorg_forward(self, x, stride, reverse, old):
        with torch.no_grad():
            return self._callable(self._reorg_module(old, stride, reverse))(self._tensor(x)).cpu().numpy()

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        # The gradient of the gather is its inverse permutation: the previous delta is overwritten, as in Darknet.
        variant = reorg_reference.REORG_OLD if old else reorg_reference.REORG3D
        plan = reorg_reference.plan_from_output(variant, np.shape(delta), stride, reverse)  # the reference's refusals
        x = torch.zeros(plan.in_shape, dtype=self._tensor(delta).dtype, device=self.device, requires_grad=True)
        self._callable(self._reorg_module(old, stride, reverse))(x).backward(self._tensor(delta))
        return x.grad.cpu().numpy()


def _prepared_call(function, *args) -> Prepared:
    last = {}

    def run():
        last["out"] = function(*args)

    return Prepared(run, lambda: last["out"].cpu().numpy())


def _prepared_backward(module, forward, inputs, delta, weight_updates) -> Prepared:
    """Autograd's gradient of every input and of the weights with ``delta`` as the output's gradient, on the graph of
    ``forward(*inputs)`` (the module, or its compiled form): Darknet's input deltas and what it adds to the weight
    updates (delta is -dL/dy)."""
    out = forward(*inputs)
    leaves = inputs + ([module.weight] if module.weight is not None else [])
    last = {}

    def run():
        last["grads"] = torch.autograd.grad(out, leaves, delta, retain_graph=True)

    def result():
        grads = [g.cpu().numpy() for g in last["grads"]]
        updates = None
        if module.weight is not None:
            init = np.zeros(module.weight.numel(), grads[-1].dtype) if weight_updates is None else weight_updates
            updates = init + grads[-1]
        return ShortcutGradients(delta=None, input_deltas=grads[:len(inputs)], weight_updates=updates)

    return Prepared(run, result)


class TorchCompileBackend(TorchBackend):
    """The same modules under ``torch.compile`` (inductor, on the CPU): does compiled code still conform?

    Each configuration (op settings and dtype) is compiled once, with dynamic shapes, and its module reused with the
    call's weights copied in; ``compile_seconds`` is the time spent in first calls, apart from the rest. It declares
    float32 [shortcut] in darknet-cpu (forward and backward) and exact (forward), and both reorgs both ways.
    """

    name = "torch-compile"
    SHORTCUT_DIALECTS = {Dialect.DARKNET_CPU.value: ("forward", "backward"), Dialect.EXACT.value: ("forward",)}

    def __init__(self):
        super().__init__("cpu")
        self.name = "torch-compile"
        self._reused: dict = {}  # configuration -> its module, for the NumPy API's calls
        self._compiled: dict = {}  # id(module) -> _Compiled
        self._preparing = False
        self.compile_seconds = 0.0

    def availability(self):
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            return f"torch.compile's inductor needs a C++ compiler on the CPU: {compiler} is not on PATH (set CXX)"
        return None

    def capabilities(self):
        shortcut = capability_grid({"shortcut": tuple(self.SHORTCUT_DIALECTS)}, ("float32",),
                                   passes=self.SHORTCUT_DIALECTS)
        return shortcut | capability_grid({"reorg3d": (REORG_DIALECT,), "reorg": (REORG_DIALECT,)}, ("float32",))

    def version(self):
        return f"torch {torch.__version__} (torch.compile, inductor, cpu)"

    def prepare(self, op, pass_, inputs, settings):
        """Each prepared call keeps its own module (its own weights); they share the compiled code's caches."""
        self._preparing = True
        try:
            return super().prepare(op, pass_, inputs, settings)
        finally:
            self._preparing = False

    def _module(self, x, froms, weights, params, dialect):
        fresh = super()._module(x, froms, weights, params, dialect)
        if self._preparing:
            return fresh
        key = ("shortcut", fresh.params, fresh.dialect, fresh.n_from, fresh.channels, fresh.weight is None,
               np.dtype(x.dtype).name)
        reused = self._reused.setdefault(key, fresh)
        if reused.weight is not None:
            with torch.no_grad():
                reused.weight.copy_(fresh.weight)
            reused.weight.grad = None
        return reused

    def _reorg_module(self, old, stride, reverse):
        key = ("reorg", old, type(stride), stride, type(reverse), reverse)  # a bad setting is refused, not mapped
        return self._reused.setdefault(key, super()._reorg_module(old, stride, reverse))

    def _checked(self, pass_, x, froms, weights, params, dialect, quirks):
        self._refuse_undeclared_dtype(x)
        return super()._checked(pass_, x, froms, weights, params, dialect, quirks)

    def reorg_forward(self, x, stride, reverse, old):
        self._refuse_undeclared_dtype(x)
        return super().reorg_forward(x, stride, reverse, old)

    def reorg_backward(self, delta, stride, reverse, old, previous_delta):
        self._refuse_undeclared_dtype(delta)
        return super().reorg_backward(delta, stride, reverse, old, previous_delta)

    @staticmethod
    def _refuse_undeclared_dtype(array):
        dtype = np.asarray(array).dtype
        if dtype != np.float32:
            raise DarkspecError("dtype", str(dtype), "float32 (what the torch-compile backend declares)",
                                code="bad-dtype")

    def _callable(self, module):
        return self._compiled.setdefault(id(module), _Compiled(module)).timed(self)


class _Compiled:
    """A module and its torch.compile form; the first call's time is the compile's. Every module of a class shares
    the code of its forward, which dynamo counts against one recompile limit: calls raise it for this backend's
    configurations and fail rather than fall back to eager unnoticed."""

    def __init__(self, module):
        self.module, self.compiled, self.first = module, torch.compile(module, dynamic=True), True

    def timed(self, backend: "TorchCompileBackend"):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                with torch._dynamo.config.patch(recompile_limit=1 << 16, fail_on_recompile_limit_hit=True):
                    return self.compiled(*args, **kwargs)
            finally:
                if self.first:
                    self.first = False
                    backend.compile_seconds += time.perf_counter() - start

        return call


class TorchCudaBackend(TorchBackend):
    """The same modules on the first CUDA device."""

    def __init__(self):
        super().__init__("cuda")

    def bench_timer(self):
        """CUDA events on torch's current stream, and a device-to-device copy as the bandwidth baseline."""
        from darkspec.bench.timing import CudaEventTimer

        return CudaEventTimer("cuda events (torch)", "cuda",
                              lambda: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)),
                              lambda start, end: start.elapsed_time(end) / 1e3,
                              lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"))
