"""User-facing errors.

Anything raised as :class:`IFPError` is a user mistake or an unusable input, not a bug: the
command-line programs print it as one line and exit non-zero instead of showing a traceback.
"""

import sys
from contextlib import contextmanager


class IFPError(Exception):
    """A clear, one-line problem with the user's input."""


@contextmanager
def cli_errors(prog: str):
    """Turn IFPError / Ctrl-C / a lost distributed rank into one stderr line and a non-zero
    exit."""
    try:
        yield
    except IFPError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130)
    except RuntimeError as e:  # a distributed rank that went away: not a bug of ours
        from .distributed import lost_peer

        lost = lost_peer(e)
        if lost is None:
            raise
        print(f"{prog}: error: {lost}", file=sys.stderr)
        raise SystemExit(1)


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` that is not a local path: a missing ``data/model`` whose ``data`` folder
    exists here is a path (a typo), never sent to the hub."""
    import re
    from pathlib import Path

    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text) or Path(text).exists():
        return False
    return not Path(text.split("/")[0]).exists()


def read_json(path, what: str = "config") -> dict:
    """A JSON object from ``path``, or one clear error line (missing, garbled, not an object)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise IFPError(f"missing {what}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IFPError(f"garbled {what} {path}: not valid JSON ({e})")
    if not isinstance(data, dict):
        raise IFPError(f"garbled {what} {path}: expected a JSON object")
    return data


def write_json(path, data, indent: int = 1) -> None:
    """Write JSON atomically (temporary file + rename): a reader never sees half a file."""
    import json
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
