"""Atomic output folders: build in a temp folder beside the target, rename at the end.

A failure or Ctrl-C at any point leaves no partial folder, and an existing output (replaced
only with ``--force``) stays untouched until the new one is complete.
"""

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import List

from ..errors import IFPError


def _is_model_folder(folder: Path) -> bool:
    try:
        return "ifp" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output(out: Path, force: bool, needed_bytes: int = 0) -> None:
    """Refuse, before anything is read, an output that cannot or must not be written:
    an existing folder without --force, a --force on something that is not an ifp-mlx model
    folder (or an empty one), the current folder, a place that is not writable or too full."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IFPError(f"output {out} exists and is not a folder")
    if out.exists() and not force:
        raise IFPError(f"output {out} exists (use --force to replace it)")
    if out.exists():
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise IFPError(f"output {out} is the current folder or holds it: pick another")
        if any(out.iterdir()) and not _is_model_folder(out):
            raise IFPError(
                f"output {out} is not an ifp-mlx model folder; --force replaces only one of "
                "those (or an empty folder), never other files"
            )
    base = _existing_ancestor(out.parent)
    try:  # a real probe: permissions alone do not tell (root, read-only mounts, /proc)
        if not base.is_dir():
            raise NotADirectoryError
        tempfile.TemporaryFile(dir=base).close()
    except OSError:
        raise IFPError(f"cannot write {out}: {base} is not a writable folder")
    free = shutil.disk_usage(base).free
    if needed_bytes and free < needed_bytes:
        raise IFPError(
            f"not enough room for {out}: the model needs about {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free"
        )


MARKER = ".ifp-partial"  # in a temp folder: "host pid" of the writer


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(parent: Path) -> List[Path]:
    """Remove the temp folders in ``parent`` that a killed writer left (SIGKILL, power loss:
    no handler ran): ours by their marker, written on this host by a process that is gone."""
    removed = []
    try:
        entries = [p for p in Path(parent).iterdir() if p.name.startswith(".") and p.is_dir()]
    except OSError:
        return removed
    for folder in entries:
        try:
            host, pid = (folder / MARKER).read_text().split()
            stale = host == socket.gethostname() and not _alive(int(pid))
        except (OSError, ValueError):
            continue
        if stale and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yield a temp folder; on success it replaces ``out``, on any error it is removed (and
    one a killed writer left is removed by the next writer in the same place)."""
    out = Path(out)
    check_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        (tmp / MARKER).write_text(f"{socket.gethostname()} {os.getpid()}")
    except OSError as e:
        raise IFPError(f"cannot write {out}: {e.strerror or e}")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
    try:
        yield tmp
        (tmp / MARKER).unlink()
        check_output(out, force)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:  # disk full, read-only, permissions: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({Path(e.filename).name})" if e.filename else ""
        raise IFPError(f"cannot write {out}: {e.strerror or e}{where}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
