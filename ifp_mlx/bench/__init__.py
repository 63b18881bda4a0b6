"""The benchmarks behind ``ifp-bench`` (``ifp_mlx.apps.bench``), one module each; every one
measures what it compares side by side in one run: ``speed``, ``memory``, ``answers``,
``policy``, ``quant``, ``serve`` (the server under load) and ``distributed`` (one process of
the sharded run)."""
