"""The PyTorch backend and modules: conformance, autograd, Darknet gradients, weights loading, update."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs PyTorch (pip install darkspec[oracles])")

from darkspec.backends import torch_backend  # noqa: E402
from darkspec.backends.torch_backend import (  # noqa: E402
    FORWARD,
    Reorg3d,
    ReorgOld,
    TorchBackend,
    WeightedShortcut,
    darknet_update_,
    forward_of,
    in_place_of,
)
from darkspec.conformance.compare import Tolerance, compare  # noqa: E402
from darkspec.conformance.report import cell  # noqa: E402
from darkspec.conformance.suite import run_suite  # noqa: E402
from darkspec.errors import DarkspecError  # noqa: E402
from darkspec.reference import reorg, shortcut  # noqa: E402
from darkspec.reference.dialects import Dialect  # noqa: E402
from darkspec.reference.shortcut import ShortcutParams, UpdateParams  # noqa: E402

from conftest import GOLDEN  # noqa: E402


def test_the_cpu_backend_passes_everything_it_declares():
    report = run_suite(TorchBackend(), "ci", [GOLDEN])
    declared = {c.label() for c in TorchBackend().capabilities()}
    assert not report.failed, [r.first_failure for r in report.results if not r.passed]
    assert all(cell(report, label).startswith("pass") for label in declared)
    assert all(cell(report, label, refusals=True).startswith("pass") for label in declared)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is checked on a GPU only")
def test_the_cuda_backend_passes_everything_it_declares():
    backend = TorchBackend("cuda")
    assert not run_suite(backend, "ci", [GOLDEN]).failed


def random_inputs(seed=0, dtype=torch.float64, from_channels=(5, 2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=dtype)
    froms = [torch.randn(2, c, 2, 2, generator=g, dtype=dtype) for c in from_channels]
    return x, froms


@pytest.mark.parametrize("normalization", ["none", "relu", "softmax"])
def test_exact_dialect_is_plain_autograd_and_passes_gradcheck(normalization):
    x, froms = random_inputs()
    module = WeightedShortcut(2, 3, "per_channel", normalization, "logistic", "exact").double()
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.3, 1.7, 9, dtype=torch.float64))  # away from relu's kink and ties
    inputs = [t.requires_grad_() for t in (x, *froms)]
    assert torch.autograd.gradcheck(lambda *a: module(*a), inputs)
    weight = module.weight.detach().clone().requires_grad_()

    def of_weight(w):
        return shortcut_forward_with(module, w, x, froms)

    assert torch.autograd.gradcheck(of_weight, (weight,))


def shortcut_forward_with(module, weight, x, froms):
    settings = module.settings()
    return FORWARD[module.params.activation](settings.pre_activation(weight, x.detach(), [f.detach() for f in froms]))


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-gpu"])
def test_darknet_dialects_give_the_reference_surrogate_as_minus_the_weight_gradient(dialect):
    x, froms = random_inputs(dtype=torch.float64)
    module = WeightedShortcut(2, 3, "per_feature", "softmax", "leaky", dialect).double()
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, *froms)]
    module(*inputs).backward(-delta)  # Darknet's delta is minus the gradient
    params = ShortcutParams("per_feature", "softmax", "leaky")
    expected = shortcut.backward(x.numpy(), [f.numpy() for f in froms], module.weight.detach().numpy(),
                                 delta.numpy(), params, dialect)
    np.testing.assert_allclose(-module.weight.grad.numpy(), expected.weight_updates, rtol=1e-12, atol=1e-12)
    for got, want in zip(inputs, expected.input_deltas):
        np.testing.assert_allclose(-got.grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_preallocated_output_matches_and_is_refused_under_autograd():
    x, froms = random_inputs(dtype=torch.float32)
    module = WeightedShortcut(2, 3, "per_channel", "relu", "relu")
    out = torch.empty_like(x)
    with torch.no_grad():
        expected = module(x, *froms)
        assert module(x, *froms, out=out) is out
    assert torch.equal(out, expected)
    with pytest.raises(DarkspecError) as raised:
        module(x, *froms, out=out)
    assert raised.value.code == "out-with-autograd"


def test_load_darknet_weights_reads_the_flat_block_in_darknet_layout():
    a = WeightedShortcut(2, 3, "per_channel", "softmax")
    b = WeightedShortcut(1, 3, "per_feature", "relu")
    none = WeightedShortcut(1, 3)
    block = np.arange(11, dtype="<f4").tobytes()  # 9 values for a, 2 for b, nothing for the unweighted layer
    offset = a.load_darknet_weights(block)
    offset = none.load_darknet_weights(block, offset)
    assert b.load_darknet_weights(block, offset) == 11
    assert a.weight.tolist() == list(range(9)) and b.weight.tolist() == [9.0, 10.0]
    with pytest.raises(DarkspecError) as raised:
        b.load_darknet_weights(block, 10)
    assert raised.value.code == "weights-size"


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-gpu", "exact"])
def test_update_function_follows_the_reference(dialect):
    rng = np.random.default_rng(3)
    weights = rng.standard_normal(6).astype(np.float32)
    updates = (4 * rng.standard_normal(6)).astype(np.float32)
    hyper = UpdateParams(learning_rate=0.01, momentum=0.9, decay=0.0005, batch=8)
    w, wu = torch.from_numpy(weights.copy()), torch.from_numpy(updates.copy())
    darknet_update_(w, wu, hyper, dialect)
    expected_w, expected_wu = shortcut.update(weights, updates, hyper, dialect)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-6)
    np.testing.assert_allclose(wu.numpy(), expected_wu, rtol=1e-6)


@pytest.mark.parametrize("module, forward, backward, shape, reverse", [
    (Reorg3d, reorg.reorg3d_forward, reorg.reorg3d_backward, (2, 3, 4, 6), False),
    (Reorg3d, reorg.reorg3d_forward, reorg.reorg3d_backward, (1, 32, 2, 1), True),
    (ReorgOld, reorg.reorg_old_forward, reorg.reorg_old_backward, (2, 8, 4, 2), False),
    (ReorgOld, reorg.reorg_old_forward, reorg.reorg_old_backward, (1, 4, 2, 2), True),
])
def test_reorg_modules_are_the_reference_permutations_both_ways(module, forward, backward, shape, reverse):
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape).requires_grad_()
    y = module(2, reverse)(x)
    assert np.array_equal(y.detach().numpy(), forward(x.detach().numpy(), 2, reverse))
    grad = torch.randn(y.shape)
    y.backward(grad)
    assert np.array_equal(x.grad.numpy(), backward(grad.numpy(), 2, reverse))


def test_unevaluated_activations_are_refused_with_the_specs_code():
    with pytest.raises(DarkspecError) as raised:
        WeightedShortcut(1, 3, activation="hard_mish")
    assert raised.value.code == "activation-not-evaluated"


@pytest.mark.parametrize("activation", ["gelu", "swish", "mish"])
def test_exact_float32_activation_derivatives_do_not_cancel(activation):
    """At x = 4.94 float32 autograd of gelu takes 1 - sigmoid(2u) ~ 1e-6 and multiplies its rounding by ~34: the
    derivative was 14 ε off, outside 4·ε·M (found by the conformance suite's exact/float32/backward draws)."""
    from darkspec.conformance.compare import compare, largest_magnitude, tolerance_for

    x = np.full((1, 1, 1, 1), 4.9417696, np.float32)
    froms = [np.zeros_like(x)]
    delta = np.full_like(x, -2.0184114)
    params = ShortcutParams(activation=activation)
    expected = shortcut.backward(x, froms, None, delta, params, "exact")
    actual = TorchBackend().shortcut_backward(x, froms, None, delta, params=params, dialect="exact")
    tolerance = tolerance_for(np.float32, largest_magnitude(x, delta, expected.delta))
    assert compare("delta", expected.delta, actual.delta, tolerance).passed


def test_a_quirk_it_cannot_reproduce_is_refused():
    # Darknet's bug asked for and silently not reproduced would be a wrong answer: refused instead.
    x = np.ones((1, 2, 2, 2), np.float32)
    with pytest.raises(DarkspecError) as raised:
        TorchBackend().shortcut_forward(x, [x], None, params=ShortcutParams(activation="relu6"), dialect="darknet-cpu",
                                        quirks=["cpu-relu6-zero"])
    assert raised.value.code == "quirk-not-reproduced"
    with pytest.raises(DarkspecError) as raised:
        TorchBackend().shortcut_forward(x, [x], None, params=ShortcutParams(), dialect="darknet-cpu",
                                        quirks=["no-such-quirk"])
    assert raised.value.code == "unknown-quirk"


# --- the blocked passes compute what the plain formulas compute, bit for bit ------------------------------------------

SPECIAL = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 1.0, -1.0, 6.0, 4.0,
                        -4.0, 0.5, 2.5, 3.0, -2.5])


@pytest.mark.parametrize("name", sorted(FORWARD))
@pytest.mark.parametrize("dialect", [Dialect.DARKNET_CPU, Dialect.PJREDDIE])
def test_each_in_place_activation_has_the_bits_of_its_formula(name, dialect):
    values = torch.cat([SPECIAL, torch.randn(4096, generator=torch.Generator().manual_seed(5)) * 8])
    for dtype in (torch.float32, torch.float64):
        x = values.to(dtype)
        expected = forward_of(name, dialect)(x.clone())
        got = in_place_of(name, dialect)(x.clone())
        nan = expected.isnan()
        assert torch.equal(got.isnan(), nan), name
        assert torch.equal(got[~nan], expected[~nan]), name
        assert torch.equal(torch.signbit(got[~nan]), torch.signbit(expected[~nan])), name


PIECEWISE_LINEAR = ("linear", "leaky", "relu6")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 40 elements: every input below spans many blocks, within and across channel planes."""
    monkeypatch.setattr(torch_backend, "BLOCK_ELEMENTS", 40)


@pytest.mark.parametrize("weights_type, normalization", [("none", "none"), ("per_feature", "relu"),
                                                         ("per_channel", "softmax")])
@pytest.mark.parametrize("activation", ["linear", "leaky", "mish", "logistic", "relu6"])
def test_the_blocked_forward_is_the_plain_formula(small_blocks, weights_type, normalization, activation):
    x = torch.randn(2, 3, 5, 3, generator=torch.Generator().manual_seed(2))
    froms = [torch.randn(2, c, 5, 3, generator=torch.Generator().manual_seed(c)) for c in (5, 2, 3)]
    module = WeightedShortcut(3, 3, weights_type, normalization, activation)
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-0.5, 1.5, module.weight.numel()))
    settings = module.settings()
    expected = FORWARD[activation](settings.pre_activation(module.weight, x, froms)).detach()
    with torch.no_grad():
        plain = module(x, *froms)
        out = torch.empty_like(x)
        assert module(x, *froms, out=out) is out
    for got in (plain, out, module(x, *froms).detach()):  # the last through the autograd function
        if activation in PIECEWISE_LINEAR:
            assert torch.equal(got, expected)
        else:  # a transcendental one rounds by vector lane or scalar tail, which block boundaries move: the
            # conformance tolerance (4 ulp, spec/tolerances.md)
            comparison = compare("output", expected.numpy(), got.numpy(), Tolerance(ulps=4))
            assert comparison.passed, comparison.describe()


@pytest.mark.parametrize("dialect", ["darknet-cpu", "darknet-gpu"])
@pytest.mark.parametrize("weights_type, normalization, activation", [
    ("none", "none", "linear"), ("none", "none", "mish"), ("per_feature", "relu", "leaky"),
    ("per_channel", "softmax", "logistic"), ("per_channel", "none", "swish")])
def test_the_blocked_backward_is_the_reference_and_deterministic(small_blocks, dialect, weights_type, normalization,
                                                                 activation):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 3, generator=generator, dtype=torch.float64)
    froms = [torch.randn(2, c, 5, 3, generator=generator, dtype=torch.float64) for c in (5, 2)]
    delta = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    module = WeightedShortcut(2, 3, weights_type, normalization, activation, dialect).double()
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-0.5, 1.5, module.weight.numel(), dtype=torch.float64))
    inputs = [t.clone().requires_grad_() for t in (x, *froms)]
    leaves = inputs + ([module.weight] if module.weight is not None else [])
    out = module(*inputs)
    first = torch.autograd.grad(out, leaves, delta, retain_graph=True)
    again = torch.autograd.grad(out, leaves, delta)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    params = ShortcutParams(weights_type, normalization, activation)
    weights = None if module.weight is None else module.weight.detach().numpy()
    expected = shortcut.backward(x.numpy(), [f.numpy() for f in froms], weights, delta.numpy(), params, dialect)
    for got, want in zip(first, expected.input_deltas):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    if weights is not None:
        np.testing.assert_allclose(first[-1].numpy(), expected.weight_updates, rtol=1e-12, atol=1e-12)


def test_blocks_cover_the_tensor_once_in_order(small_blocks):
    for shape in ((1, 3, 2, 2), (4, 2, 2, 2), (2, 3, 5, 3), (3, 100, 1, 1), (1, 2, 9, 9)):
        covered = torch.zeros(shape, dtype=torch.int64)
        for batch, start, end in torch_backend.blocks(shape):
            covered[batch, start:end] += 1
        assert torch.equal(covered, torch.ones_like(covered)), shape
