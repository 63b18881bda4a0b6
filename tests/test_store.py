"""The FFN unit file and the memory/flash stores: same selection → same bits, only the kept
units read, bad files refused at load, a file changed under a loaded model refused at select."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ifp_mlx
from ifp_mlx import store as store_mod
from ifp_mlx.convert import convert
from ifp_mlx.errors import IFPError
from ifp_mlx.model import find_ffns
from ifp_mlx.predictors.activation import ActivationPredictor
from tests.helpers import make_tiny_hf, read_config

TOKENS = [5, 17, 40, 9, 33, 70, 12, 88, 41, 6, 23, 54]


@pytest.fixture(scope="module", params=["float32", "q4", "bfloat16"])
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    src = make_tiny_hf("llama", root / "hf", seed=11)
    kind = request.param
    convert(src, root / "m", quantize=kind == "q4", q_bits=4, q_group_size=32,
            dtype="bfloat16" if kind == "bfloat16" else "float32", progress=False)  # fmt: skip
    return root / "m"


def run(model, tokens=TOKENS, steps=4):
    """Logits of a prompt and a few greedy steps through a KV cache (prefill and decode)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array(tokens)[None], cache=cache)[0, -1]]
    for _ in range(steps):
        out.append(model(mx.argmax(out[-1]).reshape(1, 1), cache=cache)[0, -1])
    return mx.stack(out)


def ffn_param_bytes(model) -> int:
    return sum(v.nbytes for _, m in find_ffns(model) for _, v in tree_flatten(m.parameters()))


def test_flash_equals_memory_bit_for_bit(folder):
    memory, _ = ifp_mlx.load(folder)
    flash, _ = ifp_mlx.load(folder, ffn_store="flash")
    assert (memory.ffn_store, flash.ffn_store) == ("memory", "flash")
    assert ffn_param_bytes(flash) == 0  # nothing of the FFN loaded
    dense = run(memory)
    assert mx.array_equal(run(flash), dense).item()  # no selection: units streamed
    for keep in (0.5, 0.25, [0.3, 0.8]):
        sel = memory.select(TOKENS, keep=keep, predictor="activation")
        got = flash.select(TOKENS, keep=keep, predictor="activation")  # streamed scoring
        assert all(np.array_equal(a, b) for a, b in zip(sel.indices, got.indices))
        assert mx.array_equal(run(flash), run(memory)).item()
        assert ffn_param_bytes(flash) == got.bytes == sel.bytes  # only the compact copy
    comp = ActivationPredictor(compensate=True)  # its bias from the streamed dense pass
    sel, got = memory.select(TOKENS, 0.5, comp), flash.select(TOKENS, 0.5, comp)
    assert sel.compensated and got.compensated
    assert mx.array_equal(run(flash), run(memory)).item()
    flash.dense()
    assert mx.array_equal(run(flash), dense).item()


def test_flash_reads_exactly_the_kept_units(folder, monkeypatch):
    flash, _ = ifp_mlx.load(folder, ffn_store="flash")
    file = flash._ifp_store().file
    file.max_gap_bytes = 0  # exact mode: one read per run of kept units
    spans = []
    real = os.preadv

    def preadv(fd, bufs, offset):
        n = real(fd, bufs, offset)
        spans.append((offset, n))
        return n

    monkeypatch.setattr(store_mod.os, "preadv", preadv)
    real_apply = type(flash).apply_selection

    def apply_selection(self, selection):  # only the reads that materialize the selection
        spans.clear()
        return real_apply(self, selection)

    monkeypatch.setattr(type(flash), "apply_selection", apply_selection)
    sel = flash.select(TOKENS, keep=0.5, predictor="activation")
    kept = set()
    for layer, idx in zip(file.spec.layers, sel.indices):
        for u in idx:
            kept.add((layer.offset + int(u) * layer.record, layer.record))
    # Every byte read belongs to a kept unit, and every kept unit was read once.
    read_units = set()
    for offset, n in spans:
        layer = next(l for l in file.spec.layers if l.offset <= offset < l.end)
        assert (offset - layer.offset) % layer.record == 0 and n % layer.record == 0
        for k in range(n // layer.record):
            unit = (offset + k * layer.record, layer.record)
            assert unit in kept and unit not in read_units
            read_units.add(unit)
    assert read_units == kept
    assert sel.bytes_read == sum(n for _, n in spans)
    runs = sum(1 + sum(b != a + 1 for a, b in zip(i[:-1], i[1:])) for i in sel.indices)
    assert sel.read_calls == len(spans) == runs  # one read per run of adjacent kept units


def test_merged_and_threaded_reads_gather_the_same_units(folder, monkeypatch):
    exact, _ = ifp_mlx.load(folder, ffn_store="flash")
    merged, _ = ifp_mlx.load(folder, ffn_store="flash")
    exact._ifp_store().file.max_gap_bytes = 0
    merged._ifp_store().file.max_gap_bytes = 1 << 30
    a = exact.select(TOKENS, keep=0.4, predictor="activation")
    b = merged.select(TOKENS, keep=0.4, predictor="activation")
    assert b.read_calls == len(a.indices) < a.read_calls  # one read per layer
    assert a.bytes_read == b.bytes_read  # kept bytes; gaps are counted apart
    assert mx.array_equal(run(exact), run(merged)).item()
    # Big layers: reads cut into chunks (not on record boundaries) shared by threads.
    monkeypatch.setattr(store_mod, "READ_PER_THREAD", 100)
    monkeypatch.setattr(store_mod, "READ_CHUNK", 333)
    for m in (exact, merged):
        m.release()
        c = m.select(TOKENS, keep=0.4, predictor="activation")
        assert c.read_calls > len(c.indices) and c.bytes_read == a.bytes_read
        assert mx.array_equal(run(m), run(merged if m is exact else exact)).item()


def test_runs_and_spans():
    idx = np.array([0, 1, 2, 5, 6, 10])
    assert store_mod.runs(idx).tolist() == [[0, 3], [5, 2], [10, 1]]
    assert store_mod.read_spans(idx, 0).tolist() == [[0, 3, 3], [5, 2, 2], [10, 1, 1]]
    assert store_mod.read_spans(idx, 2).tolist() == [[0, 7, 5], [10, 1, 1]]
    assert store_mod.read_spans(idx, 3).tolist() == [[0, 11, 6]]
    assert store_mod.runs(np.array([], np.int64)).shape == (0, 2)


def test_streamed_dense_pass_holds_one_layer(folder, monkeypatch):
    """The activation predictor's dense pass under flash reads each layer once and never
    holds two layers' full units at a time."""
    flash, _ = ifp_mlx.load(folder, ffn_store="flash")
    peak = [0]
    real_get = store_mod._StreamedLayer.get

    def get(self):
        mods = real_get(self)
        peak[0] = max(peak[0], sum(s.mods is not None for s in streamed))
        return mods

    monkeypatch.setattr(store_mod._StreamedLayer, "get", get)
    flash.release()
    streamed = {m.down_proj._layer for _, m in find_ffns(flash)}
    before = flash.ffn_io[0]
    flash.select(TOKENS, keep=0.5, predictor="activation")
    spec = flash._ifp_store().file.spec
    assert peak[0] == 1
    full = sum(l.units * l.record for l in spec.layers)
    assert flash.selection.score_bytes_read == full  # every layer read once to score
    assert flash.ffn_io[0] - before == full + flash.selection.bytes_read


def test_stats_line_and_per_turn_reads(folder):
    from ifp_mlx.chat import Conversation

    model, tok = ifp_mlx.load(folder, ffn_store="flash")
    last = list(ifp_mlx.stream_generate(model, tok, "w7 w8 w9", keep=0.5, max_tokens=3))[-1]
    assert last.ifp.store == "flash" and last.ifp.read_bytes > 0
    assert (
        "store flash, read" in last.ifp.line() and f"{last.ifp.read_calls} reads" in last.ifp.line()
    )
    dense = list(ifp_mlx.stream_generate(model, tok, "w7 w8", keep=1.0, max_tokens=2))[-1]
    assert "every unit in memory (dense), read" in dense.ifp.line()
    again = list(ifp_mlx.stream_generate(model, tok, "w7 w8", keep=1.0, max_tokens=2))[-1]
    assert again.ifp.read_bytes == 0  # already dense: nothing read
    assert "every unit in memory (dense)" in again.ifp.line() and "read" not in again.ifp.line()
    conv = Conversation(model, tok, keep=0.5, policy="per-turn")
    reads = []
    for text in ("w10 w11", "w12 w13"):
        for r in conv.ask(text, max_tokens=2):
            pass
        reads.append(r.ifp.read_bytes)
    assert all(r > 0 for r in reads)  # per-turn reselection reads again


def test_unit_file_replaces_ffn_in_safetensors(folder):
    weights = mx.load(str(folder / "model.safetensors"))
    assert not [k for k in weights if "mlp" in k and not k.endswith("down_proj.bias")]
    ifp = read_config(folder)["ifp"]
    assert ifp["format_version"] == 2 and ifp["ffn_store"]["layout"] == "unit-bundled"
    assert (folder / ifp["ffn_store"]["file"]).stat().st_size == ifp["ffn_store"]["bytes"]


# ---------------------------------------------------------------- bad files


@pytest.fixture
def copy(folder, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    return dst


def unit_file(folder):
    return folder / read_config(folder)["ifp"]["ffn_store"]["file"]


@pytest.mark.parametrize("ffn_store", ["memory", "flash"])
def test_truncated_unit_file(copy, ffn_store):
    f = unit_file(copy)
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(IFPError, match="truncated.*reconvert"):
        ifp_mlx.load(copy, ffn_store=ffn_store)
    f.unlink()
    with pytest.raises(IFPError, match="missing"):
        ifp_mlx.load(copy, ffn_store=ffn_store)


def test_swapped_unit_file(copy, tmp_path):
    other = tmp_path / "other"
    src = make_tiny_hf("llama", tmp_path / "hf2", seed=12)
    convert(src, other, progress=False, dtype=read_config(copy)["ifp"]["dtype"],
            quantize=bool(read_config(copy)["ifp"]["quantization"]), q_bits=4,
            q_group_size=32)  # fmt: skip
    shutil.copy(unit_file(other), unit_file(copy))  # same size, another model's units
    with pytest.raises(IFPError, match="not the FFN file"):
        ifp_mlx.load(copy, ffn_store="flash")


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s["layers"][0].update(units=s["layers"][0]["units"] + 1),
        lambda s: s["layers"][1]["fields"][0].__setitem__(2, [3]),
        lambda s: s["layers"][0]["fields"][0].__setitem__(1, "float64"),
        lambda s: s.update(layers="x"),
        lambda s: s.update(file="../model.safetensors"),
        lambda s: s["layers"].pop(),
        lambda s: s["layers"][0].update(path="model.layers.9.mlp"),
        lambda s: s["layers"][0]["quantization"].update(gate_proj={"bits": "4"}),
    ],
)
def test_ifp_block_that_does_not_match_its_files(copy, edit):
    config = read_config(copy)
    edit(config["ifp"]["ffn_store"])
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(IFPError, match="ffn_store|FFN file|truncated|longer"):
        ifp_mlx.load(copy, ffn_store="flash")


def test_file_changing_size_while_loaded(copy):
    model, tok = ifp_mlx.load(copy, ffn_store="flash")
    model.select(TOKENS, keep=0.5)
    with open(unit_file(copy), "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(IFPError, match="changed size.*load the model again"):
        model.select(TOKENS, keep=0.5)
    with pytest.raises(IFPError, match="changed size"):
        list(ifp_mlx.stream_generate(model, tok, "w7 w8", keep=0.25, max_tokens=2))


def test_old_folder_loads_with_memory_and_refuses_flash(copy):
    """A format-1 folder (FFN in safetensors): memory as before, flash a one-line error."""
    from mlx_lm.utils import save_config, save_model

    model, _ = ifp_mlx.load(copy)
    expected = run(model)
    config = read_config(copy)
    del config["ifp"]["ffn_store"]
    config["ifp"]["format_version"] = 1
    for f in copy.glob("model*.safetensors*"):
        f.unlink()
    unit_file(copy).unlink()
    save_model(copy, model)
    save_config(config, copy / "config.json")
    old, _ = ifp_mlx.load(copy)
    assert mx.array_equal(run(old), expected).item()
    with pytest.raises(IFPError, match="reconvert"):
        ifp_mlx.load(copy, ffn_store="flash")


def test_bad_store_name(folder):
    with pytest.raises(IFPError, match="memory, flash"):
        ifp_mlx.load(folder, ffn_store="disk")
