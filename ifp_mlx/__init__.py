"""ifp-mlx: per-prompt FFN pruning (instruction-following pruning) on MLX."""


def _import_mlx_lm_within_fd_limit() -> None:
    """mlx-lm raises the open-file limit to (2048, 4096) when imported; where the hard limit
    is lower (a container, ``ulimit -Hn``) that raises ValueError at import and every program
    would die with a traceback. Import it once with the request cut to what is allowed."""
    try:
        import resource
    except ImportError:  # not a POSIX system: mlx-lm does not ask
        return
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard >= 4096:
        return
    real = resource.setrlimit

    def clamped(which, limits):
        if which == resource.RLIMIT_NOFILE:
            limits = tuple(min(v, hard) for v in limits)
        real(which, limits)

    resource.setrlimit = clamped
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = real


_import_mlx_lm_within_fd_limit()

from . import bundled, loading  # noqa: E402
from .errors import IFPError  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402
from .loading import load  # noqa: E402

# Bundled model names (and None: the default) are folders to load(); wired here, above both.
loading.register_names(bundled.model_path, bundled.BUNDLED)

from .selection import Selection  # noqa: E402

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream_generate", "Selection", "IFPError"]
