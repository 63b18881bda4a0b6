"""Files a model folder names stay in that folder.

A folder is input: its shard index, its config's predictor entry or a symlink could name
``/etc/passwd``, ``../../secret`` or a FIFO (which blocks a reader for ever). Every file we
read because a folder says so goes through :func:`inside` or :func:`check_file`. Symlinks are
followed only where they land inside the folder, or in the blob store of the Hugging Face cache
the folder is a snapshot of (``models--org--name/snapshots/REV`` → ``../../blobs/HASH``).
"""

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import List

from .errors import IFPError


def roots(folder: Path) -> List[Path]:
    """Where a file of ``folder`` may really live."""
    folder = Path(folder).resolve()
    out = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        out.append(folder.parent.parent / "blobs")
    return out


def check_file(folder: Path, path: Path, what: str = "file") -> Path:
    """``path`` (in ``folder``) if it resolves inside the folder and, when it exists, is a
    regular file; else one IFPError."""
    real = Path(path).resolve()
    if not any(real == r or r in real.parents for r in roots(folder)):
        raise IFPError(f"{folder}: {what} {Path(path).name} leads outside the model folder")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return Path(path)
    except OSError as e:
        raise IFPError(f"{folder}: cannot read {what} {Path(path).name}: {e.strerror}")
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a special file (FIFO, device or socket)"
        raise IFPError(f"{folder}: {what} {Path(path).name} is {kind}, not a regular file")
    return Path(path)


def inside(folder: Path, name, what: str = "file") -> Path:
    """``folder / name`` for a relative ``name`` that stays in ``folder`` (no absolute path,
    no ``..``), checked by :func:`check_file`."""
    if not isinstance(name, str) or not name.strip():
        raise IFPError(f"{folder}: {what} must be a file name, not {name!r}")
    parts = PurePosixPath(name).parts + PureWindowsPath(name).parts
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or ".." in parts:
        raise IFPError(f"{folder}: {what} {name!r} is outside the model folder")
    return check_file(folder, Path(folder) / name, what)


def check_files(folder: Path, paths, what: str = "weight file") -> list:
    """:func:`check_file` on each of ``paths`` (e.g. a glob's matches)."""
    return [check_file(folder, p, what) for p in paths]
