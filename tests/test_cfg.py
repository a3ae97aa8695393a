"""The cfg parser against spec/cfg.md, and on real model cfgs."""

import re
from pathlib import Path

import pytest

from darkspec.errors import DarkspecError
from darkspec.reference.cfg import DELIBERATE_DIFFERENCES, parse_shortcut, read_sections
from darkspec.reference.network import parse_network
from darkspec.reference.shortcut import Normalization, WeightsType

REAL_CFGS = Path(__file__).resolve().parents[2] / "shared" / "darknet-cfg"
SPEC = Path(__file__).resolve().parents[1] / "spec"

NET = "[net]\nbatch=2\nwidth=4\nheight=4\nchannels=3\n"
CONV = "[convolutional]\nfilters={filters}\nsize=1\nstride={stride}\npad=0\nactivation=linear\n"


def network(shortcut_text, filters=(3, 3, 3), strides=(1, 1, 1), library="alexeyab"):
    convs = "".join(CONV.format(filters=f, stride=s) for f, s in zip(filters, strides))
    return parse_network(NET + convs + "[shortcut]\n" + shortcut_text, library)


def shortcut_of(text, **kwargs):
    return network(text, **kwargs).layers[-1].op


def refused(text, code, **kwargs):
    with pytest.raises(DarkspecError) as raised:
        network(text, **kwargs)
    assert raised.value.code == code, str(raised.value)
    return str(raised.value)


# --- from= ----------------------------------------------------------------------------------------------------


def test_from_relative_and_absolute_indices():
    assert shortcut_of("from=-2,0\n").from_layers == (1, 0)


def test_the_previous_layer_is_implicit_and_minus_one_adds_it_twice():
    assert shortcut_of("from=-1\n").from_layers == (2,)


def test_duplicates_are_kept():
    assert shortcut_of("from=-2,-2\n").from_layers == (1, 1)


def test_whitespace_inside_a_line_is_ignored():
    assert shortcut_of("from = -3 , -2\n").from_layers == (0, 1)


def test_trailing_comma_is_refused():
    message = refused("from=-2,\n", "from-empty-entry")
    assert "from" in message and "'-2,'" in message


def test_missing_from_is_refused():
    refused("activation=linear\n", "from-missing")


@pytest.mark.parametrize("text", ["from=-9\n", "from=3\n", "from=7\n"])
def test_from_out_of_range_or_self_is_refused(text):
    refused(text, "from-out-of-range")


def test_from_must_be_integers():
    refused("from=-2a\n", "from-not-integer")


def test_from_with_other_spatial_size_is_refused_by_alexeyab():
    message = refused("from=-3\n", "spatial-mismatch", strides=(1, 2, 1))
    assert "4x4" in message


def test_channel_mismatch_is_allowed():
    assert shortcut_of("from=-2\n", filters=(3, 7, 3)).from_layers == (1,)


# --- weights_type / weights_normalization ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("per_feature", WeightsType.PER_FEATURE),
                                            ("per_layer", WeightsType.PER_FEATURE),
                                            ("per_channel", WeightsType.PER_CHANNEL), ("none", WeightsType.NONE)])
def test_weights_type_values_and_alias(text, expected):
    op = shortcut_of(f"from=-2\nweights_type={text}\nweights_normalization=relu\n")
    assert op.params.weights_type == expected


def test_weights_normalization_alias_avg_relu():
    op = shortcut_of("from=-2\nweights_type=per_feature\nweights_normalization=avg_relu\n")
    assert op.params.weights_normalization == Normalization.RELU


def test_unknown_weights_type_is_refused():
    refused("from=-2\nweights_type=per_feture\n", "unknown-weights-type")


def test_unknown_normalization_is_refused_even_without_weights():
    refused("from=-2\nweights_normalization=sigmoid\n", "unknown-weights-normalization")


@pytest.mark.parametrize("text", ["weights_normalization=none\n", ""])
def test_weights_without_normalization_are_accepted_deliberately(text):
    op = shortcut_of("from=-2\nweights_type=per_channel\n" + text)
    assert op.params.weights_normalization == Normalization.NONE
    assert op.deviations == ("normalization-none-with-weights",)


def test_2020_key_spelling_is_accepted():
    op = shortcut_of("from=-2\nweights_type=per_feature\nweights_normalizion=softmax\n")
    assert op.params.weights_normalization == Normalization.SOFTMAX
    assert op.deviations == ("normalization-2020-key",)


def test_both_key_spellings_are_refused():
    refused("from=-2\nweights_normalizion=relu\nweights_normalization=relu\n", "duplicate-key")


# --- activation, other keys, pjreddie -------------------------------------------------------------------------


def test_default_activation_is_linear():
    assert shortcut_of("from=-2\n").params.activation == "linear"


def test_unknown_activation_is_refused():
    assert "lineer" in refused("from=-2\nactivation=lineer\n", "unknown-activation")


def test_unknown_key_is_refused():
    refused("from=-2\nweight_type=per_feature\n", "unknown-key")


def test_generic_layer_keys_are_accepted():
    assert shortcut_of("from=-2\nstopbackward=1\nlearning_rate=0.5\n").from_layers == (1,)


def test_pjreddie_reads_alpha_beta_and_a_single_from():
    op = shortcut_of("from=-2\nalpha=0.5\nbeta=2\n", library="pjreddie")
    assert (op.params.alpha, op.params.beta) == (0.5, 2.0)
    refused("from=-2,-3\n", "pjreddie-single-from", library="pjreddie")
    refused("from=-2\nweights_type=per_channel\n", "unknown-key", library="pjreddie")


def test_pjreddie_accepts_other_spatial_sizes():
    assert shortcut_of("from=-3\n", strides=(1, 2, 1), library="pjreddie").from_layers == (0,)


def test_duplicate_keys_are_refused_in_shortcut_sections_only():
    refused("from=-2\nfrom=-3\n", "duplicate-key")
    assert read_sections("[net]\nwidth=1\nwidth=2\n")[0].options == {"width": "1"}  # Darknet reads the first


def test_garbage_lines_are_refused():
    with pytest.raises(DarkspecError) as raised:
        read_sections("[net]\nwidth\n")
    assert raised.value.code == "bad-line"


def test_every_deliberate_difference_is_named_in_the_spec():
    for code, anchor in DELIBERATE_DIFFERENCES.items():
        path, _, heading = anchor.partition("#")
        text = (SPEC.parent / path).read_text()
        assert f"`{code}`" in text, f"{code} is not described in {path}"
        headings = [re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                    for line in text.splitlines() if line.startswith("#")]
        assert heading in headings, f"{anchor}: no such heading"


# --- real model cfgs ------------------------------------------------------------------------------------------


def real_cfgs():
    return sorted(REAL_CFGS.glob("*.cfg")) if REAL_CFGS.is_dir() else []


#: resnet50.cfg comes from pjreddie's Darknet: its strided shortcuts (a 64x64 layer into a 32x32 one) use the
#: pjreddie spatial rule, which AlexeyAB's parser refuses with an assert.
PJREDDIE_ERA = {"resnet50.cfg"}


@pytest.mark.skipif(not REAL_CFGS.is_dir(), reason="the shared real-cfg folder is not beside the project")
@pytest.mark.parametrize("path", real_cfgs(), ids=lambda p: p.name)
def test_real_model_cfgs_parse(path):
    if path.name in PJREDDIE_ERA:
        with pytest.raises(DarkspecError) as raised:
            parse_network(path.read_text())
        assert raised.value.code == "spatial-mismatch"
        net = parse_network(path.read_text(), library="pjreddie")
    else:
        net = parse_network(path.read_text())
    for layer in net.layers:
        if layer.type == "shortcut" and path.name not in PJREDDIE_ERA:
            assert all(net.layers[i].output_shape[1:] == layer.input_shape[1:] for i in layer.op.from_layers)
    assert net.layers[-1].output_shape


@pytest.mark.skipif(not REAL_CFGS.is_dir(), reason="the shared real-cfg folder is not beside the project")
def test_yolov3_tiny_prn_has_prn_shortcuts_with_unequal_channels():
    net = parse_network((REAL_CFGS / "yolov3-tiny-prn.cfg").read_text())
    unequal = [l for l in net.layers if l.type == "shortcut"
               and any(net.layers[i].output_shape[0] != l.input_shape[0] for i in l.op.from_layers)]
    assert unequal
