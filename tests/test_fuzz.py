"""Fuzzing the entry points: whatever a cfg or an op call holds, only a DarkspecError may escape, and nothing takes
over 2 s (hypothesis's deadline)."""

from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from darkspec.errors import DarkspecError
from darkspec.reference import reorg, shortcut
from darkspec.reference.cfg import read_sections
from darkspec.reference.network import parse_network
from darkspec.reference.shortcut import ShortcutParams, UpdateParams

FUZZ = settings(deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])

SECTIONS = ["net", "network", "convolutional", "shortcut", "reorg3d", "reorg", "route", "upsample", "maxpool",
            "yolo", "connected", "", "shortcut]"]
KEYS = ["batch", "subdivisions", "width", "height", "channels", "filters", "size", "stride", "pad", "from", "layers",
        "activation", "weights_type", "weights_normalization", "weights_normalizion", "reverse", "alpha", "beta",
        "flatten", "extra", ""]
VALUES = st.one_of(
    st.integers(-5, 40).map(str),
    st.sampled_from(["-1", "-2", "-1,-3", "0", "1,", ",", "2x", "1e3", "0x10", "nan", "inf", "4#comment",
                     "per_feature", "per_channel", "relu", "softmax", "mish", "hard_mish", "linear", "logistic"]),
    st.integers(1, 6000).map(lambda n: "9" * n),  # past Python's digit limit of int() (4300)
    st.text(max_size=8),
)


@st.composite
def cfgs(draw):
    """Mostly well-formed cfgs (a [net] with its sizes first), with odd sections, keys, values and lines mixed in."""
    lines = []
    if draw(st.booleans()):
        lines += ["[net]", f"width={draw(VALUES)}", "height=4", f"channels={draw(VALUES)}", f"batch={draw(VALUES)}"]
    for _ in range(draw(st.integers(0, 8))):
        lines.append(f"[{draw(st.sampled_from(SECTIONS))}]")
        for _ in range(draw(st.integers(0, 6))):
            lines.append(f"{draw(st.sampled_from(KEYS))}={draw(VALUES)}")
        if draw(st.booleans()):
            lines.append(draw(st.text(max_size=12)))
    return "\n".join(lines)


def _only_darkspec_errors(call):
    try:
        call()
    except DarkspecError:
        pass


@FUZZ
@given(cfgs(), st.sampled_from(["alexeyab", "pjreddie"]))
def test_the_cfg_parser_raises_only_darkspec_errors(text, library):
    _only_darkspec_errors(lambda: parse_network(text, library))


@FUZZ
@given(st.one_of(st.binary(max_size=200), cfgs().map(str.encode)), st.sampled_from(["alexeyab", "pjreddie"]))
def test_a_cfg_as_bytes_is_read_or_refused(data, library):
    _only_darkspec_errors(lambda: parse_network(data, library))


def test_a_cfg_as_bytes_is_the_same_network_as_its_text():
    text = "[net]\nwidth=4\nheight=4\nchannels=2\n[convolutional]\nfilters=2\n[shortcut]\nfrom=-2\n"
    with pytest.raises(DarkspecError):  # from=-2 of layer 1 is before the first layer: the same refusal both ways
        parse_network(text)
    with pytest.raises(DarkspecError):
        parse_network(text.encode())
    fixed = text.replace("[shortcut]", "[convolutional]\nfilters=2\n[shortcut]")
    assert parse_network(fixed.encode()) == parse_network(fixed)
    with pytest.raises(DarkspecError) as raised:
        parse_network(b"\xff\xfe[net]")
    assert raised.value.code == "cfg-not-text"


def test_an_integer_past_pythons_digit_limit_is_refused_naming_the_key_and_its_line():
    text = "[net]\nwidth=4\nheight=4\n\n# the channels\nchannels=" + "9" * 5000 + "\n"
    with pytest.raises(DarkspecError) as raised:
        parse_network(text)
    assert raised.value.code == "not-an-integer" and "channels" in raised.value.setting
    assert "at line 6" in raised.value.setting  # the key's line, not the section's (line 1)


def test_an_error_names_the_line_of_the_offending_key():
    text = "[net]\nwidth=4\nheight=4\nchannels=2\n[convolutional]\nfilters=2\n\n\nsize=x\n"
    with pytest.raises(DarkspecError) as raised:
        parse_network(text)
    assert "at line 9" in raised.value.setting
    assert read_sections(text)[1].where(0, "size") == "[convolutional] (layer 0) at line 9"


def test_shortcut_as_the_first_layer_says_no_earlier_layer_exists():
    with pytest.raises(DarkspecError) as raised:
        parse_network("[net]\nwidth=4\nheight=4\nchannels=2\n[shortcut]\nfrom=-1\n")
    assert raised.value.code == "from-out-of-range"
    assert "none exists" in str(raised.value) and "-0" not in str(raised.value)


# --- the op entry points --------------------------------------------------------------------------------------------

#: float32 most often, so that calls get past the dtype checks to the ones behind them
DTYPES = st.sampled_from([np.float32, np.float32, np.float32, np.float64, np.float16, np.int32, np.bool_])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)
DIALECTS = st.sampled_from(["darknet-cpu", "darknet-gpu", "darknet-inference", "pjreddie", "pjreddie", "exact",
                            "nope"])
PARAMS = st.builds(ShortcutParams, weights_type=st.sampled_from(["none", "per_feature", "per_channel"]),
                   weights_normalization=st.sampled_from(["none", "relu", "softmax"]),
                   activation=st.sampled_from(["linear", "linear", "leaky", "mish", "hard_mish",
                                               "normalize_channels", "logistic", "nonsense"]),
                   alpha=st.sampled_from([1.0, -2.0]), beta=st.sampled_from([1.0, 0.5]))
QUIRKS = st.lists(st.sampled_from(["cpu-fastpath-input-dims", "cpu-relu6-zero", "shortcut-unevaluated-activations",
                                   "bogus"]), max_size=2)


def arrays(shape=SHAPES):
    return DTYPES.flatmap(lambda dtype: hnp.arrays(dtype, shape, elements=st.just(1) if dtype == np.bool_ else None))


@st.composite
def shortcut_calls(draw):
    x = draw(arrays(st.one_of(SHAPES, hnp.array_shapes(min_dims=4, max_dims=4, min_side=0, max_side=4))))
    like_x = hnp.arrays(x.dtype, x.shape) if x.dtype != np.bool_ else st.just(x)
    froms = draw(st.lists(st.one_of(st.just(x), st.just(x), like_x, arrays()), max_size=3))
    weights = draw(st.one_of(st.none(), arrays(hnp.array_shapes(max_dims=2, min_side=0, max_side=10))))
    return x, froms, weights, draw(PARAMS), draw(DIALECTS), draw(QUIRKS)


@FUZZ
@given(shortcut_calls(), st.booleans())
def test_shortcut_forward_and_backward_raise_only_darkspec_errors(call, backward):
    x, froms, weights, params, dialect, quirks = call
    with np.errstate(all="ignore"):
        if backward:
            _only_darkspec_errors(lambda: shortcut.backward(x, froms, weights, x, params, dialect, quirks))
        else:
            _only_darkspec_errors(lambda: shortcut.forward(x, froms, weights, params, dialect, quirks))


@FUZZ
@given(arrays(), arrays(), st.integers(-3, 70), st.floats(allow_nan=True), DIALECTS)
def test_shortcut_update_raises_only_darkspec_errors(weights, updates, batch, rate, dialect):
    hyper = UpdateParams(learning_rate=rate, momentum=0.9, decay=0.0005, batch=batch)
    with np.errstate(all="ignore"):
        _only_darkspec_errors(lambda: shortcut.update(weights, updates, hyper, dialect))


@FUZZ
@given(arrays(), st.one_of(st.integers(-2, 5), st.floats(0, 3), st.text(max_size=2)),
       st.one_of(st.booleans(), st.integers(-1, 2), st.text(max_size=2)), st.booleans(), st.booleans())
def test_reorg_forward_and_backward_raise_only_darkspec_errors(x, stride, reverse, old, backward):
    variant = (reorg.reorg_old_backward if old else reorg.reorg3d_backward) if backward else \
        (reorg.reorg_old_forward if old else reorg.reorg3d_forward)
    _only_darkspec_errors(lambda: variant(x, stride, reverse))


@pytest.mark.parametrize("shape", [(0, 2, 2, 2), (1, 0, 2, 2), (1, 2, 0, 0)])
@pytest.mark.parametrize("dialect", ["darknet-cpu", "pjreddie"])
def test_an_empty_input_is_refused_as_bad_shape(shape, dialect):
    x = np.zeros(shape, np.float32)
    with pytest.raises(DarkspecError) as raised:
        shortcut.forward(x, [x], None, dialect=dialect)
    assert raised.value.code == "bad-shape"
