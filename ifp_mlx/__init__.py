"""ifp-mlx: per-prompt FFN pruning (instruction-following pruning) on MLX."""

from .errors import IFPError
from .generate import generate, stream_generate
from .loading import load

__version__ = "0.1.0"
from .selection import Selection

__all__ = ["load", "generate", "stream_generate", "Selection", "IFPError"]
