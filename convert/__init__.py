"""Torch / safetensors / GGUF checkpoints → ifp-mlx model folders (importable as ``ifp_mlx.convert``)."""

from .core import Summary, convert

__all__ = ["convert", "Summary"]
