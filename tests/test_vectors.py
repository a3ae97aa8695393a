"""Replaying Darknet recordings (`darkspec vectors`): every golden case passes, and the replay can fail."""

import numpy as np
import pytest

from darkspec.backends.reference import ReferenceBackend
from darkspec.cli import main
from darkspec.conformance import recordings as rec
from darkspec.conformance.vectors import FAIL, PASS, replay, run_vectors
from darkspec.reference import shortcut
from darkspec.reference.dialects import Dialect

from conftest import GOLDEN

VECTORS = GOLDEN / "darknet-vectors"
CASES = sorted(VECTORS.rglob("*.npz"))


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_every_golden_recording_replays(path):
    result = replay(rec.load_recording(path))
    assert result.verdict == PASS, result.line()


def test_the_index_lists_every_recording():
    import json

    listed = {case["file"] for case in json.loads((VECTORS / "index.json").read_text())["cases"]}
    assert listed == {str(p.relative_to(VECTORS)) for p in CASES}


def test_cli_prints_one_line_per_case_and_the_totals(capsys):
    status = main(["vectors", str(VECTORS / "darknet-pjreddie")])
    lines = capsys.readouterr().out.splitlines()
    cases = sorted((VECTORS / "darknet-pjreddie").glob("*.npz"))
    assert status == 0
    assert len(lines) == len(cases) + 1
    assert all(line.split()[1] == PASS for line in lines[:-1])
    assert lines[-1] == f"{len(cases)} passed, 0 failed, 0 skipped"


class TrueDerivativeBackend(ReferenceBackend):
    """A port that uses autograd's gradient where Darknet's CPU dialect wants its surrogate."""

    name = "true-derivative"

    def shortcut_backward(self, x, froms, weights, delta, **settings):
        if settings["dialect"] == Dialect.DARKNET_CPU.value:
            settings = {**settings, "dialect": Dialect.EXACT.value}
        return shortcut.backward(x, froms, weights, delta, **settings)


class OffByOneUlpBackend(ReferenceBackend):
    """Permutations must be exact: one ulp off anywhere is a failure."""

    name = "one-ulp"

    def reorg_forward(self, x, stride, reverse, old):
        out = super().reorg_forward(x, stride, reverse, old)
        return np.nextafter(out, np.inf)


def test_replay_fails_a_backend_with_the_wrong_weight_gradient():
    result = replay(rec.load_recording(VECTORS / "darknet-alexeyab" / "grid_per_feature_softmax_n1.npz"),
                    TrueDerivativeBackend())
    assert result.verdict == FAIL
    assert result.worst().name.startswith("weight_updates")


def test_replay_fails_a_permutation_one_ulp_off_and_exits_non_zero(capsys):
    status = run_vectors([VECTORS / "darknet-alexeyab" / "reorg3d_fwd_s2_c1_4x4.npz"], OffByOneUlpBackend())
    out = capsys.readouterr().out.splitlines()
    assert status == 1
    assert " FAIL " in out[0] and "ulp 1" in out[0]
    assert out[-1] == "0 passed, 1 failed, 0 skipped"


def test_an_op_without_an_implementation_is_skipped(tmp_path):
    recording = rec.load_recording(VECTORS / "darknet-alexeyab" / "grid_none_none_n1.npz")
    params = {**recording.params, "cfg": recording.cfg.replace("[shortcut]", "[scale_channels]")}
    result = replay(rec.Recording(recording.path, params, recording.arrays))
    assert result.verdict == "SKIP" and "scale_channels" in result.detail
