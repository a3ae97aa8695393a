"""The cfg parser against spec/cfg.md, and on real model cfgs."""

import re
from pathlib import Path

import pytest

from darkspec.errors import DarkspecError
from darkspec.reference.cfg import DELIBERATE_DIFFERENCES, Section, parse_shortcut, read_sections
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


def refused_network(text, code, library="alexeyab"):
    """``text`` comes after NET."""
    with pytest.raises(DarkspecError) as raised:
        parse_network(NET + text, library)
    assert raised.value.code == code, str(raised.value)
    return str(raised.value)


def output_shape(text):
    """The last layer's output shape; ``text`` comes after NET (input 3x4x4)."""
    return parse_network(NET + text).layers[-1].output_shape


# --- libraries, reading the text --------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["darknet", "AlexeyAB", "hank-ai"])
def test_a_library_other_than_alexeyab_or_pjreddie_is_refused(library):
    for parse in (lambda: parse_network(NET, library),
                  lambda: parse_shortcut(Section("shortcut", 1, {"from": "-1"}), 1, library)):
        with pytest.raises(DarkspecError) as raised:
            parse()
        assert raised.value.code == "unknown-library"


def test_section_names_are_case_sensitive():
    assert read_sections("[Shortcut]\n")[0].name == "Shortcut"
    assert read_sections("[ shortcut ]\n")[0].name == "shortcut"  # whitespace goes, case stays
    refused_network("[convolutional]\n[Shortcut]\nfrom=-1\n", "unknown-layer-type")
    with pytest.raises(DarkspecError) as raised:
        parse_network("[Net]\nwidth=4\n")
    assert raised.value.code == "no-net-section"


@pytest.mark.parametrize("line", ["[net", "[]", "[net]x", "[net]]x"])
def test_a_line_starting_with_a_bracket_must_be_a_header(line):
    with pytest.raises(DarkspecError) as raised:
        read_sections(line + "\n")
    assert raised.value.code == "bad-line"


def test_an_option_value_is_everything_after_the_first_equals_sign():
    assert read_sections("[net]\nkey=a=b\n")[0].options == {"key": "a=b"}


@pytest.mark.parametrize("text", ["[net]\n=4\n", "width=4\n[net]\n"], ids=["empty-key", "before-any-header"])
def test_an_empty_key_or_an_option_before_the_first_header_is_refused(text):
    with pytest.raises(DarkspecError) as raised:
        read_sections(text)
    assert raised.value.code == "bad-line"


@pytest.mark.parametrize("value, filters", [("7", 7), ("+7", 7), ("40#32", 40), ("40 #32", 40), ("3#", 3)])
def test_an_integer_option_is_a_signed_integer_and_a_hash_starts_a_comment(value, filters):
    assert output_shape(f"[convolutional]\nfilters={value}\n")[0] == filters


@pytest.mark.parametrize("text", ["[convolutional]\nfilters=3x\n", "[convolutional]\nfilters=1.5\n",
                                  "[convolutional]\nfilters=0x10\n", "[convolutional]\nfilters=\n",
                                  "[convolutional]\nfilters=#3\n", "[upsample]\nstride=two\n"])
def test_other_integer_text_is_refused(text):
    refused_network(text, "not-an-integer")


def test_integer_options_of_the_net_section_are_checked_too():
    with pytest.raises(DarkspecError) as raised:
        parse_network("[net]\nwidth=4a\n")
    assert raised.value.code == "not-an-integer"


@pytest.mark.parametrize("text", ["alpha=abc\n", "beta=1,5\n", "alpha=\n", "alpha=nan\n", "beta=1_0\n"])
def test_alpha_and_beta_must_be_numbers(text):
    refused("from=-2\n" + text, "not-a-number", library="pjreddie")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[convolutional]\n[net]\n", "[layer]\n"])
def test_the_first_section_must_be_net_or_network(text):
    with pytest.raises(DarkspecError) as raised:
        parse_network(text)
    assert raised.value.code == "no-net-section"
    assert parse_network("[network]\nwidth=2\n").input_shape == (0, 0, 2)


def test_errors_name_the_section_its_layer_index_and_its_line():
    cfg = NET + "[convolutional]\nfilters=3\n\n[shortcut]\nfrom=-1,\n"
    with pytest.raises(DarkspecError) as raised:
        parse_network(cfg)
    assert "[shortcut] (layer 1) at line 10 from='-1,'" in str(raised.value)  # the line of the key, not of [shortcut]


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


@pytest.mark.parametrize("value", ["-2a", "-2 #x", "1.0", "x", "0x1"])
def test_from_must_be_integers(value):
    refused(f"from={value}\n", "from-not-integer")


def test_an_empty_from_value_is_refused_like_an_empty_entry():
    refused("from=\n", "from-empty-entry")


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


def test_pjreddie_refuses_a_trailing_comma_as_a_second_entry():
    refused("from=-2,\n", "pjreddie-single-from", library="pjreddie")


PJREDDIE_GENERIC_KEYS = ["truth", "onlyforward", "stopbackward", "dontsave", "dontload", "numload", "dontloadscales",
                         "learning_rate", "smooth"]


def test_pjreddie_accepts_its_generic_layer_keys():
    text = "".join(f"{key}=1\n" for key in PJREDDIE_GENERIC_KEYS)
    assert shortcut_of("from=-2\n" + text, library="pjreddie").from_layers == (1,)


@pytest.mark.parametrize("key", ["weights_type", "weights_normalization", "weights_normalizion", "clip",
                                 "dont_update", "burnin_update", "train_only_bn"])
def test_pjreddie_refuses_alexeyab_keys_it_does_not_read(key):
    refused(f"from=-2\n{key}=1\n", "unknown-key", library="pjreddie")


@pytest.mark.parametrize("key", ["alpha", "beta", "truth", "dontsave", "numload", "smooth"])
def test_alexeyab_refuses_pjreddie_keys_it_does_not_read(key):
    refused(f"from=-2\n{key}=1\n", "unknown-key")


@pytest.mark.parametrize("library", ["alexeyab", "pjreddie"])
def test_generic_key_values_are_not_read_so_not_refused(library):
    assert shortcut_of("from=-2\nlearning_rate=fast\nstopbackward=yes\n", library=library).from_layers == (1,)


def test_pjreddie_refuses_height_and_width_ratios_that_differ():
    """A 4x4 layer into a [shortcut] whose input is 4x2 (stride_x=2): height ratio 1, width ratio 2."""
    text = "[convolutional]\nfilters=3\n[convolutional]\nfilters=3\nstride_x=2\n[shortcut]\nfrom=-2\n"
    message = refused_network(text, "pjreddie-spatial-ratio", library="pjreddie")
    assert "(4, 4)" in message and "(4, 2)" in message
    assert "[shortcut] (layer 2) at line" in message  # the op's rule, located in the cfg


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


# --- shapes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, input_shape, batch", [
    ("[net]\nbatch=8\nsubdivisions=4\nwidth=5\nheight=6\nchannels=7\n", (7, 6, 5), 2),
    ("[net]\nbatch=8\nsubdivisions=0\n", (0, 0, 0), 8),
    ("[net]\n", (0, 0, 0), 1),
])
def test_the_net_section_gives_the_input_shape_and_the_batch(text, input_shape, batch):
    net = parse_network(text)
    assert (net.input_shape, net.batch) == (input_shape, batch)


@pytest.mark.parametrize("name", ["lstm", "res", "Shortcut", "CONVOLUTIONAL"])
def test_a_section_name_without_a_shape_rule_is_refused(name):
    assert f"[{name}] (layer 1)" in refused_network(f"[convolutional]\n[{name}]\nfrom=-1\n", "unknown-layer-type")


def test_gaussian_yolo_is_known_in_alexeyabs_spelling_only():
    assert output_shape("[Gaussian_yolo]\n") == (3, 4, 4)
    refused_network("[gaussian_yolo]\n", "unknown-layer-type")


@pytest.mark.parametrize("text", ["[convolutional]\nsize=5\n", "[convolutional]\nfilters=0\n",
                                  "[upsample]\nstride=-8\n"])
def test_a_layer_whose_output_has_a_size_below_1_is_refused(text):
    refused_network(text, "empty-output")


@pytest.mark.parametrize("text", [
    "[convolutional]\nstride=0\n", "[convolutional]\nsize=0\n", "[convolutional]\nsize=-1\n",
    "[convolutional]\nstride_x=0\n", "[convolutional]\nstride_y=-2\n",
    "[maxpool]\nstride=0\n", "[maxpool]\nsize=0\n",
    "[convolutional]\n[route]\nlayers=-1\ngroups=0\n",
    "[upsample]\nstride=0\n",
])
def test_strides_sizes_and_route_groups_must_be_at_least_1(text):
    refused_network(text, "not-positive")


@pytest.mark.parametrize("text, shape", [
    ("[convolutional]\nfilters=5\nsize=3\nstride=2\npad=1\n", (5, 2, 2)),
    ("[convolutional]\nsize=3\npadding=2\n", (1, 6, 6)),
    ("[convolutional]\nstride=2\nstride_x=1\n", (1, 2, 4)),
    ("[conv]\nfilters=2\n", (2, 4, 4)),
    ("[maxpool]\nstride=2\n", (3, 2, 2)),
    ("[maxpool]\nsize=3\nstride=1\n", (3, 4, 4)),
    ("[max]\nsize=2\nstride=2\npadding=0\n", (3, 2, 2)),
    ("[avgpool]\n", (3, 1, 1)),
    ("[avg]\n", (3, 1, 1)),
    ("[connected]\noutput=7\n", (7, 1, 1)),
    ("[conn]\n", (1, 1, 1)),
    ("[upsample]\n", (3, 8, 8)),
    ("[upsample]\nstride=-2\n", (3, 2, 2)),
    ("[convolutional]\nfilters=4\n[convolutional]\nfilters=2\n[route]\nlayers=-1,-2\n", (6, 4, 4)),
    ("[convolutional]\nfilters=4\n[convolutional]\nfilters=2\n[route]\nlayers=-1,-2\ngroups=2\n", (3, 4, 4)),
    ("[convolutional]\nfilters=4\n[convolutional]\nfilters=1\nsize=4\n[scale_channels]\nfrom=-2\n", (4, 4, 4)),
])
def test_output_shapes_follow_the_shape_table(text, shape):
    assert output_shape(text) == shape


def test_route_layers_must_share_one_spatial_size():
    refused_network("[convolutional]\n[convolutional]\nstride=2\n[route]\nlayers=-1,-2\n", "spatial-mismatch")


@pytest.mark.parametrize("section", ["[route]\nlayers", "[scale_channels]\nfrom"])
@pytest.mark.parametrize("value, code", [
    (None, "{key}-missing"), ("", "from-empty-entry"), ("-1a", "from-not-integer"), ("-1,", "from-empty-entry"),
    ("-2", "from-out-of-range"), ("1", "from-out-of-range"),
])
def test_route_and_scale_channels_references_follow_the_from_rules(section, value, code):
    header, key = section.split("\n")
    text = f"[convolutional]\n{header}\n" + ("" if value is None else f"{key}={value}\n")
    refused_network(text, code.format(key=key))


@pytest.mark.parametrize("channels, text, code", [
    (3, "[reorg3d]\nstride=0\n", "reorg-bad-stride"),
    (3, "[reorg3d]\nstride=3\n", "reorg-size-not-divisible"),
    (3, "[reorg3d]\nstride=2\nreverse=1\n", "reorg3d-reverse-channels"),
    (3, "[reorg]\nstride=2\n", "reorg-old-channels"),
    (0, "[reorg3d]\nstride=2\n", "reorg-bad-shape"),  # a [net] without channels= gives no image
])
def test_parse_network_raises_the_reorg_refusals(channels, text, code):
    with pytest.raises(DarkspecError) as raised:
        parse_network(f"[net]\nwidth=4\nheight=4\nchannels={channels}\n" + text)
    assert raised.value.code == code
    assert "(layer 0) at line" in str(raised.value)  # the reorg reference's rule, located in the cfg


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
    unequal = [layer for layer in net.layers if layer.type == "shortcut"
               and any(net.layers[i].output_shape[0] != layer.input_shape[0] for i in layer.shortcut.from_layers)]
    assert unequal
