"""Pruned decoding on a model sharded over ``mx.distributed`` (run under ``mlx.launch``).

Tensor parallel as mlx-lm does it: attention heads split across ranks by the family's own
``model.shard`` (q/k/v all-to-sharded, o sharded-to-all), embeddings and head replicated. Each
rank holds a contiguous range of every FFN layer's units — their gate/up rows and unit-major
down rows, which in the unit file is one contiguous block, so a rank reads only its own bytes
(memory or flash store alike) — and the MLP's partial output is summed over ranks with one
``all_sum`` per layer. Everything below the FFN store (selection, materialization, the flash
reads) then works on the rank's local units unchanged.

Selection is identical on every rank: each rank scores its own units (GRIFFIN's per-token
norm is summed over all ranks' units), the scores are assembled with one ``all_sum``, and the
top-k is taken either over the whole layer (``global``: the single-machine selection, ranks may
hold unequal counts) or within each rank's range (``balanced``: equal work per rank).
"""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import IFPError
from .model import find_ffns
from .selection import IFPMixin, Selection, top_units

POLICIES = ("global", "balanced")
TIMEOUT_ENV = "IFP_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds for the ranks to connect and answer the first collective


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise IFPError(f"shard policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    return policy


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise IFPError(f"{TIMEOUT_ENV} must be a number of seconds, not {text!r}")
    if not value > 0:
        raise IFPError(f"{TIMEOUT_ENV} must be > 0 seconds, not {text!r}")
    return value


# Runs beside a rank while it connects: MLX's init blocks without releasing the GIL, so no
# thread or signal handler of the rank itself can run until it returns.
_WATCHDOG = """
import os, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
end = time.monotonic() + timeout
while time.monotonic() < end:
    time.sleep(0.05)
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(0)
print(message, file=sys.stderr, flush=True)
os.kill(pid, 15)
"""


def connect(timeout: Optional[float] = None) -> mx.distributed.Group:
    """The launcher's group, after a first collective that every rank answered in time.

    A rank that never started, or a hostfile whose addresses are wrong, would otherwise leave
    the others blocked forever in ``init`` (the ring backend retries its connections). A
    watchdog process ends this rank after ``timeout`` seconds (default ``$IFP_DIST_TIMEOUT``
    or 60) with one clear line on stderr: the blocked call cannot be interrupted from inside.
    """
    import subprocess
    import sys

    timeout = _timeout() if timeout is None else timeout
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"ifp-mlx: error: rank {rank}: the other ranks did not answer within {timeout:g} s (a "
        "rank that did not start or died, or a wrong hostfile: check its addresses and that "
        f"every host runs the same command); ${TIMEOUT_ENV} sets the wait"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
        stdin=subprocess.DEVNULL,
    )
    try:
        group = mx.distributed.init()
        mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
    except Exception as e:  # a backend that cannot start says why
        raise IFPError(f"rank {rank}: cannot start mx.distributed: {_first_line(e)}")
    finally:
        watchdog.kill()
        watchdog.wait()
    return group


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def lost_peer(e: BaseException) -> Optional[IFPError]:
    """A backend's error for a peer that went away, as one clear line (else None)."""
    text = str(e)
    if isinstance(e, RuntimeError) and text.startswith(("[ring]", "[mpi]", "[jaccl]", "[nccl]")):
        return IFPError(f"a rank stopped answering ({_first_line(e)}): did a rank exit or a "
                        "machine drop off the network? Start all ranks again")  # fmt: skip
    return None


def split(units: int, size: int) -> List[Tuple[int, int]]:
    """Contiguous ``(lo, hi)`` unit ranges, one per rank, sizes differing by at most one."""
    bounds = np.cumsum([0] + [units // size + (r < units % size) for r in range(size)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Shard:
    """This rank's place in the group: its unit range of every FFN layer."""

    group: mx.distributed.Group
    units: List[int]  # whole layers
    policy: str = "global"
    attention: bool = False  # attention heads split across ranks (else replicated)

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    def ranges(self, layer: int) -> List[Tuple[int, int]]:
        return split(self.units[layer], self.size)

    def local(self, layer: int) -> Tuple[int, int]:
        return self.ranges(layer)[self.rank]


class ShardedMixin(IFPMixin):
    """An ifp-mlx model whose FFN store holds this rank's units: selections are made over the
    whole layers (identically on every rank) and materialized from the rank's own units."""

    @property
    def sharding(self) -> Shard:
        """This rank's place in the group (``shard`` stays mlx-lm's method)."""
        return self.__dict__["_ifp_shard"]

    @property
    def shard_policy(self) -> str:
        return self.sharding.policy

    @shard_policy.setter
    def shard_policy(self, policy: str) -> None:
        self.sharding.policy = check_policy(policy)

    @property
    def ffn_units(self) -> List[int]:
        return list(self.sharding.units)

    @property
    def local_units(self) -> List[int]:
        """This rank's units per layer."""
        return list(self._ifp_store().units)

    def unit_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x.sum(-1, keepdims=True), group=self.sharding.group)

    def _top_units(self, scores: List[mx.array], ks: List[int], block: int) -> List[np.ndarray]:
        shard = self.sharding
        full = self._assemble(scores)
        if shard.policy == "global":
            return [top_units(s, k, block) for s, k in zip(full, ks)]
        out = []  # balanced: each rank's share of k taken within its own range
        for layer, (s, k) in enumerate(zip(full, ks)):
            picks = []
            for (lo, hi), k_r in zip(shard.ranges(layer), split(k, shard.size)):
                part = k_r[1] - k_r[0]
                picks.append(lo + top_units(s[lo:hi], part, block) if part else [])
            out.append(np.concatenate(picks).astype(np.int32))
        return out

    def _assemble(self, scores: List[mx.array]) -> List[mx.array]:
        """Every layer's scores over all its units, the same on every rank: each rank puts
        its own units' scores (a learned head scores whole layers: its local slice) into a
        zero vector and one ``all_sum`` adds them (adding zeros is exact)."""
        shard, parts = self.sharding, []
        for layer, s in enumerate(scores):
            lo, hi = shard.local(layer)
            s = s.astype(mx.float32)
            if s.shape[0] == shard.units[layer] and shard.size > 1:
                s = s[lo:hi]
            parts.append(mx.pad(s, (lo, shard.units[layer] - hi)))
        total = mx.distributed.all_sum(mx.concatenate(parts), group=shard.group)
        return mx.split(total, np.cumsum(shard.units)[:-1].tolist())

    def apply_selection(self, selection: Selection) -> Selection:
        """Materialize this rank's part of a whole-layer selection (its kept units, shifted
        into its range; possibly none of a layer under ``global``)."""
        shard = self.sharding
        if len(selection.indices) != len(shard.units):
            raise IFPError(
                f"selection has {len(selection.indices)} layers, model has {len(shard.units)}"
            )
        local = []
        for layer, idx in enumerate(selection.indices):
            lo, hi = shard.local(layer)
            idx = np.asarray(idx)
            local.append((idx[(idx >= lo) & (idx < hi)] - lo).astype(np.int32))
        part = Selection(local, self.local_units, selection.predictor,
                         compensation=selection.compensation)  # fmt: skip
        super().apply_selection(part)
        for name in ("materialize_ms", "bytes", "store", "bytes_read", "read_calls"):
            setattr(selection, name, getattr(part, name))
        selection.extra.update(rank=shard.rank, ranks=shard.size, policy=shard.policy,
                               local_kept=part.kept)  # fmt: skip
        object.__setattr__(self, "_ifp_selection", selection)
        return selection


_CLASSES: dict = {}


def _sharded_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Sharded{cls.__name__}", (ShardedMixin, cls), {})
    return _CLASSES[cls]


_SUMMED: dict = {}


def _summed(mlp: nn.Module, group: mx.distributed.Group) -> None:
    """Make ``mlp`` (this rank's units) return the sum over ranks of its output: one
    ``all_sum`` per layer. The module keeps its path and attributes (the unit file's layer
    map, the taps, LoRA wrappers all still find it)."""
    base = type(mlp)
    if base not in _SUMMED:
        def call(self, x):  # fmt: skip
            return mx.distributed.all_sum(base.__call__(self, x), group=self.__dict__["_ifp_group"])

        _SUMMED[base] = type(f"Summed{base.__name__}", (base,), {"__call__": call})
    mlp.__class__ = _SUMMED[base]
    mlp.__dict__["_ifp_group"] = group


def _heads_split(model: nn.Module, size: int) -> bool:
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", None)
    kv = getattr(args, "num_key_value_heads", None) or heads
    return isinstance(heads, int) and heads % size == 0 and kv % size == 0


class _Placeholder(nn.Module):
    """Stands in for an FFN while mlx-lm's ``shard`` splits attention (it shards the MLP too;
    ours is split by unit ranges instead)."""

    def __init__(self, size: int):
        super().__init__()
        self.gate_proj = nn.Linear(size, size, bias=False)
        self.up_proj = nn.Linear(size, size, bias=False)
        self.down_proj = nn.Linear(size, size, bias=False)


def _shard_attention(model: nn.Module, group: mx.distributed.Group) -> bool:
    """Split attention heads with the family's own mlx-lm ``shard``; False (attention stays
    replicated, every rank computes all heads) for a family without one or heads that do not
    divide by the number of ranks."""
    size = group.size()
    if size == 1 or not hasattr(model, "shard") or not _heads_split(model, size):
        return False
    ffns = find_ffns(model)
    parents = []
    for path, mlp in ffns:
        parent_path, _, name = path.rpartition(".")
        parent = model
        for part in parent_path.split("."):
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        parents.append((parent, name, mlp))
        setattr(parent, name, _Placeholder(size))
    try:
        model.shard(group)
    finally:
        for parent, name, mlp in parents:
            setattr(parent, name, mlp)
    return True


def shard_model(model: nn.Module, units, group: mx.distributed.Group, policy: str) -> Shard:
    """Shard a freshly loaded model (its FFN units not read yet) for this rank: attention as
    mlx-lm does it, the unit file narrowed to this rank's unit range, the MLPs summed."""
    check_policy(policy)
    spec = units.spec
    whole = [layer.units for layer in spec.layers]
    shard = Shard(group, whole, policy)
    for i, layer in enumerate(spec.layers):  # a rank's units are one block of records
        lo, hi = shard.local(i)
        layer.offset += lo * layer.record
        layer.units = hi - lo
    shard.attention = _shard_attention(model, group)
    for tmpl in model.__dict__.get("_ifp_templates", []):
        down = tmpl[2]
        if shard.rank != 0 and "bias" in down:  # added once, by rank 0
            down.bias = mx.zeros_like(down.bias)
    for _, mlp in find_ffns(model):
        _summed(mlp, group)
    model.__class__ = _sharded_class(type(model))
    object.__setattr__(model, "_ifp_shard", shard)
    return shard


def same_everywhere(group: mx.distributed.Group, values: Sequence[float], what: str) -> None:
    """Refuse to run when the ranks disagree on ``values`` (e.g. the model file's id: two Macs
    with different copies of a folder would silently compute nonsense)."""
    mine = mx.array([float(v) for v in values], mx.float32)
    every = np.asarray(mx.distributed.all_gather(mine[None], group=group))
    if not (every == every[0]).all():
        raise IFPError(f"the ranks disagree on {what}: every rank must load the same folder")


def broadcast_text(group: mx.distributed.Group, text: Optional[str]) -> str:
    """Rank 0's ``text`` on every rank (a prompt, a chat line, a request): only rank 0 reads
    input, and every rank must run the same tokens."""
    if group.size() == 1:
        return text or ""
    data = (text or "").encode("utf-8") if group.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array([len(data)]), group=group).item())
    buf = np.zeros(n, np.int32)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    out = np.asarray(mx.distributed.all_sum(mx.array(buf), group=group)).astype(np.uint8)
    return out.tobytes().decode("utf-8")


def broadcast_flag(group: mx.distributed.Group, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "stop this answer": a client hung up)."""
    if group.size() == 1:
        return flag
    mine = mx.array([int(flag) if group.rank() == 0 else 0])
    return bool(mx.distributed.all_sum(mine, group=group).item())


def sync_seed(group: mx.distributed.Group) -> None:
    """One random seed on every rank: sampling must draw the same tokens everywhere (the
    ranks' logits are bit-identical after the all_sums), or a rank would stop early."""
    seed = int(np.random.SeedSequence().entropy % (1 << 30)) if group.rank() == 0 else 0
    seed = int(mx.distributed.all_sum(mx.array([seed]), group=group).item())
    mx.random.seed(seed)
