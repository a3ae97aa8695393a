"""The folders darkspec writes into, checked before a run rather than after it."""

from __future__ import annotations

from pathlib import Path

from darkspec.errors import DarkspecError


def check_writable(directory: Path, option: str = "--report-dir") -> None:
    """Before a run: the report folder can be created and written, else a DarkspecError naming it."""
    probe = Path(directory) / ".darkspec-write-check"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise DarkspecError(option, str(directory), "a folder this user can create and write",
                            code="report-dir-unwritable", reason=f"{type(error).__name__}: {error.strerror}") from None
