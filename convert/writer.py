"""Atomic output folders: build in a temp folder beside the target, rename at the end.

A failure or Ctrl-C at any point leaves no partial folder, and an existing output (replaced
only with ``--force``) stays untouched until the new one is complete.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import IFPError


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise IFPError(f"output {out} exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise IFPError(f"output {out} exists and is not a folder")


@contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yield a temp folder; on success it replaces ``out``, on any error it is removed."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
    try:
        yield tmp
        check_output(out, force)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
