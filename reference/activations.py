"""Darknet's activations as its [shortcut] layer applies them (spec/activations.md).

For every activation name three functions of the same small kind:

* ``activate(name, x)``: the forward formula, of the pre-activation ``x``;
* ``darknet_gradient(name, y, x)``: the factor Darknet's backward multiplies the delta by, as Darknet codes it.
  Darknet evaluates most of these on the layer *output* ``y``; mish and hard_mish on the stored input ``x``, swish
  on both. Where that factor is not the derivative (gelu; revleaky on the GPU) this module reproduces Darknet;
* ``derivative(name, x)``: the true derivative of ``activate``. At a kink it takes the value Darknet's gradient
  takes there, so that the two agree wherever Darknet is right.

Inputs of float32 or float64 come back in the same dtype (anything else as float64). The arithmetic is float64 and
rounded once at the end, so a float32 result is the correctly rounded value of the formula. The constants are the
decimal ones Darknet writes (0.1, 1.0507, 0.797885, ...), not the exact mathematical constants they truncate.
"""

from __future__ import annotations

import numpy as np

from darkspec.errors import DarkspecError

ALEXEYAB_NAMES = (
    "linear", "leaky", "revleaky", "relu", "relu6", "logistic", "loggy", "tanh", "elu", "selu", "gelu", "relie",
    "ramp", "plse", "hardtan", "lhtan", "stair", "swish", "mish", "hard_mish", "normalize_channels",
    "normalize_channels_softmax", "normalize_channels_softmax_maxval",
)
PJREDDIE_NAMES = (
    "logistic", "loggy", "relu", "elu", "selu", "relie", "plse", "hardtan", "lhtan", "linear", "ramp", "leaky", "tanh",
    "stair",
)
#: hank-ai's name table holds the same 23 names as AlexeyAB's.
HANKAI_NAMES = ALEXEYAB_NAMES

#: [shortcut] never evaluates these (AlexeyAB, hank-ai): its generic per-element function has no case, so gives 0.
SHORTCUT_UNEVALUATED = frozenset(
    {"hard_mish", "normalize_channels", "normalize_channels_softmax", "normalize_channels_softmax_maxval"}
)
#: Darknet's CPU gradient() stops the program with an error for these.
GRADIENT_ABORTS = frozenset({"normalize_channels", "normalize_channels_softmax", "normalize_channels_softmax_maxval"})

_LIBRARY_NAMES = {"alexeyab": ALEXEYAB_NAMES, "pjreddie": PJREDDIE_NAMES, "hank-ai": HANKAI_NAMES}
_ALL_NAMES = tuple(dict.fromkeys(ALEXEYAB_NAMES + PJREDDIE_NAMES + HANKAI_NAMES))

# Darknet's truncations of SELU's lambda and alpha, and its two sets of GELU constants: the forward's tanh argument
# is 0.797885*x + 0.035677*x^3, the gradient's 0.797885*y + 0.0356774*y^3 (0.398942 and 0.0535161 are half of
# 0.797885 and three halves of 0.0356774, rounded).
_SELU_LAMBDA = 1.0507
_SELU_ALPHA = 1.6732
_GELU_A = 0.797885
_GELU_B = 0.035677
_GELU_GRAD_B = 0.0356774
_GELU_GRAD_C1 = 0.398942
_GELU_GRAD_C3 = 0.0535161


# --- helpers: stable forms, so that large inputs do not overflow and the final rounding is the only error --------


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def _softplus(x):
    # Darknet switches to x and e^x beyond |x| > 20: a float32 device that changes nothing but the last bits.
    return np.logaddexp(0.0, x)


def _sech(v):
    # Darknet's sech(v) = 2 / (e^v + e^-v).
    return 2.0 * np.exp(-np.logaddexp(v, -v))


# --- forward --------------------------------------------------------------------------------------------------


def _linear(x):
    return x


def _leaky(x):
    return np.where(x > 0, x, 0.1 * x)


def _relu(x):
    return np.where(x > 0, x, 0.0)


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


def _logistic(x):
    return _sigmoid(x)


def _loggy(x):
    # Darknet: 2 / (1 + e^-x) - 1, which is tanh(x / 2); this form has no cancellation near 0.
    return np.tanh(x / 2)


def _tanh(x):
    # Darknet: 2 / (1 + e^-2x) - 1 (AlexeyAB), (e^2x - 1) / (e^2x + 1) (pjreddie).
    return np.tanh(x)


def _elu(x):
    return np.where(x >= 0, x, np.expm1(np.minimum(x, 0.0)))


def _selu(x):
    return np.where(x >= 0, _SELU_LAMBDA * x, _SELU_LAMBDA * _SELU_ALPHA * np.expm1(np.minimum(x, 0.0)))


def _gelu(x):
    # Darknet: 0.5 x (1 + tanh(u)); 0.5 (1 + tanh(u)) = sigmoid(2u), which keeps its accuracy for negative x.
    u = _GELU_A * x + _GELU_B * x**3
    return x * _sigmoid(2 * u)


def _relie(x):
    return np.where(x > 0, x, 0.01 * x)


def _ramp(x):
    return np.where(x > 0, x, 0.0) + 0.1 * x


def _plse(x):
    return np.select([x < -4, x > 4], [0.01 * (x + 4), 0.01 * (x - 4) + 1], 0.125 * x + 0.5)


def _hardtan(x):
    return np.clip(x, -1.0, 1.0)


def _lhtan(x):
    return np.select([x < 0, x > 1], [0.001 * x, 0.001 * (x - 1) + 1], x)


def _pjreddie_loggy(x):
    # pjreddie writes 2/(1 + e^-x) - 1 in double: near 0 the subtraction cancels, which its results show.
    return 2.0 / (1.0 + np.exp(-x)) - 1.0


def _pjreddie_tanh(x):
    # pjreddie writes (e^2x - 1)/(e^2x + 1) in double: it cancels near 0 and is NaN above x ~ 354.9.
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(2.0 * x)
        return (e - 1.0) / (e + 1.0)


def _stair(x):
    # Flat on [2k, 2k+1), slope 1 on [2k+1, 2k+2): continuous steps.
    n = np.floor(x)
    half = np.floor(x / 2)
    return np.where(n % 2 == 0, half, (x - n) + half)


def _swish(x):
    return x * _sigmoid(x)


def _mish(x):
    return x * np.tanh(_softplus(x))


def _hard_mish(x):
    return np.select([x > 0, x > -2], [x, x * x / 2 + x], 0.0)


# --- true derivatives (at a kink: the value Darknet's gradient takes there) -------------------------------------


def _linear_derivative(x):
    return np.ones_like(x)


def _leaky_derivative(x):
    return np.where(x > 0, 1.0, 0.1)  # 0.1 at 0


def _relu_derivative(x):
    return np.where(x > 0, 1.0, 0.0)  # 0 at 0


def _relu6_derivative(x):
    return np.where((x > 0) & (x < 6), 1.0, 0.0)  # 0 at 0 and 6


def _logistic_derivative(x):
    return _sigmoid(x) * _sigmoid(-x)


def _loggy_derivative(x):
    return 2 * _sigmoid(x) * _sigmoid(-x)


def _tanh_derivative(x):
    return _sech(x) ** 2


def _elu_derivative(x):
    return np.where(x >= 0, 1.0, np.exp(np.minimum(x, 0.0)))  # 1 at 0 (continuous there)


def _selu_derivative(x):
    return np.where(x >= 0, _SELU_LAMBDA, _SELU_LAMBDA * _SELU_ALPHA * np.exp(np.minimum(x, 0.0)))  # lambda at 0


def _gelu_derivative(x):
    u = _GELU_A * x + _GELU_B * x**3
    return _sigmoid(2 * u) * (1 + 2 * x * _sigmoid(-2 * u) * (_GELU_A + 3 * _GELU_B * x**2))


def _relie_derivative(x):
    return np.where(x > 0, 1.0, 0.01)  # 0.01 at 0


def _ramp_derivative(x):
    return np.where(x > 0, 1.1, 0.1)  # 0.1 at 0


def _plse_derivative(x):
    return np.where((x < -4) | (x > 4), 0.01, 0.125)  # 0.125 at -4 and 4


def _hardtan_derivative(x):
    return np.where((x > -1) & (x < 1), 1.0, 0.0)  # 0 at -1 and 1


def _lhtan_derivative(x):
    return np.where((x > 0) & (x < 1), 1.0, 0.001)  # 0.001 at 0 and 1


def _stair_derivative(x):
    n = np.floor(x)
    return np.where((n % 2 != 0) & (x != n), 1.0, 0.0)  # 0 at every integer


def _swish_derivative(x):
    return _sigmoid(x) * (1 + x * _sigmoid(-x))


def _mish_derivative(x):
    sp = _softplus(x)
    return np.tanh(sp) + x * _sigmoid(x) * _sech(sp) ** 2


def _hard_mish_derivative(x):
    return np.select([x > 0, x > -2], [1.0, x + 1], 0.0)  # 1 at 0 (continuous there), 0 at -2


# --- Darknet's gradients: functions of (y, x), y the output, x the pre-activation -----------------------------------


def _on_output(derivative):
    """A piecewise-linear activation's slope read off y: y lies on the same piece as x, so this is the derivative."""
    return lambda y, x: derivative(y)


def _on_input(derivative):
    """Darknet keeps the pre-activation for these and evaluates the derivative on it."""
    return lambda y, x: derivative(x)


def _logistic_gradient(y, x):
    return (1 - y) * y


def _loggy_gradient(y, x):
    t = (y + 1) / 2
    return 2 * (1 - t) * t


def _tanh_gradient(y, x):
    return 1 - y * y


def _elu_gradient(y, x):
    return np.where(y >= 0, 1.0, y + 1)  # e^x = y + 1


def _selu_gradient(y, x):
    return np.where(y >= 0, _SELU_LAMBDA, y + _SELU_LAMBDA * _SELU_ALPHA)  # lambda alpha e^x = y + lambda alpha


def _gelu_gradient(y, x):
    # Not the derivative: this is the derivative's formula of the input, but Darknet hands it the output y.
    v = _GELU_GRAD_B * y**3 + _GELU_A * y
    return 0.5 * np.tanh(v) + (_GELU_GRAD_C3 * y**3 + _GELU_GRAD_C1 * y) * _sech(v) ** 2 + 0.5


def _plse_gradient(y, x):
    return np.where((y < 0) | (y > 1), 0.01, 0.125)  # y < 0 iff x < -4, y > 1 iff x > 4


def _stair_gradient(y, x):
    return np.where(np.floor(y) == y, 0.0, 1.0)  # y is an integer exactly where stair is flat or at a corner


def _swish_gradient(y, x):
    # Darknet keeps sigmoid(x) from the forward: y + s (1 - y) = s + x s (1 - s).
    return y + _sigmoid(x) * (1 - y)


def _revleaky_gpu_gradient(y, x):
    # The GPU kernel divides the delta by leaky's factor instead of multiplying: 1 / 0.1 for y <= 0.
    return np.where(y > 0, 1.0, 1 / 0.1)


# --- tables -----------------------------------------------------------------------------------------------------

_FORWARDS = {
    "linear": _linear, "leaky": _leaky, "revleaky": _leaky, "relu": _relu, "relu6": _relu6, "logistic": _logistic,
    "loggy": _loggy, "tanh": _tanh, "elu": _elu, "selu": _selu, "gelu": _gelu, "relie": _relie, "ramp": _ramp,
    "plse": _plse, "hardtan": _hardtan, "lhtan": _lhtan, "stair": _stair, "swish": _swish, "mish": _mish,
    "hard_mish": _hard_mish,
}

_DERIVATIVES = {
    "linear": _linear_derivative, "leaky": _leaky_derivative, "revleaky": _leaky_derivative,
    "relu": _relu_derivative, "relu6": _relu6_derivative, "logistic": _logistic_derivative,
    "loggy": _loggy_derivative, "tanh": _tanh_derivative, "elu": _elu_derivative, "selu": _selu_derivative,
    "gelu": _gelu_derivative, "relie": _relie_derivative, "ramp": _ramp_derivative, "plse": _plse_derivative,
    "hardtan": _hardtan_derivative, "lhtan": _lhtan_derivative, "stair": _stair_derivative,
    "swish": _swish_derivative, "mish": _mish_derivative, "hard_mish": _hard_mish_derivative,
}

_GRADIENTS = {
    **{
        name: _on_output(_DERIVATIVES[name])
        for name in ("linear", "leaky", "revleaky", "relu", "relu6", "relie", "ramp", "hardtan", "lhtan")
    },
    "logistic": _logistic_gradient, "loggy": _loggy_gradient, "tanh": _tanh_gradient, "elu": _elu_gradient,
    "selu": _selu_gradient, "gelu": _gelu_gradient, "plse": _plse_gradient, "stair": _stair_gradient,
    "swish": _swish_gradient,
    # mish: Darknet's x (1 - t^2) (1 - e^-sp) + t, t = tanh(sp), sp = softplus(x), is the derivative (1 - e^-sp is
    # sigmoid(x)). hard_mish: the gradient of [convolutional], which keeps x ([shortcut] keeps nothing: it gives 0).
    "mish": _on_input(_mish_derivative), "hard_mish": _on_input(_hard_mish_derivative),
}
#: Where pjreddie's CPU forward is written differently (in double) and its results differ from the formula's.
_PJREDDIE_FORWARDS = {**_FORWARDS, "loggy": _pjreddie_loggy, "tanh": _pjreddie_tanh}
#: Where Darknet's GPU backward computes a different factor from its CPU backward.
_GPU_GRADIENTS = {"revleaky": _revleaky_gpu_gradient}


# --- public API -------------------------------------------------------------------------------------------------


def _unknown(name, names, reason):
    return DarkspecError("activation", name, ", ".join(names), code="unknown-activation", reason=reason)


def check_name(name: str, library: str) -> str:
    """``name`` if the ``library`` ("alexeyab", "pjreddie" or "hank-ai") Darknet accepts it, else DarkspecError.

    Darknet itself replaces an unknown name by relu (hank-ai's stops); darkspec refuses it.
    """
    if library not in _LIBRARY_NAMES:
        raise DarkspecError("library", library, ", ".join(_LIBRARY_NAMES), code="unknown-library")
    names = _LIBRARY_NAMES[library]
    if name not in names:
        raise _unknown(name, names, f"{library}'s Darknet has no such activation")
    return name


def _lookup(table, name, *, code, reason):
    if name not in _ALL_NAMES:
        raise _unknown(name, _ALL_NAMES, "no Darknet has such an activation")
    if name not in table:
        raise DarkspecError("activation", name, ", ".join(table), code=code, reason=reason)
    return table[name]


def _float64(a):
    """``a`` as float64, and the dtype to hand the result back in."""
    a = np.asarray(a)
    return a.astype(np.float64), (a.dtype if a.dtype == np.float32 else np.dtype(np.float64))


_NOT_ELEMENTWISE = "it normalizes across channels, so it has no elementwise formula"


#: Forms evaluated in the input's own dtype, as Darknet does: their intermediate rounding shows in the result
#: (stair's x - floor(x) rounds to 1 just below an odd integer, and the result to 0).
_IN_OWN_DTYPE = frozenset({"stair"})


def activate(name: str, x, library: str = "alexeyab"):
    """The activation ``name`` of the pre-activation ``x``, as ``library``'s Darknet computes it: pjreddie's loggy
    and tanh are its own double-precision expressions, whose cancellation near 0 shows in its results."""
    table = _PJREDDIE_FORWARDS if library == "pjreddie" else _FORWARDS
    forward = _lookup(table, name, code="activation-not-elementwise", reason=_NOT_ELEMENTWISE)
    if (forward is _linear or name in _IN_OWN_DTYPE) and np.asarray(x).dtype in (np.float32, np.float64):
        return forward(np.array(x))
    x, dtype = _float64(x)
    return forward(x).astype(dtype)


def derivative(name: str, x):
    """d activate(name, x) / dx; at a kink, the value Darknet's gradient takes there."""
    d = _lookup(_DERIVATIVES, name, code="activation-not-elementwise", reason=_NOT_ELEMENTWISE)
    x, dtype = _float64(x)
    return d(x).astype(dtype)


def darknet_gradient(name: str, y, x, *, gpu: bool = False):
    """The factor Darknet multiplies the delta by, given the output ``y`` and the pre-activation ``x``.

    ``gpu=True`` gives the GPU backward's factor (they differ for revleaky only). The result has ``y``'s dtype.
    """
    gradient = _lookup(
        _GRADIENTS, name, code="activation-gradient-aborts", reason="Darknet's CPU gradient() aborts for it"
    )
    if gpu:
        gradient = _GPU_GRADIENTS.get(name, gradient)
    y, dtype = _float64(y)
    x, _ = _float64(x)
    return gradient(y, x).astype(dtype)
