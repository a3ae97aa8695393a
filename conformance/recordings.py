"""Reading Darknet recordings: one ``.npz`` per case, in the format described in ``golden/darknet-vectors``.

A recording holds the cfg text Darknet parsed, what its parser and layer functions did with it (``status``), and
float32 arrays of every buffer before and after forward, backward and update. This module only reads them; the
replay lives in :mod:`darkspec.conformance.vectors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from darkspec.errors import DarkspecError

#: Statuses a recording can have, as its ``params_json`` writes them.
OK = "ok"
PARSE_FAILED = "parse_failed"
CRASH_IN_FORWARD = "crash_in_forward"
CRASH_AFTER_FORWARD = "crash_after_forward"
STATUSES = (OK, PARSE_FAILED, CRASH_IN_FORWARD, CRASH_AFTER_FORWARD)
#: The arrays a recording of each status must hold: what Darknet ran on, and what it computed before it stopped.
REQUIRED_ARRAYS = {OK: ("x", "output"), PARSE_FAILED: (), CRASH_IN_FORWARD: ("x",),
                   CRASH_AFTER_FORWARD: ("x", "output")}
REQUIRED_PARAMS = ("status", "library", "cfg")
FORMAT = "a recording in the format of golden/darknet-vectors (README)"


class RecordingError(DarkspecError):
    """A recording that cannot be replayed: unreadable, or lacking what its format requires. Names the file."""

    def __init__(self, path, problem: str):
        super().__init__("recording", str(path), FORMAT, code="bad-recording", reason=problem)


class Arrays(dict):
    """A recording's arrays by name; asking for one it lacks is a RecordingError that names the file."""

    def __init__(self, path: Path, arrays: dict):
        super().__init__(arrays)
        self.path = path

    def __missing__(self, name):
        raise RecordingError(self.path, f"no array {name!r}")


@dataclass(frozen=True)
class Recording:
    """One recorded case: its parameters (``params``) and arrays (``arrays``), read from ``path``."""

    path: Path
    params: dict
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def name(self) -> str:
        return self.params.get("name", self.path.stem)

    @property
    def status(self) -> str:
        return self.params["status"]

    @property
    def library(self) -> str:
        """``alexeyab`` or ``pjreddie``: which Darknet made the recording."""
        return self.params["library"]

    @property
    def cfg(self) -> str:
        return self.params["cfg"]

    @property
    def layer_type(self) -> str:
        """The section name of the case's layer: the last section of the cfg."""
        sections = [line.strip() for line in self.cfg.splitlines() if line.strip().startswith("[")]
        return sections[-1].strip("[]").lower()

    @property
    def network_layers(self) -> list[dict]:
        """The layer table Darknet's parser built (absent when parsing failed)."""
        return self.params.get("network", {}).get("layers", [])

    @property
    def update(self) -> dict:
        """``learning_rate``, ``learning_rate_scale``, ``momentum``, ``decay``, ``batch`` of the update step."""
        return self.params.get("update", {})


def load_recording(path: str | Path) -> Recording:
    """Read and check one recording; a RecordingError names the file and what is wrong with it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = {name: data[name] for name in data.files}
    except Exception as error:  # whatever NumPy's and zipfile's decoders raise: the file is not a readable .npz
        raise RecordingError(path, f"not a readable .npz ({type(error).__name__}: {error})") from None
    if "params_json" not in stored:
        raise RecordingError(path, "no params_json array")
    try:
        params = json.loads(str(stored.pop("params_json")))
    except ValueError as error:
        raise RecordingError(path, f"params_json is not JSON ({error})") from None
    if not isinstance(params, dict):
        raise RecordingError(path, f"params_json holds a {type(params).__name__}, expected an object")
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise RecordingError(path, f"params_json lacks {', '.join(missing)}")
    if params["status"] not in STATUSES:
        raise RecordingError(path, f"status {params['status']!r} is none of {', '.join(STATUSES)}")
    for name in REQUIRED_ARRAYS[params["status"]]:
        if name not in stored:
            raise RecordingError(path, f"status {params['status']} but no array {name!r}")
    for name, array in stored.items():
        if array.dtype != np.float32:
            raise RecordingError(path, f"array {name!r} is {array.dtype}, expected float32")
    return Recording(path=path, params=params, arrays=Arrays(path, stored))


def recording_paths(*roots: str | Path) -> list[Path]:
    """Every recording under the given files or folders, in a stable (sorted) order."""
    paths = []
    for root in map(Path, roots):
        paths += [root] if root.is_file() else sorted(root.rglob("*.npz"))
    return paths


def iter_recordings(*roots: str | Path):
    """Every recording under the given files or folders, loaded; the first bad one raises its RecordingError."""
    for path in recording_paths(*roots):
        yield load_recording(path)
