"""--weights: the weighted shortcuts of a trained model, dead inputs exactly where a test planted them
(spec/check.md#trained-weights)."""

import json
import struct
import zlib

import numpy as np
import pytest

from darkspec.cli import main
from darkspec.conformance import check, shortcut_weights
from darkspec.errors import DarkspecError
from darkspec.reference.weights import layer_blocks, read_weights, write_weights
from model_cfgs import SMALL_MODELS, model_network, model_text, weighted_variant


def planted(name, weights_type="per_channel", normalization="relu", seed=0):
    """A weighted variant of a model and a weights file for it: every shortcut weight in [0.5, 1.5], then in a few
    chosen shortcuts, dead weights (-0.3) and weights below the floor (0.0005) on chosen channels of slot 1, and
    one whole input dead. Returns (text, network, file bytes, {layer: (dead channels, floored channels)})."""
    text = weighted_variant(model_text(name), weights_type, normalization)
    net = model_network(name, text)
    rng = np.random.default_rng(seed)
    values, plan = {}, {}
    shortcuts = [layer for layer in net.layers if layer.type == "shortcut"]
    for number, layer in enumerate(shortcuts):
        (block,) = layer_blocks(layer)
        table = rng.uniform(0.5, 1.5, block.count).astype(np.float32).reshape(len(layer.op.from_layers) + 1, -1)
        per_input = table.shape[1]
        if number == 0:
            dead, floored = tuple(range(per_input)), ()  # the whole input
        elif number % 2:
            dead = tuple(sorted(rng.choice(per_input, size=max(1, per_input // 8), replace=False).tolist()))
            floored = tuple(k for k in range(per_input) if k not in dead)[:1] if per_input > 1 else ()
        else:
            dead, floored = (), ()
        table[1, list(dead)] = -0.3
        table[1, list(floored)] = 0.0005
        values[layer.index] = {"weights": table.reshape(-1)}
        plan[layer.index] = (dead, floored)
    return text, net, write_weights(net, values), plan


@pytest.mark.parametrize("name", SMALL_MODELS[:4])
def test_dead_inputs_are_reported_exactly_where_planted(name):
    text, net, data, plan = planted(name)
    assert plan
    report = shortcut_weights.analyse(net, read_weights(data, net))
    assert [s.index for s in report] == list(plan)
    for s in report:
        dead, floored = plan[s.index]
        assert s.slots[1].dead == dead
        assert s.slots[1].at_floor == tuple(sorted(dead + floored))  # the floor clamps every weight <= 0.001
        assert all(not slot.dead and not slot.at_floor for slot in s.slots if slot.slot != 1)
        assert [slot.layer for slot in s.dead_inputs()] == ([s.slots[1].layer] if len(dead) == s.per_input else [])
        # CPU training and inference fuse differently exactly where a weight was dead or floored (in slot 1, and
        # in the other slots of those channels, whose share the floor changes)
        assert {k for _, k in s.fused_differently} == set(dead + floored)


def test_normalized_weights_under_each_dialect():
    text, net, data, plan = planted("yolov3-tiny-prn.cfg")
    s = shortcut_weights.analyse(net, read_weights(data, net))[0]
    cpu, gpu, inference = (s.normalized[d] for d in shortcut_weights.DIALECTS)
    assert np.all(cpu[1] == 0) and np.all(gpu[1] > 0)  # the dead input is at the floor on the GPU
    np.testing.assert_array_equal(gpu, inference)  # folding uses the GPU's formula
    np.testing.assert_allclose(cpu.sum(axis=0), 1, atol=1e-3)
    assert s.uniform_distance[0] == pytest.approx(0.5, abs=1e-3)  # one of two inputs takes everything


def test_softmax_weights_have_no_dead_input_and_equal_weights_are_uniform():
    text = weighted_variant(model_text("yolov3-tiny-prn.cfg"), "per_feature", "softmax")
    net = model_network("yolov3-tiny-prn.cfg", text)
    report = shortcut_weights.analyse(net, read_weights(write_weights(net), net))  # Darknet's initial 1s
    assert all(not s.dead_inputs() and not s.fused_differently for s in report)
    assert all(s.uniform_distance[1] < 1e-4 for s in report)


def test_cli_weights_table_json_runs_with_the_files_weights_and_plot(tmp_path, capsys):
    text, net, data, plan = planted("yolov3-tiny-prn.cfg")
    cfg, weights = tmp_path / "model.cfg", tmp_path / "model.weights"
    cfg.write_text(text)
    weights.write_bytes(data)
    first = next(iter(plan))
    assert main(["check", str(cfg), "--weights", str(weights), "--plot", str(tmp_path / "w.png")]) == 0
    out = capsys.readouterr().out
    assert f"dead inputs (dropped entirely in CPU training): layer {net.layers[first].op.from_layers[0]} into " \
           f"{first}" in out
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["check", str(cfg), "--weights", str(weights), "--json"]) == 0
    data_json = json.loads(capsys.readouterr().out)
    shortcut = data_json["weights"]["shortcuts"][0]
    assert shortcut["index"] == first and shortcut["inputs"][1]["dead_input"]
    assert data_json["weights"]["header"] == {"major": 0, "minor": 2, "revision": 0, "seen": 0}
    # the runs use the file's weights: with a dead input the 0.001 floor shows on the GPU and at inference
    gpu = data_json["layers"][0]["runtimes"]["darknet-gpu"]
    assert gpu["verdict"] == "different" and gpu["runs"][0]["outcome"] == "different"


def test_weights_that_never_reach_the_floor_are_the_same_on_every_alexeyab_path(tmp_path, capsys):
    text = weighted_variant(model_text("yolov3-tiny-prn.cfg"), "per_channel", "relu")
    net = model_network("yolov3-tiny-prn.cfg", text)
    cfg, weights = tmp_path / "model.cfg", tmp_path / "model.weights"
    cfg.write_text(text)
    weights.write_bytes(write_weights(net))  # every weight 1: far above the floor
    assert main(["check", str(cfg), "--weights", str(weights), "--json", "--runtime", "darknet-gpu"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert {layer["runtimes"]["darknet-gpu"]["verdict"] for layer in layers} == {"same"}
    assert not any(layer["runtimes"]["darknet-gpu"]["disagrees"] for layer in layers)


def test_the_builtin_heatmap_is_a_png_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    text, net, data, plan = planted("yolov3-tiny-prn.cfg")
    report = shortcut_weights.analyse(net, read_weights(data, net))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert shortcut_weights.write_heatmap(report, tmp_path / "w.png") == "builtin"
    monkeypatch.undo()
    data = (tmp_path / "w.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4:idat])
    pixels = zlib.decompress(data[idat + 4:idat + 4 + length])
    assert len(pixels) == height * (1 + 3 * width)
    cell, gap = 6, 6  # one block per shortcut: a row of cells per input, then a gap
    assert height == sum(len(s.slots) * cell + gap for s in report)
    assert width == max(s.per_input for s in report) * cell


def test_a_truncated_or_mismatched_weights_file_is_a_clear_error(tmp_path, capsys):
    text, net, data, plan = planted("yolov3-tiny-prn.cfg")
    cfg, weights = tmp_path / "model.cfg", tmp_path / "model.weights"
    cfg.write_text(text)
    weights.write_bytes(data[:-100])
    assert main(["check", str(cfg), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "weights-truncated" in err and "(layer 26)" in err
    weights.write_bytes(data)
    cfg.write_text(model_text("yolov3-tiny-prn.cfg"))  # the unweighted cfg: the file is too long for it
    assert main(["check", str(cfg), "--weights", str(weights)]) == 2
    assert "weights-size-mismatch" in capsys.readouterr().err
    assert main(["check", str(cfg), "--plot", str(tmp_path / "w.png")]) == 2
    assert "plot-needs-weights" in capsys.readouterr().err
    assert main(["check", str(cfg), "--weights", str(tmp_path / "missing.weights")]) == 2
    assert "no-such-file" in capsys.readouterr().err
    with pytest.raises(DarkspecError):
        check.select_runtimes(["nope"])
