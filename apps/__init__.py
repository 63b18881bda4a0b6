"""Thin command-line programs (importable as ``ifp_mlx.apps``)."""
