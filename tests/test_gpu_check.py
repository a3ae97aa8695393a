"""benchmarks/gpu_check.py, as far as a machine without a GPU can check it: it stops cleanly, says why, and leaves
its log and summary in the folder it was given."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def fake_nvidia_smi(folder: Path) -> Path:
    """A stand-in nvidia-smi that lists one GPU, so that the check goes past its first step."""
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    tool.chmod(0o755)
    return folder


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: it has a GPU")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == gpu_check.NO_GPU
    assert "no NVIDIA GPU here" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is False and "no NVIDIA GPU" in summary["stopped"]
    assert "no NVIDIA GPU here" in (out / "gpu_check.log").read_text()


def test_a_missing_import_stops_the_check_with_the_list_before_installing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES",
                        (("numpy", "numpy"), ("darkspec_no_such_module", "no-such-package")))
    status = gpu_check.main([str(tmp_path / "out"), "--budget", "60"])
    assert status == gpu_check.MISSING_IMPORTS
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gpu"] == "NVIDIA H200, 580.159.04, 143771 MiB"
    assert summary["stopped"].endswith("darkspec_no_such_module (no-such-package)")
    assert "numpy" not in summary["stopped"]
    assert "install darkspec" not in capsys.readouterr().out


def test_a_step_past_its_limit_is_a_timeout_and_the_next_steps_still_run(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=60)
    check.limit = lambda cap, reserve: 1.0
    assert not check.run("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], cap=1, reserve=0)
    assert check.run("passes", [sys.executable, "-c", "print('done')"], cap=1, reserve=0)
    assert not check.run("fails", [sys.executable, "-c", "raise SystemExit(5)"], cap=1, reserve=0)
    assert [(s.name, s.verdict) for s in check.steps] == [("hangs", "TIMEOUT"), ("passes", "pass"),
                                                          ("fails", "FAIL (5)")]
    assert check.summary() == 1
    assert "done" in (tmp_path / "gpu_check.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["passed"] is False


def test_limits_keep_time_for_the_later_steps(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=100)
    assert check.limit(cap=30, reserve=0) == pytest.approx(30, abs=1)
    assert check.limit(cap=300, reserve=50) == pytest.approx(50, abs=1)
    assert check.limit(cap=300, reserve=200) == 10.0
