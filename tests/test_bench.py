"""The throughput matrix (darkspec.conformance.bench): its outputs, compare mode and bytes formulas.

Nothing here asserts a speed: the measured figures depend on the machine. The one run of the quick profile uses a
tiny size; every other test works on data built by hand or on a timer that returns fixed durations.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest

from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance import bench
from darkspec.conformance.bench import OPS, OpSpec, bytes_moved
from darkspec.errors import DarkspecError
from darkspec.reference import reorg, shortcut
from darkspec.reference.shortcut import ShortcutParams

TINY = (1, 16, 8, 8)


def read_png(data: bytes) -> dict:
    """Every chunk of a PNG, checked: signature, CRCs, IHDR first, IEND last, IDAT the size IHDR announces."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        at += 12 + length
    assert at == len(data)
    assert chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13 and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert width > 0 and height > 0 and compression == 0 and filtering == 0
    info = {"width": width, "height": height, "depth": depth, "color": color, "interlace": interlace}
    if (depth, color, interlace) == (8, 2, 0):  # the built-in writer's format: check the pixel data too
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
        assert len(raw) == height * (1 + 3 * width)
    return info


# --------------------------------------------------------------------------------------------------------------
# The quick profile, once, on a tiny size.


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    status = bench.run(quick=True, sizes=["1x16x8x8"], output=output, out=out)
    return status, out.getvalue(), output


def test_quick_profile_prints_the_table_and_the_summary(quick_run):
    status, text, _ = quick_run
    assert status == 0
    for header in ("backend", "ms median [p20, p80]", "GB/s", "copy GB/s", "% copy", "vs torch eager", "target"):
        assert header in text
    assert "% of copy bandwidth (median)" in text
    assert "target: reference >= 25% of copy bandwidth" in text
    for spec in OPS:
        assert spec.label in text


def test_quick_profile_writes_json_with_machine_versions_and_every_figure(quick_run):
    _, _, output = quick_run
    report = json.loads((output / bench.JSON_NAME).read_text())
    assert report["schema"] == bench.SCHEMA
    assert report["profile"]["name"] == "quick" and report["profile"]["sizes"] == [list(TINY)]
    machine = report["machine"]
    assert machine["cpu_model"] and machine["logical_cores"] >= 1 and machine["llc_bytes"] > 0
    assert "memory_bytes" in machine
    versions = report["versions"]
    assert versions["numpy"] == np.__version__ and versions["python"] and versions["darkspec"]
    assert report["chart"]["file"] == bench.PNG_NAME and report["chart"]["renderer"] in ("matplotlib", "builtin")
    reference = [r for r in report["results"] if r["backend"] == "reference"]
    # every op, in both dtypes the reference declares
    assert {(r["key"], r["dtype"]) for r in reference} == {(s.key, d) for s in OPS for d in ("float32", "float64")}
    torch_there = versions["torch"] is not None
    for r in reference:
        assert r["error"] is None and r["shape"] == list(TINY)
        assert r["bytes"] == bytes_moved(next(s for s in OPS if s.key == r["key"]), TINY, r["dtype"])
        t = r["time"]
        assert 0 < t["p20_s"] <= t["median_s"] <= t["p80_s"] and t["repeats"] == len(t["samples_s"]) >= 5
        assert r["gbps"] == pytest.approx(r["bytes"] / t["median_s"] / 1e9)
        assert r["copy"]["median_s"] > 0
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy"]["gbps"])
        assert r["sets"] >= 2 and r["target"]["min_pct"] == 25.0
        assert (r["vs_torch_eager"] is not None) == torch_there
        assert (r["torch_eager"] is not None) == torch_there
        if torch_there:
            assert r["torch_eager"]["median_s"] > 0 and r["torch_eager"]["pct_of_copy"] > 0
    assert {b["name"] for b in report["backends"]} >= {"reference"}


def test_quick_profile_writes_a_valid_png(quick_run):
    _, _, output = quick_run
    info = read_png((output / bench.PNG_NAME).read_bytes())
    assert info["width"] >= 200 and info["height"] >= 100


def test_the_builtin_chart_is_a_valid_png_with_the_drawn_size(quick_run, tmp_path):
    _, _, output = quick_run
    report = json.loads((output / bench.JSON_NAME).read_text())
    path = tmp_path / "chart.png"
    assert bench.write_chart(report, path, prefer_matplotlib=False) == "builtin"
    info = read_png(path.read_bytes())
    ops, series, grid = bench.summary(report)
    image = bench.render_chart(ops, series, grid, "t")
    assert (info["height"], info["width"], info["depth"], info["color"]) == (*image.shape[:2], 8, 2)
    assert len(ops) == len(OPS) and "reference" in series


def test_png_bytes_round_trips_the_pixels():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    data = bench.png_bytes(rgb)
    read_png(data)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(4, 1 + 15)
    assert not rows[:, 0].any() and np.array_equal(rows[:, 1:].reshape(4, 5, 3), rgb)


# --------------------------------------------------------------------------------------------------------------
# Compare mode, on reports built by hand.


def _result(backend, key, median, spread=0.1, label=None, shape=TINY, dtype="float32"):
    half = median * spread / 2
    return {"backend": backend, "key": key, "label": label or key, "shape": list(shape), "dtype": dtype,
            "time": {"median_s": median, "p20_s": median - half, "p80_s": median + half, "spread": spread}}


def _report(results, cpu="cpu A"):
    return {"schema": bench.SCHEMA, "profile": {"name": "quick", "sizes": [list(TINY)]}, "machine": {"cpu_model": cpu},
            "versions": {"torch": None}, "backends": [], "results": results, "skipped": []}


def test_compare_flags_a_regression_beyond_the_spread_and_not_one_within_it():
    baseline = _report([_result("reference", "slow", 0.005), _result("reference", "noisy", 0.0096),
                        _result("reference", "quicker", 0.020), _result("reference", "gone", 0.001)])
    current = _report([_result("reference", "slow", 0.010), _result("reference", "noisy", 0.010),
                       _result("reference", "quicker", 0.010), _result("reference", "added", 0.001)])
    verdicts = {c.label: c.verdict for c in bench.compare(baseline, current)}
    assert verdicts == {"slow": "regression", "noisy": "same", "quicker": "faster", "added": "new",
                        "gone": "missing"}
    slow = next(c for c in bench.compare(baseline, current) if c.label == "slow")
    assert slow.change == pytest.approx(1.0) and slow.tolerance == pytest.approx(0.1)
    # the larger of the two spreads counts, and --min-regression raises the bar
    wide = _report([_result("reference", "slow", 0.005, spread=1.5)])
    assert bench.compare(wide, current)[0].verdict == "same"
    assert bench.compare(baseline, current, min_regression=2.0)[0].verdict == "same"


def test_compare_relative_to_copy_forgives_a_machine_that_is_slower_as_a_whole():
    def case(median, copy_median):
        r = _result("reference", "op", median)
        r["copy"] = _result("", "", copy_median)["time"]
        return r

    baseline = _report([case(0.010, 0.002)])
    slower_machine = _report([case(0.020, 0.004)])  # the op and the copy both twice as slow
    slower_op = _report([case(0.020, 0.002)])  # the op alone twice as slow
    assert bench.compare(baseline, slower_machine)[0].verdict == "regression"
    assert bench.compare(baseline, slower_machine, relative_to_copy=True)[0].verdict == "same"
    changed = bench.compare(baseline, slower_op, relative_to_copy=True)[0]
    assert changed.verdict == "regression" and changed.tolerance == pytest.approx(0.2)  # op spread + copy spread


def test_compare_mode_exit_status_only_with_fail_on_regression(quick_run, tmp_path):
    _, _, output = quick_run
    current = json.loads((output / bench.JSON_NAME).read_text())
    for r in current["results"]:  # fixed figures: the verdicts must not depend on this machine's noise
        r["time"] = _result(r["backend"], r["key"], 0.010)["time"]
    baseline = copy.deepcopy(current)
    regressed, within = baseline["results"][0], baseline["results"][1]
    regressed["time"] = _result("", "", 0.005)["time"]  # now twice as slow: beyond a 10% spread
    within["time"] = _result("", "", 0.0097)["time"]  # 3% slower: within it
    (tmp_path / "base.json").write_text(json.dumps(baseline))
    (tmp_path / "now.json").write_text(json.dumps(current))
    options = dict(compare_with=tmp_path / "base.json", current=tmp_path / "now.json")

    out = io.StringIO()
    assert bench.run(**options, out=out) == 0
    assert bench.run(**options, fail_on_regression=True, out=io.StringIO()) == 1
    lines = [line for line in out.getvalue().splitlines() if "REGRESSION" in line]
    assert len(lines) == 1 and regressed["label"] in lines[0] and regressed["backend"] in lines[0]
    assert "1 regression(s) beyond the measured spread" in out.getvalue()
    # the unchanged baseline: nothing flagged, exit 0 even when asked to fail
    (tmp_path / "same.json").write_text(json.dumps(current))
    assert bench.run(compare_with=tmp_path / "same.json", current=tmp_path / "now.json", fail_on_regression=True,
                     out=io.StringIO()) == 0


def test_compare_refuses_a_file_that_is_not_a_bench_report(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"suite": "darkspec"}))
    with pytest.raises(DarkspecError, match="bad-baseline"):
        bench.load_report(tmp_path / "other.json")
    assert bench.main(["--compare", str(tmp_path / "missing.json"), "--current", str(tmp_path / "x.json")]) == 2


# --------------------------------------------------------------------------------------------------------------
# Bytes moved.

N, C, H, W = 2, 16, 8, 8
T = N * C * H * W


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float64", 8)])
def test_bytes_moved_formulas(dtype, itemsize):
    expected = {
        # forward: (n+1) inputs read, the weights read, one output written
        "shortcut.forward.n1.none.none": 3 * T,
        "shortcut.forward.n2.per_feature.relu": 4 * T + 3,
        "shortcut.forward.n3.per_channel.softmax": 5 * T + 4 * C,
        # backward, no weights, linear: delta read; d and two input deltas written
        "shortcut.backward.n1.none.none": T + 3 * T,
        # backward with weights: delta, x, froms, weights and accumulator read; d, input deltas, accumulator written
        "shortcut.backward.n2.per_feature.relu": (T + 3 * T + 2 * 3) + (4 * T + 3),
        "shortcut.backward.n3.per_channel.softmax": (T + 4 * T + 2 * 4 * C) + (5 * T + 4 * C),
        "reorg3d.forward.reverse0.stride2": 2 * T,
        "reorg3d.forward.reverse1.stride2": 2 * T,
    }
    assert {s.key: bytes_moved(s, (N, C, H, W), dtype) for s in OPS} == {k: v * itemsize for k, v in expected.items()}


def test_a_non_linear_backward_without_weights_reads_its_inputs():
    spec = OpSpec("shortcut", "backward", 1, "none", "none", activation="leaky")
    assert bytes_moved(spec, (N, C, H, W), "float32") == (3 * T + 3 * T) * 4


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.key)
def test_bytes_moved_is_what_the_reference_reads_and_writes(spec):
    """The formula against the arrays themselves: the inputs the result depends on, and every output."""
    shape = (2, 16, 4, 6)
    sets = bench.make_sets(spec, shape, "float32", 1, np.random.default_rng(1))[0]
    params = ShortcutParams(weights_type=spec.weights_type, weights_normalization=spec.normalization)
    if spec.op == "reorg3d":
        arrays = [sets["x"], reorg.reorg3d_forward(sets["x"], spec.stride, spec.reverse)]
    elif spec.pass_ == "forward":
        out = shortcut.forward(sets["x"], sets["froms"], sets["weights"], params)
        arrays = [sets["x"], *sets["froms"], out] + ([sets["weights"]] if sets["weights"] is not None else [])
    else:
        g = shortcut.backward(sets["x"], sets["froms"], sets["weights"], sets["delta"], params,
                              weight_updates=sets["weight_updates"])
        arrays = [sets["delta"], g.delta, *g.input_deltas]
        if sets["weights"] is not None:
            arrays += [sets["x"], *sets["froms"], sets["weights"], sets["weight_updates"], g.weight_updates]
    assert bytes_moved(spec, shape, "float32") == sum(a.nbytes for a in arrays)


# --------------------------------------------------------------------------------------------------------------
# The eager-PyTorch baseline computes what the op computes.


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.key)
def test_the_torch_eager_baseline_matches_the_reference(spec):
    torch = pytest.importorskip("torch", reason="the eager baseline needs torch (pip install darkspec[torch])")
    shape = (2, 16, 4, 6)
    sets = bench.make_sets(spec, shape, "float64", 2, np.random.default_rng(2))
    got = bench.torch_eager_call(torch, spec, shape, sets)(1)
    expected = bench.backend_call(ReferenceBackend(), spec, "darknet-cpu", sets)(1)
    if spec.pass_ == "forward":
        assert np.allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
        return
    d, input_deltas, updates = got
    assert np.allclose(d.numpy(), expected.delta)
    assert len(input_deltas) == len(expected.input_deltas)
    for a, b in zip(input_deltas, expected.input_deltas):
        assert np.allclose(a.numpy(), b)
    if expected.weight_updates is None:
        assert updates is None
    else:
        assert np.allclose(updates.numpy(), expected.weight_updates, rtol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# The timer interface, with fixed durations.


class FixedTimer(bench.Timer):
    """A device whose op calls take 2 ms and whose copy takes 1 ms: every ratio is known in advance."""

    name, device = "fixed", "fake-device"

    def time_call(self, run, i):
        result = run(i)
        return 0.001 if isinstance(result, str) else 0.002

    def copy_call(self, nbytes, sets):
        return lambda i: "copied"


class TimedReference(ReferenceBackend):
    name = "timed"

    def bench_timer(self):
        return FixedTimer()


class BrokenReference(ReferenceBackend):
    name = "broken"

    def reorg_forward(self, x, stride, reverse, old):
        raise RuntimeError("kernel launch failed")


PROFILE = replace(bench.PROFILES["quick"], sizes=(TINY,), warmup=1, min_repeats=3, max_repeats=3)


def test_a_backend_supplies_its_own_timer_and_copy_baseline():
    report = bench.run_matrix([TimedReference()], PROFILE, dtypes=["float32"], torch_threads=None,
                               torch_baseline=False)
    assert report["backends"][0]["timer"] == "fixed"
    assert len(report["results"]) == len(OPS)
    for r in report["results"]:
        assert r["device"] == "cpu" and r["timer"] == "fixed"
        assert r["time"]["median_s"] == 0.002 and r["time"]["repeats"] == 3
        assert r["copy"]["median_s"] == 0.001
        assert r["pct_of_copy"] == pytest.approx(50.0) and r["target"] is None


def test_a_failing_backend_is_reported_in_its_cell_not_raised():
    report = bench.run_matrix([BrokenReference()], PROFILE, dtypes=["float32"], torch_threads=None,
                               torch_baseline=False)
    broken = [r for r in report["results"] if r["op"] == "reorg3d"]
    assert len(broken) == 2 and all("kernel launch failed" in r["error"] for r in broken)
    assert all(r["error"] is None for r in report["results"] if r["op"] == "shortcut")
    text = bench.table(report) + "\n".join(bench.notes(report))
    assert "kernel launch failed" in text


def test_sizes_that_an_op_refuses_are_skipped_with_the_reason():
    profile = replace(PROFILE, sizes=((1, 4, 8, 8),))  # reorg3d reverse=1 needs C % 16 == 0
    report = bench.run_matrix([ReferenceBackend()], profile, dtypes=["float32"],
                              ops=[OPS[0], OPS[-1]], torch_threads=None, torch_baseline=False)
    assert [r["key"] for r in report["results"]] == [OPS[0].key]
    assert report["skipped"][0]["op"] == OPS[-1].key and "reorg3d-reverse-channels" in report["skipped"][0]["reason"]


# --------------------------------------------------------------------------------------------------------------
# Options.


def test_sizes_are_parsed_and_bad_ones_refused():
    assert bench.parse_size("8x256x52x52") == (8, 256, 52, 52)
    for bad in ("8x256x52", "8x256x0x52", "axbxcxd"):
        with pytest.raises(DarkspecError, match="bad-size"):
            bench.parse_size(bad)
    assert bench.main(["--size", "1x2x3"]) == 2


def test_rotation_sets_cover_twice_the_cache_within_the_bounds():
    profile = bench.PROFILES["full"]
    assert bench.rotation_sets(10 << 20, profile, 100 << 20) == 20
    assert bench.rotation_sets(1 << 10, profile, 100 << 20) == profile.max_sets
    assert bench.rotation_sets(1 << 30, profile, 100 << 20) == 2
