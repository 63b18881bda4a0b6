"""User-facing errors, and the small file helpers every layer needs: the ground floor, it
imports nothing of ours.

Anything raised as :class:`IFPError` is a user mistake or an unusable input, not a bug: the
command-line programs print it as one line and exit non-zero instead of showing a traceback
(``ifp_mlx.apps.common.cli_errors``).
"""


class IFPError(Exception):
    """A clear, one-line problem with the user's input."""


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


def set_ifp_entries(folder, **entries) -> None:
    """Set entries of a model folder's ``ifp`` config (None removes one), atomically: the
    predictor and the searched budget live there, beside the model they were made for."""
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = read_json(path)
    ifp = config.setdefault("ifp", {})
    for key, value in entries.items():
        if value is None:
            ifp.pop(key, None)
        else:
            ifp[key] = value
    write_json(path, config, indent=4)
