"""The benchmark programs run end to end on a tiny model (numbers are not asserted: speed is
measured in benchmarks, not in tests)."""

import json
import subprocess
import sys

import pytest

from ifp_mlx.bench.speed import ideal_speedup


def test_ideal_speedup_formula():
    assert ideal_speedup(0.6, 1.0) == 1.0
    assert ideal_speedup(0.6, 0.5) == pytest.approx(1 / 0.7)


def q_bytes(rows: int, cols: int, bits: int = 4, group: int = 32) -> int:
    """An affine-quantized matrix: packed weights + float32 scales and biases per group."""
    return rows * cols * bits // 8 + 2 * rows * (cols // group) * 4


def tiny_q4_byte_share() -> float:
    """The FFN share of a decode step's weight bytes for ``tiny_q4`` (tests/helpers.tiny_config:
    hidden 64, FFN 96, 2 layers, 4 heads of 16, 2 KV heads, vocab 96, untied), by hand."""
    ffn = 3 * q_bytes(96, 64)  # gate, up, unit-major down: 96 units × 64
    attn = 2 * q_bytes(64, 64) + 2 * q_bytes(32, 64)  # q, o; k, v
    norms = 2 * 64 * 4
    total = 2 * (ffn + attn + norms) + 64 * 4 + 2 * q_bytes(96, 64)  # final norm, embed, head
    return 2 * ffn / total


def run_bench(*args):
    res = subprocess.run(
        [sys.executable, "-m", "ifp_mlx.apps.bench", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_speed_bench_runs(tiny_q4, tmp_path):
    out = run_bench(
        "speed",
        "--model",
        tiny_q4,
        "--prompt-tokens",
        "64",
        "--decode-tokens",
        "4",
        "--json",
        tmp_path / "s.json",
    )
    r = json.loads((tmp_path / "s.json").read_text())
    assert [round(row["keep"], 2) for row in r["rows"]] == [0.5, 0.33]
    f = tiny_q4_byte_share()
    assert r["ffn_byte_share"] == pytest.approx(f) and "ideal" in out
    for row in r["rows"]:
        assert row["ideal_speedup"] == pytest.approx(1 / (1 - f * (1 - row["kept"])))


def test_policy_bench_runs(tiny_q4, tmp_path):
    run_bench("policy", "--model", tiny_q4, "--answer-tokens", "4", "--json", tmp_path / "p.json")
    r = json.loads((tmp_path / "p.json").read_text())
    for policy in ("first-turn", "per-turn"):
        assert r[policy]["kl"] >= 0 and 0 <= r[policy]["agree"] <= 1


def test_bench_bad_keep(tiny_q4):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ifp_mlx.apps.bench",
            "speed",
            "--model",
            str(tiny_q4),
            "--keep",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "keep must be in (0, 1]" in res.stderr


def test_memory_bench_runs(tiny_q4, tmp_path):
    out = run_bench("memory", "--model", tiny_q4, "--max-tokens", "3", "--decode-tokens", "3",
                    "--rounds", "1", "--json", tmp_path / "m.json")  # fmt: skip
    r = json.loads((tmp_path / "m.json").read_text())
    assert set(r["cases"]) == {"dense", "memory", "flash", "flash-dense", "default"}
    default = r["cases"]["default"]  # no flags: the folder's keep, the flash store
    assert default["store"] == "flash" and default["keep"] == 0.5 and default["read_mb"] > 0
    assert "default" in out and r["default_vs_dense_peak"] > 0
    assert r["same_tokens_memory_flash"] and "flash saves" in out
    assert r["cases"]["memory"]["read_mb"] == 0 < r["cases"]["flash"]["read_mb"]
    assert r["cases"]["flash-dense"]["read_mb"] == pytest.approx(r["ffn_mb"])
    io = r["io"]
    assert io["exact"]["gap_mb"] == 0 and io["exact"]["kept_mb"] == io["merged"]["kept_mb"]
    assert io["merged"]["read_calls"] <= io["exact"]["read_calls"] == io["runs_file_order"]
    assert (tmp_path / "m.png").is_file() and str(tmp_path) not in json.dumps(r)
