"""Reading Darknet recordings: one ``.npz`` per case, in the format described in ``golden/darknet-vectors``.

A recording holds the cfg text Darknet parsed, what its parser and layer functions did with it (``status``), and
float32 arrays of every buffer before and after forward, backward and update. This module only reads them; the
replay lives in :mod:`darkspec.conformance.vectors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

#: Statuses a recording can have, as its ``params_json`` writes them.
OK = "ok"
PARSE_FAILED = "parse_failed"
CRASH_IN_FORWARD = "crash_in_forward"
CRASH_AFTER_FORWARD = "crash_after_forward"


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
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        params = json.loads(str(data["params_json"]))
        arrays = {name: data[name] for name in data.files if name != "params_json"}
    return Recording(path=path, params=params, arrays=arrays)


def iter_recordings(*roots: str | Path) -> Iterator[Recording]:
    """Every recording under the given files or folders, in a stable (sorted) order."""
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*.npz"))
        for path in paths:
            yield load_recording(path)
