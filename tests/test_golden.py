"""The golden gate: the tree matches its manifest, tampering is caught by name, recording is deterministic, and
every reference regression case replays."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from darkspec.backends.base import Capability
from darkspec.backends.reference import ReferenceBackend
from darkspec.conformance import golden as gold
from darkspec.conformance import recordings as rec
from darkspec.conformance.suite import run_golden
from darkspec.conformance.vectors import PASS, replay
from darkspec.reference.dialects import Dialect

from conftest import GOLDEN, run_in

RECORDING = "darknet-vectors/darknet-alexeyab/act_linear.npz"


@pytest.fixture
def copy(tmp_path):
    target = tmp_path / "golden"
    shutil.copytree(GOLDEN, target)
    return target


def run(function, golden_dir):
    lines = []
    return function(golden_dir, write=lines.append), lines


def snapshot(golden_dir):
    return {path.relative_to(golden_dir): path.read_bytes() for path in golden_dir.rglob("*") if path.is_file()}


def test_the_tree_matches_its_manifest():
    status, lines = run(gold.verify, GOLDEN)
    assert status == 0, "\n".join(lines)
    assert lines[-1].startswith("golden: OK")


def test_a_changed_byte_fails_naming_the_file(copy):
    path = copy / RECORDING
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    status, lines = run(gold.verify, copy)
    assert status == 1
    assert lines[:-1] == [f"{RECORDING}: changed (sha256 differs from manifest.json)"]


def test_a_missing_file_fails_naming_it(copy):
    (copy / RECORDING).unlink()
    status, lines = run(gold.verify, copy)
    assert status == 1
    assert lines[:-1] == [f"{RECORDING}: missing"]


def test_an_unlisted_file_fails_naming_it(copy):
    (copy / "darknet-vectors" / "notes.txt").write_text("not in the manifest\n")
    status, lines = run(gold.verify, copy)
    assert status == 1
    assert lines[:-1] == ["darknet-vectors/notes.txt: unlisted (not in manifest.json)"]


def test_recording_reproduces_the_tree_byte_for_byte(copy):
    before = snapshot(copy)
    status, lines = run(gold.record, copy)
    assert status == 0, "\n".join(lines)
    assert lines[0] == f"recorded {len(gold.CASES)} reference cases: nothing changed"
    assert snapshot(copy) == before


def test_record_reports_added_removed_and_changed_arrays(copy):
    name = "cpu_per_feature_relu"
    case = rec.load_recording(copy / "reference" / f"{name}.npz")
    arrays = {**case.arrays, "output": case.arrays["output"] + np.float32(0.25)}
    (copy / "reference" / f"{name}.npz").write_bytes(gold.npz_bytes(arrays, case.params))
    (copy / "reference" / "stale.npz").write_bytes(gold.npz_bytes(arrays, {**case.params, "name": "stale"}))
    (copy / "reference" / "reorg3d_forward_s2.npz").unlink()
    status, lines = run(gold.record, copy)
    assert status == 0, "\n".join(lines)
    assert f"changed reference/{name}.npz: output max abs diff 0.25" in lines
    assert "added   reference/reorg3d_forward_s2.npz" in lines
    assert "removed reference/stale.npz" in lines
    assert snapshot(copy) == snapshot(GOLDEN)


def test_record_never_rewrites_a_darknet_recording_or_its_entry(copy):
    (copy / RECORDING).write_bytes(b"tampered")
    status, lines = run(gold.record, copy)
    assert status == 1
    assert f"{RECORDING}: changed (sha256 differs from manifest.json)" in lines
    assert (copy / RECORDING).read_bytes() == b"tampered"


def test_the_manifest_names_each_file_kind_and_provenance():
    manifest = gold.read_manifest(GOLDEN)
    assert manifest[RECORDING]["kind"] == "darknet-recording"
    assert "59596d7880f6504768df41d6daa586f5cb2b932f" in manifest[RECORDING]["provenance"]
    entry = manifest["reference/gpu_per_channel_relu_floor.npz"]
    assert entry["kind"] == "reference-regression"
    assert entry["provenance"].endswith("gpu_per_channel_relu_floor, seed 202")
    assert manifest["darknet-vectors/PROVENANCE.md"]["kind"] == "provenance"


def test_the_reference_cases_cover_every_dialect_and_both_reorg_sections():
    cases = [rec.load_recording(GOLDEN / "reference" / f"{name}.npz") for name in gold.CASES]
    shortcut_dialects = {c.params["dialect"] for c in cases if c.layer_type == "shortcut"}
    assert shortcut_dialects == {d.value for d in Dialect}
    assert {c.layer_type for c in cases} == {"shortcut", "reorg3d", "reorg"}
    assert all(a.dtype == np.float32 for c in cases for a in c.arrays.values())


@pytest.mark.parametrize("name", list(gold.CASES))
def test_every_reference_case_replays(name):
    case = rec.load_recording(GOLDEN / "reference" / f"{name}.npz")
    assert case.params["generator"] == name and case.params["library"] == "darkspec-reference"
    result = replay(case)
    assert result.verdict == PASS, result.line()


# --- the gate of every conformance run: each tampering fails the run, naming the file and the reason -------------


class ReorgOnly(ReferenceBackend):
    """A backend of one capability: the gate is what these tests look at."""

    name = "reorg-only"

    def capabilities(self):
        # both dtypes of the contract: one it did not declare it would have to refuse (it is the reference: it runs it)
        return frozenset(Capability("reorg3d", "darknet", dtype, "forward") for dtype in ("float32", "float64"))


def corrupt_but_listed(golden):
    """A truncated recording whose manifest entry was updated to match it: the sha256 agrees, the file is junk."""
    path = golden / RECORDING
    path.write_bytes(path.read_bytes()[:100])
    manifest = gold.read_manifest(golden)
    manifest[RECORDING]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (golden / "manifest.json").write_text(json.dumps(manifest))


def without_sha(golden):
    manifest = gold.read_manifest(golden)
    del manifest[RECORDING]["sha256"]
    (golden / "manifest.json").write_text(json.dumps(manifest))


TAMPERINGS = {
    "missing": (lambda g: (g / RECORDING).unlink(), f"{RECORDING}: missing"),
    "changed": (lambda g: (g / RECORDING).write_bytes((g / RECORDING).read_bytes() + b"\0"),
                f"{RECORDING}: changed (sha256 differs from manifest.json)"),
    "unlisted": (lambda g: shutil.copy(g / RECORDING, g / "reference" / "extra.npz"),
                 "reference/extra.npz: unlisted (not in manifest.json)"),
    "undecodable": (corrupt_but_listed, f"{RECORDING}: undecodable (not a readable .npz"),
    "broken-manifest": (lambda g: (g / "manifest.json").write_text("{not json"), "manifest.json: unreadable"),
    "manifest-entry-without-sha": (without_sha, f"manifest.json: entry {RECORDING} has no sha256"),
    "no-manifest": (lambda g: (g / "manifest.json").unlink(), "manifest.json: missing"),
    "no-folder": (lambda g: shutil.rmtree(g), "no such golden folder"),
}


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_each_tampering_fails_the_gate_by_name(copy, tampering):
    """The gate every run passes through (the CLI and the pytest plugin alike, below): one line per problem."""
    tamper, message = TAMPERINGS[tampering]
    tamper(copy)
    result = gold.gate([GOLDEN, copy])
    assert len(result.problems) == 1 and str(copy) in result.problems[0] and message in result.problems[0]
    assert len(result.recordings) >= len(gold.gate([GOLDEN]).recordings)  # the good cases still replay


@pytest.mark.parametrize("tampering", ["changed", "undecodable"])
def test_a_tampered_golden_folder_fails_the_conformance_run_by_name(copy, tmp_path, tampering):
    tamper, message = TAMPERINGS[tampering]
    tamper(copy)
    done = run_in(tmp_path, "darkspec", "conformance", "--backend", "test_golden:ReorgOnly", "--profile", "quick",
                  "--golden", str(copy), "--report-dir", "reports")
    assert done.returncode == 1
    assert f"FAILED golden/gate - {copy}/{message}"[:70] in done.stdout, done.stdout
    notes = [line for line in done.stdout.splitlines() if line.startswith("golden: ")]
    assert notes == [f"golden: {gold.gate([copy]).problems[0]}"]
    assert "Traceback" not in done.stdout + done.stderr
    report = json.loads((tmp_path / "reports" / "conformance.json").read_text())
    assert report["golden_problems"] == [notes[0].removeprefix("golden: ")]
    # the shipped cases still replay: the backend's column is there and passes
    assert report["backends"][0]["matrix"]["reorg3d/darknet/forward"].startswith("pass")


def test_the_plugin_runs_the_gate_too(copy, tmp_path):
    (copy / RECORDING).unlink()
    done = run_in(tmp_path, "pytest", "--darkspec-backend", "test_golden:ReorgOnly", "--darkspec-profile", "quick",
                  "--darkspec-golden", str(copy))
    assert done.returncode == 1
    assert f"{copy}/{RECORDING}: missing" in done.stdout and "FAILED golden/gate" in done.stdout


def test_golden_verify_names_an_undecodable_file(copy):
    corrupt_but_listed(copy)
    status, lines = run(gold.verify, copy)
    assert status == 1 and lines[0].startswith(f"{RECORDING}: undecodable (not a readable .npz")


def test_the_shipped_goldens_are_found_from_any_directory(tmp_path):
    """An installed darkspec reads its golden cases as package data, whatever the working directory."""
    # the editable install's package data is the checkout's golden/ (a strict one links to each of its files)
    assert (gold.shipped() / "README.md").resolve() == (GOLDEN / "README.md").resolve()
    done = run_in(tmp_path, "darkspec", "conformance", "--backend", "test_golden:ReorgOnly", "--profile", "quick",
                  "--report-dir", str(tmp_path / "reports"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "reports" / "conformance.json").read_text())
    golden = [r["examples"] for r in report["backends"][0]["results"] if r["check"] == "golden"]
    in_the_checkout = [r.examples for r in run_golden(ReorgOnly(), gold.gate([GOLDEN]).recordings)]
    assert golden == in_the_checkout and golden[0] > 0
