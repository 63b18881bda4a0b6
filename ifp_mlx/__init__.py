"""ifp-mlx: per-prompt FFN pruning (instruction-following pruning) on MLX."""

from .errors import IFPError
from .generate import generate
from .loading import load

__version__ = "0.1.0"
__all__ = ["load", "generate", "IFPError"]
