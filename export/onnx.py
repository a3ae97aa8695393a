"""ONNX graphs of Darknet's fusion layers, with the semantics of darkspec's reference (spec/third-party.md).

- ``shortcut_model``: the multi-input weighted ``[shortcut]`` in any forward dialect. The weights are initializers;
  ``darknet-inference`` folds them at export (the graph then only multiplies and adds), the training dialects
  normalize them in the graph: ``ReduceMax``/``Sub``/``Exp`` for softmax, ``Relu`` (or ``Max`` with the 0.001 floor
  on the GPU) for relu, the eps added *first* and the sum taken in slot order, then ``Div``. The stock ``Softmax`` op
  has no eps: it is off by about 1e-4 relative, far outside the tolerance.
- ``reorg_model``: ``[reorg3d]`` is ``SpaceToDepth`` (DCR); its ``reverse=1`` and the old ``[reorg]`` are the same
  ops between two ``Reshape``s that reinterpret the buffer as Darknet does (darkspec.reference.reorg).
- ``cfg_models``: every ``[shortcut]``, ``[reorg3d]`` and ``[reorg]`` of a cfg, one graph per layer.

Graph inputs are ``x`` (the previous layer) and ``from0``, ``from1``, ... (the ``from=`` layers in cfg order), with
the case's static NCHW shapes; the output is ``y``. Every model passes ``onnx.checker.check_model``. The ``onnx``
package is needed (``pip install darkspec[onnx]``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from darkspec.errors import DarkspecError
from darkspec.reference import activations, reorg
from darkspec.reference.contract import NORMALIZATION_EPS, relu_floor_of
from darkspec.reference.dialects import Dialect, parse_dialect
from darkspec.reference.network import ReorgSection, parse_network
from darkspec.reference.shortcut import (
    Normalization,
    ShortcutParams,
    check_activation,
    check_inputs,
    fold_weights,
    pjreddie_index_map,
    prn_overlap,
    weight_count,
    weights_per_input,
)

#: ReduceMax takes its axes as an input from opset 18 on; Mish exists from opset 18.
OPSET = 18
_ELEMENT_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


class _Graph:
    """Nodes and initializers under construction, each value with a fresh name."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _ELEMENT_TYPES:
            raise DarkspecError("dtype", str(self.dtype), "float32, float64", code="bad-dtype")
        self.nodes: list = []
        self.initializers: list = []
        self._names = 0

    def _fresh(self, hint: str) -> str:
        self._names += 1
        return f"{hint}_{self._names}"

    def const(self, value, hint: str = "c", dtype=None) -> str:
        name = self._fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def int64(self, values, hint: str = "i") -> str:
        return self.const(values, hint, dtype=np.int64)

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes) -> str:
        output = output or self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def model(self, name: str, inputs: dict[str, tuple], output: str, output_shape: tuple) -> onnx.ModelProto:
        element = _ELEMENT_TYPES[self.dtype]
        if output in inputs or not self.nodes or self.nodes[-1].output[0] != output:
            output = self.op("Identity", output)
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, element, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info("y", element, list(output_shape))],
            initializer=self.initializers,
        )
        graph.node[-1].output[0] = "y"
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="darkspec")
        onnx.checker.check_model(model, full_check=True)
        return model


def _slice(g: _Graph, value: str, axis: int, start: int, end: int) -> str:
    return g.op("Slice", value, g.int64([start]), g.int64([end]), g.int64([axis]))


# --- activations: one small function each, the formulas of darkspec.reference.activations -----------------------


def _where(g, condition, then, otherwise):
    return g.op("Where", condition, then, otherwise)


def _affine(g, v, scale, shift=0.0):
    out = g.op("Mul", v, g.const(scale))
    return g.op("Add", out, g.const(shift)) if shift else out


def _leaky_with(slope):
    return lambda g, v: _where(g, g.op("Greater", v, g.const(0.0)), v, g.op("Mul", v, g.const(slope)))


def _relu(g, v):
    return g.op("Relu", v)


def _sigmoid(g, v):
    return g.op("Sigmoid", v)


def _elu(g, v):
    # expm1 written as exp - 1: cancellation near 0 costs an absolute ε, inside the tolerance's ε·M.
    negative = g.op("Sub", g.op("Exp", g.op("Min", v, g.const(0.0))), g.const(1.0))
    return _where(g, g.op("GreaterOrEqual", v, g.const(0.0)), v, negative)


def _selu(g, v):
    scale = activations._SELU_LAMBDA
    negative = g.op("Sub", g.op("Exp", g.op("Min", v, g.const(0.0))), g.const(1.0))
    return _where(g, g.op("GreaterOrEqual", v, g.const(0.0)), _affine(g, v, scale),
                  _affine(g, negative, scale * activations._SELU_ALPHA))


def _gelu(g, v):
    cube = g.op("Mul", g.op("Mul", v, v), v)
    u = g.op("Add", _affine(g, v, activations._GELU_A), _affine(g, cube, activations._GELU_B))
    return g.op("Mul", v, g.op("Sigmoid", _affine(g, u, 2.0)))


def _ramp(g, v):
    return g.op("Add", g.op("Relu", v), _affine(g, v, 0.1))


def _plse(g, v):
    low = _where(g, g.op("Less", v, g.const(-4.0)), _affine(g, v, 0.01, 0.04), _affine(g, v, 0.125, 0.5))
    return _where(g, g.op("Greater", v, g.const(4.0)), _affine(g, v, 0.01, 1 - 0.04), low)


def _clip(low, high):
    return lambda g, v: g.op("Clip", v, g.const(low), g.const(high))


def _lhtan(g, v):
    low = _where(g, g.op("Less", v, g.const(0.0)), _affine(g, v, 0.001), v)
    return _where(g, g.op("Greater", v, g.const(1.0)), _affine(g, v, 0.001, 1 - 0.001), low)


def _stair(g, v):
    # flat on [2k, 2k+1), slope 1 on [2k+1, 2k+2): floor(x/2), plus x - floor(x) where floor(x) is odd.
    n = g.op("Floor", v)
    half = g.op("Floor", _affine(g, v, 0.5))
    is_even = g.op("Equal", g.op("Sub", n, _affine(g, half, 2.0)), g.const(0.0))
    return _where(g, is_even, half, g.op("Add", g.op("Sub", v, n), half))


def _swish(g, v):
    return g.op("Mul", v, g.op("Sigmoid", v))


def _softplus(g, v):
    # max(x, 0) + log(1 + e^-|x|): no overflow for large x.
    tail = g.op("Log", g.op("Add", g.const(1.0), g.op("Exp", g.op("Neg", g.op("Abs", v)))))
    return g.op("Add", g.op("Relu", v), tail)


def _mish(g, v):
    return g.op("Mul", v, g.op("Tanh", _softplus(g, v)))


def _pjreddie_loggy(g, v):
    # pjreddie's 2 / (1 + e^-x) - 1, evaluated in double as pjreddie does.
    return _in_double(g, v, lambda d: g.op("Sub", g.op("Div", g.const(2.0, dtype=np.float64), g.op(
        "Add", g.const(1.0, dtype=np.float64), g.op("Exp", g.op("Neg", d)))), g.const(1.0, dtype=np.float64)))


def _pjreddie_tanh(g, v):
    # pjreddie's (e^2x - 1) / (e^2x + 1), evaluated in double as pjreddie does.
    def formula(d):
        e = g.op("Exp", g.op("Mul", d, g.const(2.0, dtype=np.float64)))
        one = g.const(1.0, dtype=np.float64)
        return g.op("Div", g.op("Sub", e, one), g.op("Add", e, one))

    return _in_double(g, v, formula)


def _in_double(g, v, formula):
    if g.dtype == np.float64:
        return formula(v)
    return g.op("Cast", formula(g.op("Cast", v, to=TensorProto.DOUBLE)), to=_ELEMENT_TYPES[g.dtype])


ACTIVATIONS = {
    "linear": lambda g, v: v, "leaky": _leaky_with(0.1), "revleaky": _leaky_with(0.1), "relu": _relu,
    "relu6": _clip(0.0, 6.0), "logistic": _sigmoid, "loggy": lambda g, v: g.op("Tanh", _affine(g, v, 0.5)),
    "tanh": lambda g, v: g.op("Tanh", v), "elu": _elu, "selu": _selu, "gelu": _gelu, "relie": _leaky_with(0.01),
    "ramp": _ramp, "plse": _plse, "hardtan": _clip(-1.0, 1.0), "lhtan": _lhtan, "stair": _stair, "swish": _swish,
    "mish": _mish,
}
#: pjreddie writes these two differently, and its results show it (darkspec.reference.activations).
PJREDDIE_ACTIVATIONS = {**ACTIVATIONS, "loggy": _pjreddie_loggy, "tanh": _pjreddie_tanh}


def _activation(g: _Graph, value: str, params: ShortcutParams, dialect: Dialect) -> str:
    name = params.activation
    if name in activations.SHORTCUT_UNEVALUATED:
        raise DarkspecError(
            "activation", name, ", ".join(ACTIVATIONS), code="onnx-activation-not-expressible",
            reason="Darknet's [shortcut] has no formula for it (it outputs 0 there), so no ONNX graph expresses it",
        )
    check_activation(params, dialect, frozenset())
    return (PJREDDIE_ACTIVATIONS if dialect == Dialect.PJREDDIE else ACTIVATIONS)[name](g, value)


# --- [shortcut] -------------------------------------------------------------------------------------------------


def _normalized_rows(g: _Graph, weights, params: ShortcutParams, dialect: Dialect, n_from: int) -> list[str]:
    """One value per input slot: its normalized weight, shaped (1, L, 1, 1) to broadcast over NCHW."""
    per_slot = weights.size // (n_from + 1)
    if dialect == Dialect.DARKNET_INFERENCE:  # folded at export: the layer is then normalization=none
        folded = fold_weights(weights, params, n_from).reshape(n_from + 1, 1, per_slot, 1, 1)
        return [g.const(row, "folded_weight") for row in folded]
    table = g.const(weights.reshape(n_from + 1, per_slot, 1, 1), "weights")
    normalization = params.weights_normalization
    if normalization == Normalization.SOFTMAX:
        peak = g.op("ReduceMax", table, g.int64([0]), keepdims=1)
        phi = g.op("Exp", g.op("Sub", table, peak))
    elif normalization == Normalization.RELU:
        floor = relu_floor_of(dialect)
        phi = g.op("Relu", table) if floor is None else g.op("Max", table, g.const(floor))
    else:
        phi = table
    rows = [g.op("Slice", phi, g.int64([slot]), g.int64([slot + 1]), g.int64([0])) for slot in range(n_from + 1)]
    if normalization == Normalization.NONE:
        return rows
    total = g.const(NORMALIZATION_EPS)  # the eps first, then the slots in order: Darknet's sum
    for row in rows:
        total = g.op("Add", total, row)
    return [g.op("Div", row, total) for row in rows]


def _prn_add(g: _Graph, out: str, term: str, channels: int, overlap: int) -> str:
    """out + term over the first ``overlap`` = min(C, C_i) channels; the rest of out unchanged (the PRN rule)."""
    if channels == overlap:
        return g.op("Add", out, term)
    head = g.op("Add", _slice(g, out, 1, 0, overlap), term)
    return g.op("Concat", head, _slice(g, out, 1, overlap, channels), axis=1)


def _weighted_sum(g: _Graph, x_shape, from_shapes, rows, per_slot: int) -> str:
    """x * what_0 + from_i * what_{i+1} over each from layer's overlap, in slot order (rows None: no weights)."""
    channels = x_shape[1]
    out = "x" if rows is None else g.op("Mul", "x", rows[0])
    for i, shape in enumerate(from_shapes):
        overlap = prn_overlap(channels, shape[1])
        term = f"from{i}" if shape[1] == overlap else _slice(g, f"from{i}", 1, 0, overlap)
        if rows is not None:
            row = rows[i + 1] if per_slot == 1 or overlap == channels else _slice(g, rows[i + 1], 1, 0, overlap)
            term = g.op("Mul", term, row)
        out = _prn_add(g, out, term, channels, overlap)
    return out


def _pjreddie_sum(g: _Graph, x_shape, from_shape, params: ShortcutParams) -> str:
    """out = x, then out[dest] = alpha * out[dest] + beta * from[source] where the two meet (a flat gather/scatter
    through the index map of darkspec.reference.shortcut.pjreddie_index_map)."""
    source, dest = pjreddie_index_map(from_shape, x_shape)
    batch = x_shape[0]
    source_index = np.arange(int(np.prod(from_shape[1:]))).reshape(from_shape[1:])[source[1:]].reshape(-1)
    dest_index = np.arange(int(np.prod(x_shape[1:]))).reshape(x_shape[1:])[dest[1:]].reshape(-1)
    flat_x = g.op("Reshape", "x", g.int64([batch, -1]))
    flat_from = g.op("Reshape", "from0", g.int64([batch, -1]))
    dest_value = g.op("Gather", flat_x, g.int64(dest_index), axis=1)
    source_value = g.op("Gather", flat_from, g.int64(source_index), axis=1)
    mixed = g.op("Add", _affine(g, dest_value, params.alpha), _affine(g, source_value, params.beta))
    scatter_index = g.int64(np.broadcast_to(dest_index, (batch, dest_index.size)))
    flat_out = g.op("ScatterElements", flat_x, scatter_index, mixed, axis=1)
    return g.op("Reshape", flat_out, g.int64(list(x_shape)))


def shortcut_model(params: ShortcutParams, input_shapes: Sequence[Sequence[int]], weights=None,
                   dialect: Dialect | str = Dialect.DARKNET_CPU, dtype=np.float32,
                   name: str = "shortcut") -> onnx.ModelProto:
    """The ONNX model of one ``[shortcut]``: ``input_shapes`` are the NCHW shapes of the previous layer and then of
    each ``from=`` layer; ``weights`` the layer's flat weights (Darknet's layout), None without weights.

    Refuses, with DarkspecError, what the reference refuses for these shapes and settings, and an activation no
    ONNX graph of the layer can express (code ``onnx-activation-not-expressible``). Darknet's bugs (quirks) are not
    exported.
    """
    dialect = parse_dialect(dialect)
    dtype = np.dtype(dtype)
    x_shape, *from_shapes = [tuple(int(d) for d in s) for s in input_shapes]
    weights = None if weights is None else np.asarray(weights, dtype=dtype)
    check_inputs(np.zeros(x_shape, dtype), [np.zeros(s, dtype) for s in from_shapes], weights, params, dialect)
    g = _Graph(dtype)
    if dialect == Dialect.PJREDDIE:
        pre = _pjreddie_sum(g, x_shape, from_shapes[0], params)
    else:
        rows = None if weights is None else _normalized_rows(g, weights, params, dialect, len(from_shapes))
        pre = _weighted_sum(g, x_shape, from_shapes, rows, weights_per_input(params.weights_type, x_shape[1]))
    out = _activation(g, pre, params, dialect)
    inputs = {"x": x_shape, **{f"from{i}": s for i, s in enumerate(from_shapes)}}
    return g.model(name, inputs, out, x_shape)


# --- [reorg3d] and [reorg] --------------------------------------------------------------------------------------


def reorg_model(input_shape: Sequence[int], stride: int, reverse: bool = False, old: bool = False, dtype=np.float32,
                name: str | None = None) -> onnx.ModelProto:
    """The ONNX model of ``[reorg3d]`` (``old=False``) or the old ``[reorg]`` on an NCHW input: ``SpaceToDepth`` or
    ``DepthToSpace`` (DCR), between the Reshapes by which Darknet reinterprets the buffer. Refuses what the
    reference refuses (spec/reorg.md#errors)."""
    variant = reorg.REORG_OLD if old else reorg.REORG3D
    plan = reorg.plan(variant, tuple(input_shape), stride, reverse)
    b, c, h, w = plan.in_shape
    s, ss = plan.stride, plan.stride * plan.stride
    g = _Graph(dtype)
    if not old and not reverse:  # space to depth
        out = g.op("SpaceToDepth", "x", blocksize=s)
    elif old and reverse:  # depth to space: the inverse of [reorg3d] reverse=0
        out = g.op("DepthToSpace", "x", blocksize=s, mode="DCR")
    elif old:  # the buffer read as (C/s², H·s, W·s), space to depth, read as (C·s², H/s, W/s)
        large = g.op("Reshape", "x", g.int64([b, c // ss, h * s, w * s]))
        out = g.op("Reshape", g.op("SpaceToDepth", large, blocksize=s), g.int64(list(plan.out_shape)))
    else:  # [reorg3d] reverse=1: the buffer read as (C/s², H·s, W·s), depth to space, read as the output
        small = g.op("Reshape", "x", g.int64([b, c // ss, h * s, w * s]))
        out = g.op("Reshape", g.op("DepthToSpace", small, blocksize=s, mode="DCR"), g.int64(list(plan.out_shape)))
    return g.model(name or variant, {"x": plan.in_shape}, out, plan.out_shape)


# --- a whole cfg ------------------------------------------------------------------------------------------------


def cfg_models(cfg_text: str, weights: dict[int, np.ndarray] | None = None,
               dialect: Dialect | str = Dialect.DARKNET_INFERENCE, library: str = "alexeyab", batch: int | None = None,
               dtype=np.float32) -> dict[int, onnx.ModelProto]:
    """One model per ``[shortcut]``, ``[reorg3d]`` and ``[reorg]`` of a cfg, by layer index, with the shapes the
    cfg gives them. ``weights`` maps a shortcut's layer index to its flat weights (from the model's .weights file);
    a weighted shortcut without an entry gets Darknet's initial weights (all 1)."""
    network = parse_network(cfg_text, library)
    batch = batch or network.batch
    weights = weights or {}
    models = {}
    for layer in network.layers:
        if isinstance(layer.op, ReorgSection):
            models[layer.index] = reorg_model((batch, *layer.input_shape), layer.op.stride, layer.op.reverse,
                                              layer.op.old, dtype, name=f"layer{layer.index}_{layer.type}")
        elif layer.type == "shortcut":
            op = layer.shortcut
            shapes = [(batch, *layer.input_shape)] + [(batch, *network.layers[i].output_shape)
                                                      for i in op.from_layers]
            count = weight_count(op.params.weights_type, len(op.from_layers), layer.input_shape[0])
            layer_weights = weights.get(layer.index, np.ones(count, dtype=dtype)) if count else None
            models[layer.index] = shortcut_model(op.params, shapes, layer_weights, dialect, dtype,
                                                 name=f"layer{layer.index}_shortcut")
    return models
