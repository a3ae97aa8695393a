"""What is timed in a case besides the memory copy: the backends, and the baselines measured like for like.

Every contender of a case is called the same way: a [shortcut] forward writes into a preallocated output; a
backward is the gradient of every input (and of the weights) from the output's gradient, on an autograd graph built
once per input set, into new tensors; an update changes the weights and the accumulator in place; a reorg returns a
new tensor. Baselines (torch importable):

- ``torch eager``: the obvious PyTorch formula (``x*w0 + a*w1 + ...`` with the normalized weights, then the
  activation; ``reshape``/``permute`` for the reorgs; three in-place ops for the update); its backward is autograd.
- ``torch.compile``: the same function under ``torch.compile`` (inductor), compiled once per case; its compile time
  is reported apart.
- ``darknet``: the functions of a pjreddie libdarknet.so, in this process through ctypes, where the library has the
  op: ``copy_cpu`` + ``shortcut_cpu`` + ``activate_array`` (its forward_shortcut_layer) and ``reorg_cpu``.

A baseline computes the ``exact`` dialect (autograd's true gradient); a backend is measured in the first dialect it
declares of ``SHORTCUT_DIALECTS``. Each contender's result is checked against the reference in its dialect before
it is timed (darkspec.bench.matrix).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import numpy as np

from darkspec.backends.base import OpCase
from darkspec.bench.cases import UPDATE, Case
from darkspec.bench.timing import CPU_TIMER, Contender, timer_for
from darkspec.reference import reorg
from darkspec.reference.contract import NORMALIZATION_EPS, REORG_DIALECT
from darkspec.reference.shortcut import ShortcutGradients, ShortcutParams

TORCH_EAGER, TORCH_COMPILE, DARKNET = "torch eager", "torch.compile", "libdarknet"
#: The [shortcut] dialect a backend is measured in: the first of these it declares for the op, pass and dtype.
SHORTCUT_DIALECTS = ("darknet-cpu", "darknet-gpu", "exact", "darknet-inference")
BASELINE_DIALECT = "exact"


def import_torch():
    """torch, or None where it is not importable."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install is "not importable" too
        return None
    return torch


def params_of(case: Case) -> ShortcutParams:
    return ShortcutParams(case.weights_type, case.normalization, case.activation)


def named(result, pass_: str) -> dict:
    """A result of the NumPy API (an array, ShortcutGradients or an update's pair) as named arrays."""
    if isinstance(result, ShortcutGradients):
        arrays = {f"input_deltas[{k}]": np.asarray(d) for k, d in enumerate(result.input_deltas)}
        if result.delta is not None:
            arrays["delta"] = np.asarray(result.delta)
        if result.weight_updates is not None:
            arrays["weight_updates"] = np.asarray(result.weight_updates)
        return arrays
    if pass_ == "update":
        return {"weights": np.asarray(result[0]), "weight_updates": np.asarray(result[1])}
    return {"output": np.asarray(result)}


# --- backends ----------------------------------------------------------------------------------------------------


def capability_for(backend, case: Case, dtype: str, shape=None):
    """The capability the backend declares for the case, unless it names the case a known difference (a result
    that differs from the reference by the backend's own account is not timed)."""
    dialects = SHORTCUT_DIALECTS if case.op == "shortcut" else (REORG_DIALECT,)
    for dialect in dialects:
        found = backend.declared(case.op, dialect, dtype, case.pass_)
        if found and not backend.known_difference(op_case(case, dialect, shape)):
            return found
    return None


def op_case(case: Case, dialect: str, shape) -> OpCase:
    """The case as a backend's :class:`OpCase`: every input of the same NCHW shape."""
    if case.op != "shortcut":
        return OpCase(case.op, dialect, input_shapes=(shape,), stride=case.stride, reverse=case.reverse)
    return OpCase("shortcut", dialect, params_of(case), (shape,) * (case.n_from + 1))


def numpy_call(backend, case: Case, dialect: str, inputs: dict):
    """The backend's op through its NumPy API on one input set."""
    if case.op != "shortcut":
        return lambda: backend.reorg_forward(inputs["x"], case.stride, case.reverse, case.op == "reorg")
    if case.pass_ == "update":
        return lambda: backend.shortcut_update(inputs["weights"], inputs["weight_updates"], UPDATE, dialect)
    common = dict(params=params_of(case), dialect=dialect, quirks=frozenset(), from_input_shapes=None)
    if case.pass_ == "forward":
        return lambda: backend.shortcut_forward(inputs["x"], inputs["froms"], inputs["weights"], **common)
    return lambda: backend.shortcut_backward(inputs["x"], inputs["froms"], inputs["weights"], inputs["delta"],
                                             weight_updates=inputs["weight_updates"], **common)


def settings_of(case: Case, dialect: str) -> dict:
    if case.op != "shortcut":
        return dict(stride=case.stride, reverse=case.reverse)
    if case.pass_ == "update":
        return dict(hyper=UPDATE, dialect=dialect)
    return dict(params=params_of(case), dialect=dialect)


def backend_contender(backend, case: Case, dialect: str, sets: list[dict]) -> Contender:
    """The backend's own prepared path (``Backend.prepare``) where it has one, else its NumPy API."""
    prepared = [backend.prepare(case.op, case.pass_, s, settings_of(case, dialect)) for s in sets]
    if all(prepared):
        return Contender(backend.name, "backend", timer_for(backend), run=lambda i: prepared[i].run(),
                         result=lambda i: named(prepared[i].result(), case.pass_), dialect=dialect,
                         path="own arrays (Backend.prepare)")
    calls = [numpy_call(backend, case, dialect, s) for s in sets]
    last = {}

    def run(i):
        last[i] = calls[i]()

    return Contender(backend.name, "backend", timer_for(backend), run=run,
                     result=lambda i: named(last[i], case.pass_), dialect=dialect, path="NumPy API")


# --- the PyTorch baselines ------------------------------------------------------------------------------------------


def _torch_formulas(torch):
    functional = torch.nn.functional
    activations = {"linear": lambda t: t, "leaky": lambda t: functional.leaky_relu(t, 0.1), "relu": torch.relu,
                   "mish": functional.mish, "logistic": torch.sigmoid}
    in_place = {"linear": lambda t: t, "leaky": lambda t: functional.leaky_relu_(t, 0.1), "relu": torch.relu_,
                "mish": lambda t: functional.mish(t, inplace=True), "logistic": torch.sigmoid_}
    return activations, in_place


def shortcut_formula(torch, case: Case, in_place_into=False):
    """``f(x, *froms, weights[, out])``: act(x*w0 + a*w1 + ...) with the normalized weights (x + a + ... without);
    ``in_place_into``: the last sum and the activation write into ``out``."""
    activations, in_place = _torch_formulas(torch)
    slots = case.n_from + 1

    def terms(inputs, weights):
        if weights is None:
            return list(inputs)
        table = weights.view(slots, -1)
        if case.normalization == "relu":
            phi = torch.relu(table)
            table = phi / (NORMALIZATION_EPS + phi.sum(dim=0))
        elif case.normalization == "softmax":
            phi = torch.exp(table - table.amax(dim=0))
            table = phi / (NORMALIZATION_EPS + phi.sum(dim=0))
        return [t * w.view(1, -1, 1, 1) for t, w in zip(inputs, table)]

    def into(*args):
        *inputs, weights, out = args
        parts = terms(inputs, weights)
        partial = parts[0]
        for part in parts[1:-1]:
            partial = partial + part
        return in_place[case.activation](torch.add(partial, parts[-1], out=out))

    def fresh(*args):
        *inputs, weights = args
        parts = terms(inputs, weights)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return activations[case.activation](total)

    return into if in_place_into else fresh


def reorg_formula(case: Case, shape):
    """The reorg as reshape/permute/reshape (ONNX SpaceToDepth and DepthToSpace), from the dims Darknet's
    reorg_cpu is handed: a gather (space to depth) or a scatter (depth to space) of the flat buffer."""
    layer = reorg.plan(case.op, shape, case.stride, case.reverse)
    (w, h, c), s, batch = layer.dims, layer.stride, shape[0]
    small = c // (s * s)

    def permuted(x):
        if layer.forward_flag:  # scatter: x is laid out as (b, dy, dx, c2, j, i)
            y = x.reshape(batch, s, s, small, h, w).permute(0, 3, 4, 1, 5, 2)
        else:  # gather: x is laid out as (b, c2, j, dy, i, dx)
            y = x.reshape(batch, small, h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(layer.out_shape)

    return permuted


def update_formula(torch):
    """Darknet's CPU update as three in-place ops (spec/shortcut.md#update)."""
    rate = UPDATE.learning_rate * UPDATE.learning_rate_scale / UPDATE.batch

    def step(weights, weight_updates):
        weight_updates.add_(weights, alpha=-UPDATE.decay * UPDATE.batch)
        weights.add_(weight_updates, alpha=rate)
        weight_updates.mul_(UPDATE.momentum)
        return weights, weight_updates

    return step


def _tensors(torch, inputs: dict, grad=False) -> dict:
    def t(a):
        if a is None:
            return None
        tensor = torch.from_numpy(a)
        return tensor.detach().clone().requires_grad_() if grad else tensor

    return {k: [t(a) for a in v] if isinstance(v, list) else t(v) for k, v in inputs.items()}


def torch_calls(torch, case: Case, shape, sets: list[dict], function_of) -> tuple:
    """``(run, result)`` of one PyTorch formulation on every set; ``function_of(f)`` is the identity or
    torch.compile. The tensors share memory with the NumPy sets where the call only reads them."""
    if case.op != "shortcut":
        f = function_of(reorg_formula(case, shape))
        tensors = [torch.from_numpy(s["x"]) for s in sets]
        last = {}

        def run(i):
            last[i] = f(tensors[i])

        return run, lambda i: {"output": last[i].numpy()}
    if case.pass_ == "update":
        f = function_of(update_formula(torch))
        state = [_tensors(torch, {"w": s["weights"].copy(), "u": s["weight_updates"].copy()}) for s in sets]
        return (lambda i: f(state[i]["w"], state[i]["u"]),
                lambda i: {"weights": state[i]["w"].numpy(), "weight_updates": state[i]["u"].numpy()})
    if case.pass_ == "forward":
        f = function_of(shortcut_formula(torch, case, in_place_into=True))
        tensors = [_tensors(torch, s) for s in sets]
        outs = [torch.empty_like(t["x"]) for t in tensors]
        return (lambda i: f(tensors[i]["x"], *tensors[i]["froms"], tensors[i]["weights"], outs[i]),
                lambda i: {"output": outs[i].numpy()})
    f = function_of(shortcut_formula(torch, case))
    return autograd_calls(torch, sets, lambda t: f(t["x"], *t["froms"], t["weights"]))


def autograd_calls(torch, sets: list[dict], forward) -> tuple:
    """``(run, result)`` of a backward: the graph of ``forward(tensors)`` built once per set, then every run asks
    autograd for the gradient of each input and of the weights with the set's delta as the output's gradient (the
    delta is -dL/dy, so these are Darknet's input deltas and what it adds to weight_updates)."""
    graphs, last = [], {}
    for s in sets:
        t = _tensors(torch, s, grad=True)
        leaves = [t["x"], *t["froms"]] + ([t["weights"]] if t["weights"] is not None else [])
        graphs.append((forward(t), leaves, torch.from_numpy(s["delta"])))

    def run(i):
        out, leaves, delta = graphs[i]
        last[i] = torch.autograd.grad(out, leaves, delta, retain_graph=True)

    def result(i):
        grads, inputs = last[i], len(sets[i]["froms"]) + 1
        arrays = {f"input_deltas[{k}]": grads[k].numpy() for k in range(inputs)}
        if sets[i]["weights"] is not None:
            arrays["weight_updates"] = sets[i]["weight_updates"] + grads[inputs].numpy()
        return arrays

    return run, result


def torch_baselines(torch, case: Case, shape, sets: list[dict], compile_baseline: bool) -> list[Contender]:
    contenders = []
    kinds = [(TORCH_EAGER, lambda f: f)]
    if compile_baseline:
        kinds.append((TORCH_COMPILE, lambda f: torch.compile(f, dynamic=False)))
    for name, function_of in kinds:
        run, result = torch_calls(torch, case, shape, sets, function_of)
        contenders.append(Contender(name, "baseline", CPU_TIMER, run=run, result=result,
                                    dialect=BASELINE_DIALECT, path="torch tensors"))
    return contenders


# --- Darknet's own functions -----------------------------------------------------------------------------------------


class DarknetFunctions:
    """pjreddie's blas and activation functions of a libdarknet.so, in this process (they only read and write the
    buffers they are handed). None of this is built or shipped here: the library is the user's (Debian's package)."""

    ACTIVATIONS = ("linear", "leaky", "relu", "logistic")

    def __init__(self):
        from darkspec.backends.darknet import find_header, find_library
        from darkspec.backends.darknet_worker import Header, api_of

        library, why = find_library()
        header, why_header = find_header(library) if library else (None, why)
        if library is None or header is None:
            raise OSError(why or why_header)
        self.lib = _load_keeping_the_float_environment(library)
        if api_of(self.lib) != "pjreddie":
            raise OSError(f"{library} is not pjreddie's Darknet: its shortcut_cpu has another signature")
        self.header = Header.read(header.read_text(errors="replace"))
        self.version = f"libdarknet.so ({library})"

    def activation(self, name: str) -> int:
        return self.header.value("ACTIVATION", name.upper())

    def contender(self, case: Case, shape, dtype: str, sets: list[dict]) -> Contender | None:
        """Darknet's forward of this case, or None where the library has no such op."""
        if dtype != "float32" or case.pass_ != "forward":
            return None
        p = ctypes.c_void_p
        if case.op == "shortcut":
            if case.n_from != 1 or case.weights_type != "none" or case.activation not in self.ACTIVATIONS:
                return None
            batch, c, h, w = shape
            n, act = int(np.prod(shape)), self.activation(case.activation)
            outs = [np.empty(shape, np.float32) for _ in sets]
            one = ctypes.c_float(1.0)

            def run(i):  # pjreddie's forward_shortcut_layer
                x, add, out = sets[i]["x"], sets[i]["froms"][0], outs[i]
                self.lib.copy_cpu(n, p(x.ctypes.data), 1, p(out.ctypes.data), 1)
                self.lib.shortcut_cpu(batch, w, h, c, p(add.ctypes.data), w, h, c, one, one, p(out.ctypes.data))
                self.lib.activate_array(p(out.ctypes.data), n, act)
        else:
            layer = reorg.plan(case.op, shape, case.stride, case.reverse)
            (w, h, c), flag = layer.dims, int(layer.forward_flag)
            outs = [np.empty(layer.out_shape, np.float32) for _ in sets]

            def run(i):
                self.lib.reorg_cpu(p(sets[i]["x"].ctypes.data), w, h, c, shape[0], case.stride, flag,
                                   p(outs[i].ctypes.data))
        return Contender(DARKNET, "baseline", CPU_TIMER, run=run, result=lambda i: {"output": outs[i]},
                         dialect="darknet-cpu", path="libdarknet.so through ctypes", threads=1)


def _load_keeping_the_float_environment(library):
    """The library, loaded with the floating-point environment it found: a libdarknet.so built with -Ofast sets
    flush-to-zero and denormals-are-zero for the whole thread when it is loaded (crtfastmath), which would change
    every later result in this process."""
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    environment = ctypes.create_string_buffer(256)  # at least sizeof(fenv_t)
    libm.fegetenv(environment)
    try:
        return ctypes.CDLL(str(library), mode=ctypes.DEFAULT_MODE | getattr(os, "RTLD_DEEPBIND", 0))
    finally:
        libm.fesetenv(environment)


def load_darknet():
    """(DarknetFunctions, None), or (None, why not)."""
    try:
        return DarknetFunctions(), None
    except (OSError, ImportError, AttributeError, KeyError) as error:
        return None, str(error)


def compiled_module_cache_reset(torch) -> None:
    """Every case compiles afresh: dynamo's per-function cache would otherwise fill up and fall back to eager (a
    backend's compiled modules then compile again at their first call of the case, which is not timed)."""
    if torch is not None and "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
