"""Where FFN units live: a unit-bundled file, and the memory and flash stores over it.

File layout (``ifp.ffn_store`` in config.json declares it): a 4 KiB header page (magic + the
id the config names, so a swapped file is caught), then one page-aligned block per FFN layer
holding ``units`` fixed-size *records*. Record ``i`` bundles everything unit ``i`` owns — its
gate row, up row and unit-major down row, with their quantization scales/biases and per-unit
biases — so one kept unit is one contiguous read, and a run of adjacent kept units is one
read ("row-column bundling", LLM in a flash, arXiv 2312.11514).

- :class:`MemoryStore` keeps every unit resident (gathers are lazy ``mx.take``).
- :class:`FlashStore` keeps none: selection reads exactly the kept units with positional
  reads into fresh arrays, a dense pass streams one layer's units at a time.
Both build layers from the same bytes, so the same selection gives bit-identical logits.
"""

import copy
import os
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import IFPError
from .model import find_ffns

FILE = "ffn-units.bin"
LAYOUT = "unit-bundled"
MAGIC = b"IFPFFN01"
PAGE = 4096
PROJ = ("gate_proj", "up_proj", "down_proj")
# Arrays with one row per unit; down_proj's bias is per output, so it stays with the model.
UNIT_ARRAYS = {
    "gate_proj": ("weight", "scales", "biases", "bias"),
    "up_proj": ("weight", "scales", "biases", "bias"),
    "down_proj": ("weight", "scales", "biases"),
}
DTYPES = ("float32", "float16", "bfloat16", "uint8", "uint16", "uint32", "int8", "int32")
RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
Modules = Tuple[nn.Module, nn.Module, nn.Module]  # gate, up, down


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


@dataclass
class Field:
    name: str  # "gate_proj.weight", ...
    dtype: str
    shape: Tuple[int, ...]  # one unit's part

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * getattr(mx, self.dtype).size


@dataclass
class LayerSpec:
    path: str  # the MLP's module path, e.g. "model.layers.0.mlp"
    units: int
    offset: int
    fields: List[Field]
    quantization: Dict[str, Optional[dict]]  # per projection: {bits, group_size, mode} | None
    crc32: Optional[int] = None  # of the layer's records as written (load(verify_store=True))

    @property
    def record(self) -> int:
        return sum(f.nbytes for f in self.fields)

    @property
    def end(self) -> int:
        return self.offset + self.units * self.record

    def numpy_dtype(self) -> np.dtype:
        """The record as a packed numpy struct of raw unsigned words (bfloat16 has no numpy
        type; the bits are reinterpreted as the declared dtype on the MLX side)."""
        return np.dtype([(f.name, RAW[getattr(mx, f.dtype).size], f.shape) for f in self.fields])


@dataclass
class FileSpec:
    file: str
    id: str
    bytes: int
    layers: List[LayerSpec]
    layout: str = LAYOUT

    def to_dict(self) -> dict:
        d = asdict(self)
        for layer, spec in zip(d["layers"], self.layers):  # a field is [name, dtype, shape]
            layer["fields"] = [[f.name, f.dtype, list(f.shape)] for f in spec.fields]
        return d

    @classmethod
    def from_dict(cls, d, folder: Path) -> "FileSpec":
        """Parse the config's declaration; anything malformed is one IFPError."""
        bad = IFPError(f"{folder}: garbled ifp.ffn_store in config.json (reconvert the model)")
        try:
            if d.get("layout") != LAYOUT:
                raise IFPError(f"{folder}: unknown FFN file layout {d.get('layout')!r}")
            layers = []
            for entry in d["layers"]:
                fields = [Field(str(n), str(t), tuple(int(s) for s in shape))
                          for n, t, shape in entry["fields"]]  # fmt: skip
                if any(f.dtype not in DTYPES for f in fields):
                    raise bad
                quant = {p: _quantization(entry["quantization"].get(p), bad) for p in PROJ}
                crc = entry.get("crc32")
                if crc is not None and (isinstance(crc, bool) or not isinstance(crc, int)):
                    raise bad
                spec = LayerSpec(str(entry["path"]), int(entry["units"]), int(entry["offset"]),
                                 fields, quant, crc)  # fmt: skip
                if spec.units < 1 or spec.offset < PAGE or not fields:
                    raise bad
                layers.append(spec)
            spec = cls(str(d["file"]), str(d["id"]), int(d["bytes"]), layers)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise bad
        if Path(spec.file).name != spec.file or not layers or layers[-1].end != spec.bytes:
            raise bad
        return spec


def _quantization(q, bad: IFPError) -> Optional[dict]:
    if q is None:
        return None
    if not isinstance(q, dict) or set(q) != {"bits", "group_size", "mode"}:
        raise bad
    if not all(isinstance(q[k], int) for k in ("bits", "group_size")) or not isinstance(
        q["mode"], str
    ):
        raise bad
    return q


# ---------------------------------------------------------------- modules <-> unit arrays


def unit_arrays(mods: Modules) -> List[Tuple[str, mx.array]]:
    """(field name, array) of every per-unit array of one FFN layer, in record order."""
    out = []
    for proj, module in zip(PROJ, mods):
        for name in UNIT_ARRAYS[proj]:
            if isinstance(module.get(name), mx.array):
                out.append((f"{proj}.{name}", module[name]))
    return out


def template(mods: Modules) -> Modules:
    """Shallow copies without their per-unit arrays: what a layer is made from once its
    units are read (module type, quantization settings, down_proj's bias)."""
    out = []
    for proj, module in zip(PROJ, mods):
        t = copy.copy(module)
        for name in UNIT_ARRAYS[proj]:
            if name in t:
                del t[name]
        out.append(t)
    return tuple(out)


def build(tmpl: Modules, arrays: Dict[str, mx.array]) -> Modules:
    """A layer from its template (or a full layer: its unit arrays are replaced) and unit arrays."""
    out = []
    for proj, t in zip(PROJ, tmpl):
        m = copy.copy(t)
        for name in UNIT_ARRAYS[proj]:
            if f"{proj}.{name}" in arrays:
                m[name] = arrays[f"{proj}.{name}"]
        out.append(m)
    return tuple(out)


def quantization_of(module: nn.Module) -> Optional[dict]:
    if "scales" not in module:
        return None
    return {"bits": module.bits, "group_size": module.group_size, "mode": module.mode}


def layer_modules(mlp: nn.Module) -> Modules:
    return (mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def install(mlp: nn.Module, mods: Sequence[nn.Module]) -> None:
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = mods


# ---------------------------------------------------------------- writing


def write_model_files(folder: Path, model: nn.Module) -> dict:
    """Write a model folder's weights: the FFN units into the unit-bundled file, everything
    else with mlx-lm's ``save_model`` (so the FFN bytes exist once on disk). Returns the
    ``ifp.ffn_store`` declaration."""
    from mlx_lm.utils import get_total_parameters

    folder = Path(folder)
    total = get_total_parameters(model)  # of the whole model, FFN units included
    ffns = find_ffns(model)
    layers, offset = [], PAGE
    file_id = uuid.uuid4().hex
    with open(folder / FILE, "wb") as f:
        f.write(MAGIC + bytes.fromhex(file_id))
        for path, mlp in ffns:
            mods = layer_modules(mlp)
            arrays = unit_arrays(mods)
            fields = [Field(n, _dtype_name(a.dtype), tuple(a.shape[1:])) for n, a in arrays]
            quant = {p: quantization_of(m) for p, m in zip(PROJ, mods)}
            spec = LayerSpec(path, arrays[0][1].shape[0], offset, fields, quant)
            records = np.empty(spec.units, spec.numpy_dtype())
            for (name, a), fld in zip(arrays, fields):
                raw = a.view(getattr(mx, f"uint{8 * a.dtype.size}")) if a.dtype.size > 1 else a
                records[name] = np.asarray(raw)
            data = records.tobytes()
            spec.crc32 = zlib.crc32(data)
            f.seek(offset)
            f.write(data)
            layers.append(spec)
            offset = -(-spec.end // PAGE) * PAGE
        size = layers[-1].end
        f.truncate(size)
    spec = FileSpec(FILE, file_id, size, layers)
    originals = [layer_modules(m) for _, m in ffns]
    try:
        for (_, mlp), mods in zip(ffns, originals):
            install(mlp, template(mods))
        save_weights(folder, dict(tree_flatten(model.parameters())), total)
    finally:
        for (_, mlp), mods in zip(ffns, originals):
            install(mlp, mods)
    return spec.to_dict()


def save_weights(folder: Path, weights: Dict[str, mx.array], total_parameters: int) -> None:
    """mlx-lm's ``save_model`` layout (shards + index), written here because its parameter
    count cannot read a quantized projection left with only a bias (a down_proj template)."""
    import json

    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values()),
                          "total_parameters": total_parameters}, "weight_map": {}}  # fmt: skip
    for i, shard in enumerate(shards):
        file = name.format(i + 1, len(shards))
        mx.save_safetensors(str(folder / file), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: file for k in shard})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


# ---------------------------------------------------------------- reading


def runs(idx: np.ndarray) -> np.ndarray:
    """Sorted unit indices → (first unit, count) rows, one per run of adjacent units."""
    idx = np.asarray(idx, np.int64)
    if len(idx) == 0:
        return np.zeros((0, 2), np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(idx) != 1) + 1])
    counts = np.diff(np.concatenate([starts, [len(idx)]]))
    return np.stack([idx[starts], counts], axis=1)


def read_spans(idx: np.ndarray, max_gap: int) -> np.ndarray:
    """(first unit, units spanned, kept units) of each positional read: runs of kept units
    merge into one read while the gap between them is at most ``max_gap`` units."""
    r = runs(idx)
    if len(r) == 0:
        return np.zeros((0, 3), np.int64)
    gaps = r[1:, 0] - (r[:-1, 0] + r[:-1, 1])
    first = np.concatenate([[0], np.flatnonzero(gaps > max_gap) + 1])
    last = np.concatenate([first[1:], [len(r)]]) - 1
    start = r[first, 0]
    span = r[last, 0] + r[last, 1] - start
    kept = np.add.reduceat(r[:, 1], first)
    return np.stack([start, span, kept], axis=1)


MAX_GAP_BYTES = 16 << 10  # skipping a smaller gap costs more (a syscall) than reading it
READ_THREADS = 8  # parallel positional reads for layers of at least 2 x READ_PER_THREAD
READ_PER_THREAD = 4 << 20
READ_CHUNK = 1 << 20
_POOL = []


def _pool():
    """The reader threads, made on first use and shared by every open unit file."""
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="ifp-read"))
    return _POOL[0]


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class UnitFile:
    """The open unit-bundled file: validated once at load, read with positional reads."""

    def __init__(self, folder: Path, spec: FileSpec):
        self.spec = spec
        self.path = Path(folder) / spec.file
        hint = "reconvert the model (ifp-convert SOURCE OUT)"
        if not self.path.is_file():
            raise IFPError(f"{folder}: the FFN unit file {spec.file} is missing; {hint}")
        self.fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        if size != spec.bytes:
            what = "truncated" if size < spec.bytes else "longer than declared"
            self.close()
            raise IFPError(
                f"{self.path}: {what} ({size} bytes, config.json says {spec.bytes}); {hint}"
            )
        head = os.pread(self.fd, len(MAGIC) + 16, 0)
        if head[: len(MAGIC)] != MAGIC or head[len(MAGIC) :].hex() != spec.id:
            self.close()
            raise IFPError(
                f"{self.path}: not the FFN file this config.json was written with "
                f"(id differs); {hint}"
            )
        self.identity = _identity(os.fstat(self.fd))
        self.bytes_read = 0  # kept units' bytes
        self.read_calls = 0
        self.gap_bytes = 0  # bytes of small gaps read into scratch (see read)
        self.max_gap_bytes = MAX_GAP_BYTES

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()

    def check(self) -> None:
        """The file must still be the one loaded (checked at each select): same size, same
        modification time, same inode at the folder's path, same header id. A file rewritten
        in place, even at the same size, would otherwise read as silent garbage."""
        st = os.fstat(self.fd)
        again = "; load the model again"
        if st.st_size != self.spec.bytes:
            raise IFPError(f"{self.path} changed size since the model was loaded "
                           f"({self.spec.bytes} → {st.st_size} bytes){again}")  # fmt: skip
        if _identity(st) != self.identity:
            raise IFPError(f"{self.path} was modified since the model was loaded{again}")
        try:
            named = _identity(os.stat(self.path))
        except OSError:
            named = None
        if named != self.identity:
            raise IFPError(f"{self.path} was replaced or removed since the model was loaded{again}")  # fmt: skip
        if os.pread(self.fd, len(MAGIC) + 16, 0)[len(MAGIC) :].hex() != self.spec.id:
            raise IFPError(f"{self.path}: its header changed since the model was loaded{again}")

    def verify(self) -> None:
        """Read every layer once and compare its CRC-32 with the one written at convert time
        (``load(verify_store=True)``, ``--verify-store``): corruption at rest, named by layer."""
        for i, layer in enumerate(self.spec.layers):
            if layer.crc32 is None:
                raise IFPError(f"{self.path}: this folder has no checksums (converted by an "
                               "older ifp-mlx); reconvert it to verify its units")  # fmt: skip
            crc, pos, step = 0, layer.offset, 1 << 24
            while pos < layer.end:
                chunk = os.pread(self.fd, min(step, layer.end - pos), pos)
                if not chunk:
                    break
                crc, pos = zlib.crc32(chunk, crc), pos + len(chunk)
            if crc != layer.crc32:
                raise IFPError(f"{self.path}: layer {i} ({layer.path}) fails its checksum: the "
                               "file is damaged; reconvert the model")  # fmt: skip

    def _read_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; returns the number of read calls it took."""
        done = calls = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            calls += 1
            if n <= 0:
                raise IFPError(
                    f"{self.path}: short read at byte {offset + done} (the file changed "
                    "since the model was loaded); load the model again"
                )
            done += n
        return calls

    def _read_batch(self, jobs: List[Tuple[memoryview, int]]) -> int:
        return sum(self._read_into(view, offset) for view, offset in jobs)

    def read(self, layer: int, idx: Optional[np.ndarray] = None) -> Dict[str, mx.array]:
        """The unit arrays of ``layer`` for the sorted units ``idx`` (None: every unit)."""
        return self.split(layer, self.read_records(layer, idx))

    def read_records(self, layer: int, idx: Optional[np.ndarray] = None) -> np.ndarray:
        """The kept units' records, (units, record bytes).

        One positional read per run of kept units, straight into a fresh buffer. Runs closer
        than ``max_gap_bytes`` share a read into a scratch span (at most one layer, dropped
        at once) from which the kept units are gathered: the OS reads whole pages anyway, and
        a syscall per tiny run would cost more than the gap. A layer of many MB is cut into
        ``READ_CHUNK`` pieces shared by up to ``READ_THREADS`` threads (``preadv`` releases
        the GIL): an SSD serves parallel reads faster than one stream (measured: Qwen 0.5B fp32
        cold select 1.9 s → 1.0 s here); for small layers threads only add overhead.
        """
        spec = self.spec.layers[layer]
        rec = spec.record
        idx = np.arange(spec.units) if idx is None else np.asarray(idx, np.int64)
        spans = read_spans(idx, self.max_gap_bytes // rec)
        buf = np.empty((len(idx), rec), np.uint8)
        merged = spans[spans[:, 1] != spans[:, 2]]
        scratch = np.empty((int(merged[:, 1].sum()), rec), np.uint8)
        jobs, gathers, pos, at = [], [], 0, 0
        for start, span, kept in spans.tolist():
            if span == kept:
                dest = buf[pos : pos + kept]
            else:
                dest = scratch[at : at + span]
                gathers.append((dest, idx[pos : pos + kept] - start, buf[pos : pos + kept]))
                at += span
            jobs.append((memoryview(dest).cast("B"), spec.offset + start * rec))
            pos += kept
        threads = min(READ_THREADS, sum(len(v) for v, _ in jobs) // READ_PER_THREAD)
        if threads > 1:  # long reads cut into chunks that the reader threads share
            jobs = [(v[c : c + READ_CHUNK], o + c) for v, o in jobs
                    for c in range(0, len(v), READ_CHUNK)]  # fmt: skip
            batches = [jobs[i::threads] for i in range(threads)]
            self.read_calls += sum(_pool().map(self._read_batch, batches))
        else:
            self.read_calls += self._read_batch(jobs)
        for src, local, dest in gathers:
            np.take(src, local, axis=0, out=dest)
        self.bytes_read += len(idx) * rec
        self.gap_bytes += int((spans[:, 1] - spans[:, 2]).sum()) * rec
        return buf

    def split(self, layer: int, buf: np.ndarray) -> Dict[str, mx.array]:
        """Records → one fresh MLX array per field (gate rows, up rows, down rows, scales...)."""
        spec = self.spec.layers[layer]
        records = buf.reshape(-1).view(spec.numpy_dtype())
        out = {}
        for f in spec.fields:  # a strided view would make MLX copy the whole record span
            a = mx.array(np.ascontiguousarray(records[f.name]))
            dtype = getattr(mx, f.dtype)
            out[f.name] = a if a.dtype == dtype else a.view(dtype)
        return out

    def drop_cache(self) -> None:
        """Evict the file from the OS page cache (for cold-read benchmarks; Linux only)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------- stores


def gather_resident(mods: Modules, idx: np.ndarray) -> Modules:
    """The kept rows of resident modules (lazy; evaluated with the rest of a selection)."""
    ids = mx.array(np.asarray(idx, np.int32))
    return build(mods, {n: mx.take(a, ids, axis=0) for n, a in unit_arrays(mods)})


class MemoryStore:
    """Every unit resident: the full layers are the model's own modules."""

    name = "memory"

    def __init__(self, layers: List[Modules]):
        self.layers = layers
        self.units = [d.weight.shape[0] for _, _, d in layers]  # unit-major down_proj

    bytes_read = read_calls = 0

    def check(self) -> None:
        pass

    def full(self, layer: int) -> Modules:
        return self.layers[layer]

    def gather(self, layer: int, idx: np.ndarray) -> Modules:
        if len(idx) == self.units[layer]:
            return self.layers[layer]
        return gather_resident(self.layers[layer], idx)

    scoring = resident_layer = full


class FlashStore:
    """No unit resident (except ``resident`` layers, e.g. a learned predictor's encoder):
    a selection reads exactly its kept units from the file."""

    name = "flash"

    def __init__(self, file: UnitFile, templates: List[Modules], resident: Sequence[int] = ()):
        self.file = file
        self.templates = templates
        self.units = [layer.units for layer in file.spec.layers]
        self.resident = {l: self._read(l, None) for l in resident}

    @property
    def bytes_read(self) -> int:
        return self.file.bytes_read

    @property
    def read_calls(self) -> int:
        return self.file.read_calls

    def check(self) -> None:
        self.file.check()

    def _read(self, layer: int, idx: Optional[np.ndarray]) -> Modules:
        return build(self.templates[layer], self.file.read(layer, idx))

    def full(self, layer: int) -> Modules:
        return self.resident.get(layer) or self._read(layer, None)

    def resident_layer(self, layer: int) -> Optional[Modules]:
        return self.resident.get(layer)

    def gather(self, layer: int, idx: np.ndarray) -> Modules:
        whole = len(idx) == self.units[layer]
        if layer in self.resident:
            return self.resident[layer] if whole else gather_resident(self.resident[layer], idx)
        return self._read(layer, None if whole else idx)

    def scoring(self, layer: int) -> Modules:
        """What a dense scoring pass runs: resident layers as they are, the rest streamed."""
        if layer in self.resident:
            return self.resident[layer]
        streamed = _StreamedLayer(self, layer)
        return tuple(StreamedProj(streamed, i) for i in range(3))


class _StreamedLayer:
    """One layer's full units, read when its gate projection runs and dropped after its down
    projection is evaluated: a dense pass over a flash store peaks at one layer's FFN."""

    def __init__(self, store: FlashStore, layer: int):
        self.store, self.layer, self.mods = store, layer, None

    def get(self) -> Modules:
        if self.mods is None:
            self.mods = self.store._read(self.layer, None)
        return self.mods


class StreamedProj(nn.Module):
    """A gate/up/down projection whose weights are read from the flash store per call."""

    ifp_streamed = True  # counts as a sliceable FFN projection (see model.is_ffn)

    def __init__(self, layer: _StreamedLayer, which: int):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a child module: no parameters
        self.which = which

    def __call__(self, x: mx.array) -> mx.array:
        y = self._layer.get()[self.which](x)
        if self.which == 2:  # down_proj ends the MLP: compute it, then let the units go
            mx.eval(y)
            self._layer.mods = None
        return y
