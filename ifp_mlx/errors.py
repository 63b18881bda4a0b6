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
    """Turn IFPError / Ctrl-C into one stderr line and a non-zero exit."""
    try:
        yield
    except IFPError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130)
