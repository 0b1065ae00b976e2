"""Output folders: fail before a long job, not after it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_writable_dir"]


def check_writable_dir(folder, *, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it.

    Raises
    ------
    PermissionError
        The folder cannot be created or written to (read-only file system, permissions), or
        the path is an existing file.
    """
    p = Path(os.path.expanduser(os.fspath(folder)))
    if p.exists() and not p.is_dir():
        raise PermissionError(f"{what} {str(p)!r} is an existing file, not a folder.")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(
            f"cannot create the {what} {str(p)!r}: {exc.strerror or exc}. Choose a writable "
            "folder."
        ) from exc
    probe = p / f".skrtl_write_test_{os.getpid()}"
    try:
        probe.write_text("")
    except OSError as exc:
        raise PermissionError(
            f"cannot write to the {what} {str(p)!r}: {exc.strerror or exc}. Choose a writable "
            "folder."
        ) from exc
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return p
