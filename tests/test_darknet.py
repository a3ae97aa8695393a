"""The darknet backend: real Darknet through ctypes, against its own recordings, the reference and darkspec's parser.

Tests that need a library skip, saying why, where none is found; CI installs Debian's package ``darknet``
(pjreddie's 2018 Darknet), so there they run. The AlexeyAB tests run where DARKSPEC_DARKNET_LIB names an AlexeyAB
build of libdarknet.so (with its include/darknet.h beside it).
"""

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkspec.backends import darknet as darknet_module
from darkspec.backends.darknet import DarknetBackend, DarknetCrashed, DarknetRefused
from darkspec.conformance.guard import GuardedBackend
from darkspec.conformance.suite import run_refusals
from darkspec.backends.darknet_worker import Header
from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance import recordings as rec
from darkspec.conformance import strategies
from darkspec.conformance.compare import Tolerance, compare, largest_magnitude, tolerance_for
from darkspec.conformance.vectors import FAIL, PASS, replay, run_vectors
from darkspec.errors import DarkspecError
from darkspec.reference import activations, shortcut
from darkspec.reference.cfg import DELIBERATE_DIFFERENCES
from darkspec.reference.network import parse_network
from darkspec.reference.shortcut import ShortcutParams

from conftest import GOLDEN

VECTORS = GOLDEN / "darknet-vectors"
REFERENCE = ReferenceBackend()
#: Each example is a case in its own Darknet process (a fork: milliseconds each).
FEW = settings(max_examples=30, deadline=None)


@pytest.fixture(scope="module")
def darknet():
    backend = DarknetBackend()
    reason = backend.availability()
    if reason:
        pytest.skip(f"no usable libdarknet.so: {reason}")
    return backend


HOW_TO_GET = {"pjreddie": "apt-get install darknet",
              "alexeyab": f"set {darknet_module.ENV_LIBRARY} to an AlexeyAB libdarknet.so"}


def _library_of(api: str, *candidates: DarknetBackend) -> DarknetBackend:
    for backend in candidates:
        if backend.locate().api == api:
            return backend
    found = "; ".join(backend.availability() or backend.version() for backend in candidates)
    pytest.skip(f"needs {api}'s Darknet ({HOW_TO_GET[api]}); found: {found}")


@pytest.fixture(scope="module")
def pjreddie():
    """The library found, or Debian's package where DARKSPEC_DARKNET_LIB names another Darknet."""
    return _library_of("pjreddie", DarknetBackend(), DarknetBackend(darknet_module.DEBIAN_LIBRARY))


@pytest.fixture(scope="module")
def alexeyab():
    return _library_of("alexeyab", DarknetBackend())


def _shortcut_dialect(backend) -> str:
    return next(c.dialect for c in backend.capabilities() if c.op == "shortcut")


def _expect_close(name, expected, actual, *inputs):
    tolerance = tolerance_for(np.float32, largest_magnitude(*inputs, expected))
    comparison = compare(name, expected, actual, tolerance)
    assert comparison.passed, comparison.describe()


# --- finding the library and its layouts (no library needed) -----------------------------------------------------


def test_without_a_library_the_backend_constructs_and_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv(darknet_module.ENV_LIBRARY, raising=False)
    monkeypatch.setattr(darknet_module, "DEBIAN_LIBRARY", tmp_path / "libdarknet.so")
    backend = DarknetBackend()
    assert "apt-get install darknet" in backend.availability()
    assert darknet_module.ENV_LIBRARY in backend.availability()
    assert backend.capabilities() == frozenset() and backend.version() == "unavailable"

    monkeypatch.setenv(darknet_module.ENV_LIBRARY, str(tmp_path / "nowhere.so"))
    assert "nowhere.so" in DarknetBackend().availability()


def test_a_library_without_its_header_is_unavailable(monkeypatch, tmp_path):
    (tmp_path / "libdarknet.so").write_bytes(b"")
    monkeypatch.setenv(darknet_module.ENV_LIBRARY, str(tmp_path / "libdarknet.so"))
    monkeypatch.delenv(darknet_module.ENV_HEADER, raising=False)
    reason = DarknetBackend().availability()
    assert "no darknet.h" in reason and darknet_module.ENV_HEADER in reason


HEADER = """
typedef enum { ALPHA, BETA, GAMMA } KIND;
typedef struct { int rows, cols; float **vals; } matrix;  /* a block comment */
struct network;
struct item {
    KIND kind;
    void (*run)(struct item, struct network);   // a function pointer
    int h,w, c;
    float * data, *delta;
    matrix m;
    size_t bytes;
#ifdef GPU
    float *data_gpu;
#endif
#ifdef CUDNN
    cudnnTensorDescriptor_t desc;
#else
    void* desc;
#endif
#ifndef NOT_DEFINED
    double last;
#endif
};
"""


def test_a_header_becomes_ctypes_layouts_of_a_cpu_build():
    header = Header.read(HEADER)
    item = header.struct("item")
    assert [name for name, _ in item._fields_] == ["kind", "run", "h", "w", "c", "data", "delta", "m", "bytes",
                                                   "desc", "last"]
    types = dict(item._fields_)
    assert types["kind"] is ctypes.c_int and types["run"] is ctypes.c_void_p and types["delta"] is ctypes.c_void_p
    assert types["m"] is header.struct("matrix") and types["bytes"] is ctypes.c_size_t
    assert header.value("KIND", "GAMMA") == 2 and header.name("KIND", 1) == "BETA"


# --- the layout check --------------------------------------------------------------------------------------------


def test_a_header_that_does_not_match_the_library_is_refused(darknet, monkeypatch, tmp_path):
    text = darknet.locate().header.read_text()
    monkeypatch.setenv(darknet_module.ENV_HEADER, str(tmp_path / "darknet.h"))
    (tmp_path / "darknet.h").write_text(text.replace("int batch_normalize;", "", 1))
    reason = DarknetBackend().availability()
    assert "do not match" in reason and "layer 0" in reason
    assert DarknetBackend().capabilities() == frozenset()

    (tmp_path / "darknet.h").write_text(text.replace("int batch_normalize;", "weird_t batch_normalize;", 1))
    assert "unknown type 'weird_t'" in DarknetBackend().availability()


# --- pjreddie's Darknet: recordings, reference, cfgs -------------------------------------------------------------


def test_pjreddie_declares_its_shortcut_and_the_old_reorg(pjreddie):
    assert {c.label() for c in pjreddie.capabilities()} == {
        "shortcut/pjreddie/forward", "shortcut/pjreddie/backward", "reorg/darknet/forward", "reorg/darknet/backward"}
    assert {c.dtype for c in pjreddie.capabilities()} == {"float32"} and pjreddie.quirks() == frozenset()


def test_the_pjreddie_recordings_rerun_live_and_match(pjreddie, capsys):
    """The library the recordings came from gives their arrays again, bit for bit."""
    status = run_vectors([VECTORS / "darknet-pjreddie"], pjreddie)
    lines = capsys.readouterr().out.splitlines()
    cases = len(list((VECTORS / "darknet-pjreddie").glob("*.npz")))
    assert status == 0, "\n".join(line for line in lines if " FAIL " in line)
    assert lines[-1] == f"{cases} passed, 0 failed, 0 skipped"
    assert all(line.endswith("abs 0 rel 0 ulp 0") for line in lines if " worst " in line)


PJREDDIE_CASES = st.sampled_from(activations.PJREDDIE_NAMES).flatmap(
    lambda name: strategies.pjreddie_cases(dtype=np.float32, activation=name))


@FEW
@given(case=PJREDDIE_CASES)
def test_pjreddie_shortcut_matches_the_reference(pjreddie, case):
    """Two inputs with alpha and beta, unequal channels, from layers of the output's size, twice it or half it."""
    settings_ = dict(params=case.params, dialect="pjreddie")
    _expect_close("output", REFERENCE.shortcut_forward(case.x, case.froms, None, **settings_),
                  pjreddie.shortcut_forward(case.x, case.froms, None, **settings_), case.x, *case.froms)
    expected = REFERENCE.shortcut_backward(case.x, case.froms, None, case.delta, **settings_)
    actual = pjreddie.shortcut_backward(case.x, case.froms, None, case.delta, **settings_)
    magnitude = (case.x, *case.froms, case.delta, expected.delta, *expected.input_deltas)
    _expect_close("delta_after_gradient", expected.delta, actual.delta, *magnitude)
    for i, (e, a) in enumerate(zip(expected.input_deltas, actual.input_deltas, strict=True)):
        _expect_close(f"input_deltas[{i}]", e, a, *magnitude)
    assert actual.weight_updates is None


@FEW
@given(case=strategies.reorg_cases(old=True, dtype=np.float32))
def test_the_old_reorg_matches_the_reference_bit_for_bit(darknet, case):
    _expect_reorg_bit_exact(darknet, case, old=True)


def _expect_reorg_bit_exact(backend, case, old):
    forward = backend.reorg_forward(case.x, case.stride, case.reverse, old=old)
    assert compare("output", REFERENCE.reorg_forward(case.x, case.stride, case.reverse, old=old), forward,
                   Tolerance.exact()).passed
    args = (case.delta, case.stride, case.reverse, old, case.previous_delta)
    assert compare("dx", REFERENCE.reorg_backward(*args), backend.reorg_backward(*args), Tolerance.exact()).passed


NET = "[net]\nbatch=2\nsubdivisions=1\nwidth=4\nheight=4\nchannels=2\n"


def _conv(filters: int, stride: int = 1) -> str:
    return f"[convolutional]\nfilters={filters}\nsize=1\nstride={stride}\npad=0\nactivation=linear\n"


#: cfgs beside the recordings' own: channel counts [reorg] cannot handle, a spatial ratio pjreddie asserts on, and
#: texts Darknet reads leniently where darkspec refuses.
CFGS = {
    "reorg_channels_below_stride2": NET + _conv(2) + "[reorg]\nstride=2\n",
    "reorg_reverse_channels_below_stride2": NET + _conv(2) + "[reorg]\nstride=2\nreverse=1\n",
    "reorg_stride3": "[net]\nbatch=1\nwidth=6\nheight=3\nchannels=9\n" + _conv(9) + "[reorg]\nstride=3\n",
    "shortcut_unequal_spatial_ratios": "[net]\nbatch=1\nwidth=4\nheight=3\nchannels=2\n" + _conv(2) + _conv(2, 2)
    + "[shortcut]\nfrom=-2\n",
    "shortcut_after_upsample": NET + _conv(3, 2) + "[upsample]\nstride=2\n" + _conv(2) + "[shortcut]\nfrom=-3\n",
    "shortcut_key_without_value": NET + _conv(2) + _conv(2) + "[shortcut]\nfrom=-2\nactivation\n",
    "shortcut_from_given_twice": NET + _conv(2) + _conv(2) + "[shortcut]\nfrom=-2\nfrom=-1\n",
    "shortcut_from_not_an_integer": NET + _conv(2) + _conv(2) + "[shortcut]\nfrom=-2x\n",
    "no_net_section": _conv(2) + _conv(2) + "[shortcut]\nfrom=-2\n",
}
PJREDDIE_CFGS = [pytest.param(r.cfg, id=r.name) for r in rec.iter_recordings(VECTORS / "darknet-pjreddie")]
PJREDDIE_CFGS += [pytest.param(text, id=name) for name, text in CFGS.items()]
PJREDDIE_CFGS.append(pytest.param(NET + _conv(2) + "[reorg3d]\nstride=2\n", id="reorg3d_section"))


def _darknet_verdict(backend, text):
    try:
        return backend.run_cfg(text), None
    except DarknetCrashed as crash:
        return None, crash


@pytest.mark.parametrize("text", PJREDDIE_CFGS)
def test_darkspec_and_pjreddie_accept_and_refuse_the_same_cfgs(pjreddie, text):
    """Darknet runs a cfg when its parser reads it and the last layer's forward and backward finish."""
    layers, stopped = _darknet_verdict(pjreddie, text)
    try:
        network = parse_network(text, "pjreddie")
    except DarkspecError as error:
        assert stopped or error.code in DELIBERATE_DIFFERENCES, f"Darknet runs it; darkspec refuses: {error}"
        return
    if stopped:
        assert network.deviations, f"darkspec accepts it; Darknet stopped: {stopped}"
        return
    shapes = [(row["out_c"], row["out_h"], row["out_w"]) for row in layers]
    assert shapes == [layer.output_shape for layer in network.layers]
    assert {row["batch"] for row in layers} == {network.batch}


# --- what a failed case raises -----------------------------------------------------------------------------------


def unchecked(backend: DarknetBackend) -> DarknetBackend:
    """The same library without darkspec's checks in front: Darknet itself meets the bad input."""
    return DarknetBackend(backend.locate().library, checked=False)


def test_a_crash_in_a_pass_is_a_failure_with_the_signal(darknet):
    x = np.ones((1, 2, 4, 4), np.float32)  # [reorg] stride=2 divides by C / stride**2 = 0
    with pytest.raises(DarkspecError) as refused:
        darknet.reorg_forward(x, 2, False, old=True)
    assert refused.value.code == "reorg-old-channels"  # checked: the spec's refusal, before Darknet runs
    with pytest.raises(DarknetCrashed) as raised:
        unchecked(darknet).reorg_forward(x, 2, False, old=True)
    crash = raised.value
    assert crash.stage == "forward" and crash.signal == "SIGFPE" and not isinstance(crash, DarkspecError)
    assert "SIGFPE" in str(crash) and "reorg" in crash.output_tail
    assert darknet.reorg_forward(np.ones((1, 4, 4, 4), np.float32), 2, False, old=True).shape == (1, 16, 2, 2)


def test_a_cfg_darknet_refuses_is_a_refusal_with_the_signal(darknet):
    x = np.ones((1, 2, 4, 4), np.float32)  # no from layer: a [shortcut] without from=, on which the parser crashes
    with pytest.raises(DarknetRefused) as raised:
        unchecked(darknet).shortcut_forward(x, [], None, params=ShortcutParams(), dialect=_shortcut_dialect(darknet))
    refusal = raised.value
    assert isinstance(refusal, DarkspecError) and refusal.code == "darknet-refused"
    assert refusal.stage == "parse" and refusal.signal == "SIGSEGV" and "SIGSEGV" in str(refusal)


def test_a_replay_counts_a_crash_as_a_failed_case_and_carries_on(darknet):
    recording = rec.load_recording(VECTORS / "darknet-pjreddie" / "pj_reorg_fwd_s2_c4_4x4.npz")
    two_channels = rec.Recording(recording.path, recording.params, {**recording.arrays,
                                                                     "x": recording.arrays["x"][:, :2]})
    failed = replay(two_channels, unchecked(darknet))
    assert failed.verdict == FAIL and "DarknetCrashed" in failed.line() and "SIGFPE" in failed.line()
    assert replay(recording, darknet).verdict == PASS


def test_darknet_stops_with_its_own_error(pjreddie):
    """pjreddie's error() prints the message and fails an assert; the C library's error(3) must not stand in."""
    with pytest.raises(DarknetRefused) as raised:
        pjreddie.run_cfg(_conv(2) + "[reorg]\nstride=2\n")
    assert raised.value.signal == "SIGABRT" and "First section must be [net] or [network]" in raised.value.output_tail


def test_an_activation_darknet_does_not_know_is_refused(pjreddie):
    x = np.ones((1, 2, 2, 2), np.float32)
    for backend in (pjreddie, unchecked(pjreddie)):  # by darkspec's check, or on what Darknet prints
        with pytest.raises(DarkspecError) as raised:
            backend.shortcut_forward(x, [x], None, params=ShortcutParams(activation="mish"), dialect="pjreddie")
        assert raised.value.code == "unknown-activation"
    assert "going with ReLU" in str(raised.value)


@pytest.mark.parametrize("call, code", [
    (lambda b, x: b.shortcut_forward(x, [x, x], None, params=ShortcutParams(), dialect="pjreddie"),
     "pjreddie-single-from"),
    (lambda b, x: b.shortcut_forward(x, [x], np.ones(2, np.float32), params=ShortcutParams(
        weights_type="per_feature", weights_normalization="relu"), dialect="pjreddie"), "pjreddie-no-weights"),
    (lambda b, x: b.shortcut_forward(x, [x[..., :1]], None, params=ShortcutParams(), dialect="pjreddie"),
     "darknet-shape-unbuildable"),
    (lambda b, x: b.shortcut_forward(x, [x], None, params=ShortcutParams(), dialect="darknet-cpu"), "not-declared"),
    (lambda b, x: b.reorg_forward(x.astype(np.float64), 2, False, old=True), "bad-dtype"),
], ids=["two-froms", "weights", "unbuildable-shape", "other-dialect", "float64"])
def test_pjreddie_refuses_what_it_cannot_run(pjreddie, call, code):
    with pytest.raises(DarkspecError) as raised:
        call(unchecked(pjreddie), np.ones((1, 4, 2, 2), np.float32))
    assert raised.value.code == code


# --- AlexeyAB's Darknet ------------------------------------------------------------------------------------------


def test_the_alexeyab_recordings_rerun_live(alexeyab):
    """All match, including where Darknet stops in backward as recorded (normalize_channels*)."""
    for recording in rec.iter_recordings(VECTORS / "darknet-alexeyab"):
        result = replay(recording, alexeyab)
        assert result.verdict == PASS, result.line()


ALEXEYAB_ACTIVATIONS = [name for name in activations.ALEXEYAB_NAMES
                        if name != "relu6" and name not in activations.SHORTCUT_UNEVALUATED]  # the quirks' names


@FEW
@given(case=st.sampled_from(ALEXEYAB_ACTIVATIONS).flatmap(
    lambda name: strategies.shortcut_cases(dtype=np.float32, activation=name)))
def test_alexeyab_cpu_shortcut_matches_the_reference(alexeyab, case):
    settings_ = dict(params=case.params, dialect="darknet-cpu")
    _expect_close("output", REFERENCE.shortcut_forward(case.x, case.froms, case.weights, **settings_),
                  alexeyab.shortcut_forward(case.x, case.froms, case.weights, **settings_), case.x, *case.froms)
    updates = None if case.weights is None else np.linspace(-1, 1, case.weights.size, dtype=np.float32)
    expected = REFERENCE.shortcut_backward(case.x, case.froms, case.weights, case.delta, weight_updates=updates,
                                           **settings_)
    actual = alexeyab.shortcut_backward(case.x, case.froms, case.weights, case.delta, weight_updates=updates,
                                        **settings_)
    magnitude = (case.x, *case.froms, case.delta, expected.delta, *expected.input_deltas)
    _expect_close("delta_after_gradient", expected.delta, actual.delta, *magnitude)
    for i, (e, a) in enumerate(zip(expected.input_deltas, actual.input_deltas, strict=True)):
        _expect_close(f"input_deltas[{i}]", e, a, *magnitude)
    if expected.weight_updates is not None:
        terms = float(np.abs(expected.delta).sum()) * largest_magnitude(case.x, *case.froms)
        comparison = compare("weight_updates", expected.weight_updates, actual.weight_updates,
                             tolerance_for(np.float32, terms + 1))
        assert comparison.passed, comparison.describe()


@FEW
@given(case=strategies.update_cases(dtype=np.float32))
def test_alexeyab_cpu_update_matches_the_reference(alexeyab, case):
    expected = REFERENCE.shortcut_update(case.weights, case.weight_updates, case.hyper, "darknet-cpu")
    actual = alexeyab.shortcut_update(case.weights, case.weight_updates, case.hyper, "darknet-cpu")
    for name, e, a in zip(("weights", "weight_updates"), expected, actual):
        _expect_close(name, e, a, case.weights, case.weight_updates, *expected)


@FEW
@given(case=strategies.reorg_cases(old=False, dtype=np.float32))
def test_alexeyab_reorg3d_matches_the_reference_bit_for_bit(alexeyab, case):
    _expect_reorg_bit_exact(alexeyab, case, old=False)


def test_live_darknet_refuses_every_bad_call_with_the_specs_code(darknet):
    # The refusal check of the conformance suite on the real library: checked calls never reach Darknet.
    guarded = GuardedBackend(darknet)
    for capability in sorted(darknet.capabilities()):
        result = run_refusals(guarded, capability)
        assert result.examples and result.passed, (capability.label(), result.first_failure)


def test_a_subnormal_output_is_not_flushed_to_zero(pjreddie):
    """Debian's -Ofast libdarknet.so turns on flush-to-zero when loaded; the worker keeps IEEE arithmetic, so a
    subnormal output (0.5 * the smallest normal float) keeps lhtan's slope 1, as the reference's."""
    x = np.full((1, 1, 1, 1), np.finfo(np.float32).tiny, np.float32)
    froms, delta = [np.zeros_like(x)], np.full_like(x, 1.1)
    params = ShortcutParams(activation="lhtan", alpha=0.5, beta=0.25)
    expected = shortcut.backward(x, froms, None, delta, params, "pjreddie")
    actual = pjreddie.shortcut_backward(x, froms, None, delta, params=params, dialect="pjreddie")
    np.testing.assert_array_equal(actual.delta, expected.delta)
