"""Darknet's .weights file against a cfg (spec/weights.md)."""

import numpy as np
import pytest

from darkspec.errors import DarkspecError
from darkspec.reference.network import parse_network
from darkspec.reference.weights import (
    Header,
    float_count,
    layer_blocks,
    read_header,
    read_weights,
    write_weights,
)
from model_cfgs import SMALL_MODELS, model_names, model_network, model_text, weighted_variant

NET = "[net]\nwidth=8\nheight=8\nchannels=3\n"


def network(text):
    return parse_network(NET + text)


def blocks(text):
    return [(b.name, b.count) for b in layer_blocks(network(text).layers[-1])]


def test_header_seen_is_64_bit_from_version_0_2_and_32_bit_before():
    assert Header(0, 2, 0).seen_bytes == 8 and Header(0, 2, 0).size == 20
    assert Header(0, 1, 0).seen_bytes == 4 and Header(0, 1, 0).size == 16
    assert Header(1, 0, 0).seen_bytes == 8  # major * 10 + minor >= 2
    for header in (Header(0, 2, 5, 2**40 + 3), Header(0, 1, 0, 2**31 + 7)):
        assert read_header(header.to_bytes()) == header


def test_convolutional_blocks_in_file_order_with_and_without_batch_norm():
    assert blocks("[convolutional]\nfilters=4\nsize=3\n") == [("biases", 4), ("weights", 3 * 4 * 9)]
    assert blocks("[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\n") == [
        ("biases", 4), ("scales", 4), ("rolling_mean", 4), ("rolling_variance", 4), ("weights", 108)]
    assert blocks("[convolutional]\nbatch_normalize=1\ndontloadscales=1\nfilters=4\n") == [
        ("biases", 4), ("weights", 12)]


def test_grouped_convolution_reads_c_over_groups_weights_per_filter():
    text = "[convolutional]\nfilters=6\n[convolutional]\nfilters=6\ngroups=3\nsize=3\n"
    assert blocks(text) == [("biases", 6), ("weights", 6 // 3 * 6 * 9)]


def test_connected_reads_biases_weights_then_batch_norm():
    assert blocks("[connected]\noutput=5\nbatch_normalize=1\n") == [
        ("biases", 5), ("weights", 5 * 3 * 8 * 8), ("scales", 5), ("rolling_mean", 5), ("rolling_variance", 5)]
    assert blocks("[batchnorm]\n") == [("biases", 3), ("scales", 3), ("rolling_mean", 3), ("rolling_variance", 3)]


def test_shortcut_weights_are_n_plus_1_slots_of_1_or_c():
    base = "[convolutional]\nfilters=4\n[convolutional]\nfilters=4\n[convolutional]\nfilters=4\n"
    assert blocks(base + "[shortcut]\nfrom=-2,-3\n") == []
    assert blocks(base + "[shortcut]\nfrom=-2,-3\nweights_type=per_feature\nweights_normalization=relu\n") == [
        ("weights", 3)]
    assert blocks(base + "[shortcut]\nfrom=-2\nweights_type=per_channel\nweights_normalization=softmax\n") == [
        ("weights", 2 * 4)]


def test_layers_without_parameters_and_dontload_read_nothing():
    for text in ("[maxpool]\nstride=2\n", "[route]\nlayers=-1\n", "[upsample]\n", "[reorg3d]\nstride=2\n",
                 "[convolutional]\nfilters=2\ndontload=1\n"):
        assert blocks("[convolutional]\nfilters=4\n" + text) == []


@pytest.mark.parametrize("name, size", [
    # the published files: yolov3.weights, yolov4.weights, yolov4-tiny.weights (version 0.2.x: 20-byte header) and
    # yolov2.weights (version 0.1: 16-byte header)
    ("yolov3.cfg", 248007048), ("yolov4.cfg", 257717640), ("yolov4-tiny.cfg", 24251276), ("yolov2.cfg", 203934260),
])
def test_float_count_gives_the_size_of_the_published_weights_files(name, size):
    header = Header(0, 1, 0) if name == "yolov2.cfg" else Header(0, 2, 0)
    assert header.size + 4 * float_count(model_network(name)) == size


@pytest.mark.parametrize("name", model_names())
def test_every_model_cfg_has_a_weights_layout(name):
    net = model_network(name)
    weighted = [layer for layer in net.layers if layer_blocks(layer)]
    assert weighted and all(layer.type in ("convolutional", "shortcut") for layer in weighted)
    assert float_count(net) == sum(b.count for layer in weighted for b in layer_blocks(layer))


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize("weights_type", ["none", "per_feature", "per_channel"])
def test_a_written_file_reads_back_value_for_value(name, weights_type):
    text = model_text(name) if weights_type == "none" else weighted_variant(model_text(name), weights_type)
    net = model_network(name, text)
    rng = np.random.default_rng(0)
    values = {layer.index: {b.name: rng.standard_normal(b.count).astype(np.float32) for b in layer_blocks(layer)}
              for layer in net.layers if layer_blocks(layer)}
    header = Header(0, 2, 5, 123456789012)
    read = read_weights(write_weights(net, values, header), net)
    assert read.header == header
    assert list(read.layers) == list(values)
    for index, arrays in values.items():
        assert list(read.layers[index].arrays) == list(arrays)  # block order
        for name_, array in arrays.items():
            np.testing.assert_array_equal(read.layers[index].arrays[name_], array)
    shortcuts = [layer for layer in net.layers if layer.type == "shortcut"]
    assert all((layer.index in read.layers) == (weights_type != "none") for layer in shortcuts)


def test_offsets_follow_the_header_and_the_earlier_layers():
    net = network("[convolutional]\nfilters=2\n[convolutional]\nfilters=2\n[shortcut]\nfrom=-2\n"
                  "weights_type=per_feature\nweights_normalization=relu\n")
    read = read_weights(write_weights(net, header=Header(0, 1, 0)), net)
    assert [read.layers[i].offset for i in (0, 1, 2)] == [16, 16 + 4 * (2 + 6), 16 + 4 * (2 + 6 + 2 + 4)]
    np.testing.assert_array_equal(read.layers[2].arrays["weights"], [1, 1])  # Darknet's initial shortcut weights


def test_a_truncated_file_names_the_layer_and_both_counts():
    net = model_network("yolov3-tiny-prn.cfg", weighted_variant(model_text("yolov3-tiny-prn.cfg")))
    data = write_weights(net)
    last = max(layer.index for layer in net.layers if layer_blocks(layer))
    needed = sum(b.count for b in layer_blocks(net.layers[last]))
    with pytest.raises(DarkspecError) as raised:
        read_weights(data[:-8], net)
    assert raised.value.code == "weights-truncated"
    assert f"(layer {last})" in str(raised.value)
    assert f"{needed - 2} float32 values left" in str(raised.value) and f"{needed} values" in str(raised.value)


def test_a_file_for_the_unweighted_cfg_is_refused_by_the_weighted_one():
    name = "yolov3-tiny-prn.cfg"
    plain, weighted = model_network(name), model_network(name, weighted_variant(model_text(name)))
    with pytest.raises(DarkspecError) as raised:
        read_weights(write_weights(plain), weighted)
    assert raised.value.code == "weights-truncated"
    with pytest.raises(DarkspecError) as raised:
        read_weights(write_weights(weighted), plain)
    assert raised.value.code == "weights-size-mismatch"
    assert str(float_count(plain)) in str(raised.value) and str(float_count(weighted)) in str(raised.value)


@pytest.mark.parametrize("data, code", [(b"", "weights-truncated"), (b"\0" * 12, "weights-truncated"),
                                        (b"\0" * 15, "weights-truncated")])
def test_a_short_header_is_refused(data, code):
    with pytest.raises(DarkspecError) as raised:
        read_header(data)
    assert raised.value.code == code and "header" in str(raised.value)


def test_the_writer_refuses_values_that_do_not_fit_the_cfg():
    net = network("[convolutional]\nfilters=2\n[maxpool]\nstride=2\n")
    for values, code in [({0: {"weights": np.zeros(5)}}, "weights-size-mismatch"),
                         ({0: {"scales": np.zeros(2)}}, "weights-no-such-block"),
                         ({1: {"weights": np.zeros(2)}}, "weights-no-such-layer")]:
        with pytest.raises(DarkspecError) as raised:
            write_weights(net, values)
        assert raised.value.code == code
