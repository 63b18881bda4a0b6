"""Pruning a model sharded over ``mx.distributed``: two local ranks under ``mlx.launch --backend
ring -n 2`` must compute what one process computes (tiny random models; seconds per launch)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ifp_mlx
from ifp_mlx.convert import convert
from ifp_mlx.distributed import split
from ifp_mlx.model import find_ffns
from tests.helpers import make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # a launch takes ~10 s; a hang must fail the test, not the CI job


def _free_port() -> int:
    """A port with the next one free too (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", **extra)
    return env


def launch(*command: str, n: int = 2, **kw) -> subprocess.CompletedProcess:
    """``mlx.launch --backend ring -n N -- COMMAND`` on this machine."""
    launcher = shutil.which("mlx.launch")
    assert launcher, "mlx.launch is not installed (pip install mlx)"
    args = [launcher, "--backend", "ring", "-n", str(n), "--starting-port", str(_free_port()),
            "--", *command]  # fmt: skip
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)  # fmt: skip


def _run(command: list, single: bool) -> None:
    if single:
        r = subprocess.run(command + ["--single"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=TIMEOUT)  # fmt: skip
    else:
        r = launch(*command)
    assert r.returncode == 0, r.stdout + r.stderr


# Every sharded run of the module, with its single-process reference where it has one: one
# launch and one process run them all (a launch costs ~20 s of imports and start-up).
RUNS = {  # name: (folder fixture, flags, single-process reference too)
    "f32": ("tiny", ["f32"], [], True),
    "flash": ("tiny", ["q4"], ["--store", "flash"], True),
    "balanced": ("tiny", ["f32"], ["--policy", "balanced"], False),
    "odd-balanced": ("odd", [], ["--keep", "0.6", "--policy", "balanced"], False),
    "odd-one": ("odd", [], ["--keep", "0.6"], None),
    "learned": ("odd", [], ["--predictor", "learned", "--temp", "1.0"], False),
    "learned-one": ("odd", [], ["--predictor", "learned"], None),
}


@pytest.fixture(scope="module")
def results(tiny, odd, tmp_path_factory):
    """name -> {"ranks": [rank 0, rank 1], "one": the single process's} for each of RUNS
    (``one`` only where the run has a reference; None marks a single-process-only run)."""
    root = tmp_path_factory.mktemp("dist-runs")
    folders = {"tiny": tiny, "odd": odd}
    lists = {True: [], False: []}  # single: argument lists
    for name, (fixture, sub, flags, single) in RUNS.items():
        folder = folders[fixture].joinpath(*sub)
        if single is not None:
            lists[False].append([str(folder), str(root / f"{name}-two"), *flags])
        if single is not False:
            lists[True].append([str(folder), str(root / f"{name}-one"), *flags])
    for single, runs in lists.items():
        path = root / f"runs-{single}.json"
        path.write_text(json.dumps(runs))
        _run([sys.executable, "-m", "tests.dist_worker", "--runs", str(path)], single)

    def read(stem: str, n: int):
        files = [root / f"{stem}.rank{i}" for i in range(n)]
        return [json.loads(f.read_text()) for f in files] if files[0].is_file() else None

    out = {}
    for name in RUNS:
        one = read(f"{name}-one", 1)
        out[name] = {"ranks": read(f"{name}-two", 2), "one": one[0] if one else None}
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny llama (4 heads, 2 KV heads: attention splits over 2 ranks), float32 and 4-bit."""
    root = tmp_path_factory.mktemp("dist")
    src = make_tiny_hf("llama", root / "hf", seed=7)
    convert(src, root / "f32", progress=False)
    convert(src, root / "q4", quantize=True, q_bits=4, q_group_size=32, progress=False)
    return root


def _kl(p_logits, q_logits) -> float:
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    lp = p - np.logaddexp.reduce(p)
    lq = q - np.logaddexp.reduce(q)
    return float((np.exp(lp) * (lp - lq)).sum())


def _check_against_single(one: dict, ranks: list) -> None:
    for r in ranks:
        # keep 1: the sharded model's last-token logits are the single-process model's
        assert np.abs(np.array(r["dense"]) - one["dense"]).max() <= 1e-4
        # global top-k: the single-machine selection and the same greedy answer
        assert r["indices"] == one["indices"]
        assert r["greedy"] == one["greedy"]
        assert np.abs(np.array(r["pruned"]) - one["pruned"]).max() <= 1e-4
        # a rank's compact FFN = the masked dense model (its units + the others' via all_sum)
        assert np.abs(np.array(r["pruned"]) - r["masked"]).max() <= 1e-4
    assert ranks[0]["dense"] == ranks[1]["dense"]  # bit-identical on every rank
    kept = [sum(k) for k in zip(ranks[0]["local_kept"], ranks[1]["local_kept"])]
    assert kept == [len(i) for i in one["indices"]]


def test_two_ranks_compute_the_single_process_model(results):
    one, ranks = results["f32"]["one"], results["f32"]["ranks"]
    _check_against_single(one, ranks)
    assert all(r["attention_sharded"] for r in ranks)


def test_flash_store_ranks_read_only_their_own_units(tiny, results):
    """4-bit, flash store: same results, and each rank reads exactly its kept units' records."""
    one, ranks = results["flash"]["one"], results["flash"]["ranks"]
    _check_against_single(one, ranks)
    # a unit's bytes: its gate/up/down rows with their scales and biases, as loaded in memory
    model, _ = ifp_mlx.load(tiny / "q4")
    records = []
    for _, mlp in find_ffns(model):
        mods = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        size = sum(m[k].nbytes for m in mods for k in ("weight", "scales", "biases") if k in m)
        records.append(size // mlp.gate_proj.weight.shape[0])
    for r in ranks:
        assert r["bytes_read"] == sum(k * b for k, b in zip(r["local_kept"], records))
    assert one["bytes_read"] == sum(r["bytes_read"] for r in ranks)


def test_balanced_policy_splits_the_work_evenly_and_its_kl_is_reported(results):
    glob, bal = results["f32"]["ranks"], results["balanced"]["ranks"]
    for layer, idx in enumerate(bal[0]["indices"]):
        k = len(idx)  # rank 0 takes the odd unit out, then each keeps its share of k
        assert [r["local_kept"][layer] for r in bal] == [(k + 1) // 2, k // 2]
        assert sum(i < 48 for i in idx) == (k + 1) // 2  # 96 units: rank 0 owns 0..47
    for r in bal:
        assert np.abs(np.array(r["pruned"]) - r["masked"]).max() <= 1e-4
    assert bal[0]["pruned"] == bal[1]["pruned"] and bal[0]["greedy"] == bal[1]["greedy"]
    kl_global = _kl(glob[0]["dense"], glob[0]["pruned"])
    kl_balanced = _kl(bal[0]["dense"], bal[0]["pruned"])
    print(f"\nlast-token KL to dense at keep 0.5: global {kl_global:.4f}, "
          f"balanced {kl_balanced:.4f}")  # fmt: skip
    assert np.isfinite(kl_balanced) and kl_balanced > 0


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """45 units a layer (ranks own 23 and 22), biases on gate/up/down, and a random learned
    predictor head in the folder."""
    import mlx.core as mx

    from ifp_mlx.predictors.learned import PredictorConfig, PredictorHead, save

    root = tmp_path_factory.mktemp("dist-odd")
    src = make_tiny_hf("llama", root / "hf", seed=11, intermediate_size=45, mlp_bias=True)
    out = root / "f32"
    convert(src, out, progress=False)
    mx.random.seed(5)
    head = PredictorHead(PredictorConfig([45, 45], 64, 1, 16))
    config = json.loads((out / "config.json").read_text())
    config["ifp"]["predictor"] = save(head, out)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_odd_units_biases_and_the_balanced_policy(results):
    """Under ``balanced`` each rank keeps its own share of an odd k (23 + 22 units a layer):
    the pruned model is the masked dense one, and down_proj's bias is added once."""
    one, bal = results["odd-one"]["one"], results["odd-balanced"]["ranks"]
    for r in bal:
        assert np.abs(np.array(r["dense"]) - one["dense"]).max() <= 1e-4
        assert np.abs(np.array(r["pruned"]) - r["masked"]).max() <= 1e-4
        assert r["indices"] == bal[0]["indices"] and r["greedy"] == bal[0]["greedy"]
    for layer, idx in enumerate(bal[0]["indices"]):
        assert len(idx) == 27 == round(0.6 * 45)
        assert [r["local_kept"][layer] for r in bal] == [14, 13]
        assert sum(i < 23 for i in idx) == 14 and all(0 <= i < 45 for i in idx)
        assert len(set(idx)) == 27


def test_learned_predictor_and_sampling_on_ranks(results):
    """The learned head scores whole layers on every rank: the ranks select what one process
    selects. Sampling without a seed: every rank draws the same tokens."""
    one, ranks = results["learned-one"]["one"], results["learned"]["ranks"]
    for r in ranks:
        assert r["indices"] == one["indices"]
        assert np.abs(np.array(r["pruned"]) - one["pruned"]).max() <= 1e-4
    assert ranks[0]["greedy"] == ranks[1]["greedy"] and len(ranks[0]["greedy"]) == 8


def test_generate_cli_under_mlx_launch_prints_the_single_process_answer_once(tiny):
    flags = ["--model", str(tiny / "f32"), "--prompt", "w7 w8 w9", "--keep", "0.5",
             "--max-tokens", "6"]  # fmt: skip
    one = subprocess.run(["ifp-generate", *flags], env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT)  # fmt: skip
    two = launch("ifp-generate", *flags, "--distributed")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout.strip() and two.stdout == one.stdout
    assert "2 ranks (global selection, attention split)" in two.stderr


def test_a_wrong_hostfile_is_one_error_after_the_timeout(tiny, tmp_path):
    """Rank 0 of 2 whose peer never comes: a clear error after $IFP_DIST_TIMEOUT, no hang."""
    port = _free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = _env(MLX_RANK="0", MLX_HOSTFILE=str(hostfile), IFP_DIST_TIMEOUT="3")
    tic = time.monotonic()
    r = subprocess.run(["ifp-generate", "--model", str(tiny / "f32"), "--prompt", "w7",
                        "--distributed"], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert time.monotonic() - tic < 45
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "the other ranks did not answer within 3 s" in r.stderr.strip().splitlines()[-1]


def test_a_rank_that_dies_is_one_error_on_the_others(tiny, tmp_path):
    """Two ranks started by hand; rank 1 is killed mid-chat: rank 0 says so and exits."""
    port = _free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    cmd = ["ifp-chat", "--model", str(tiny / "f32"), "--max-tokens", "4", "--distributed"]
    procs = [subprocess.Popen(cmd, env=_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    try:
        banner = procs[0].stdout.readline()
        assert "2 ranks" in banner
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        out, err = procs[0].communicate("w7 w8\n", timeout=60)
        assert procs[0].returncode == 1
        assert "Traceback" not in err
        assert "a rank stopped answering" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_one_rank_without_a_launcher_is_the_plain_model(tiny):
    """``distributed=True`` outside mlx.launch: a group of one, exactly the plain model."""
    import mlx.core as mx

    plain, _ = ifp_mlx.load(tiny / "f32")
    one, _ = ifp_mlx.load(tiny / "f32", distributed=True)
    assert one.sharding.size == 1 and not one.sharding.attention
    tokens = [5, 17, 40, 9, 33, 70, 12]
    a, b = plain.select(tokens, keep=0.5, predictor="activation"), one.select(
        tokens, keep=0.5, predictor="activation"
    )
    assert [i.tolist() for i in a.indices] == [i.tolist() for i in b.indices]
    x = mx.array(tokens)[None]
    assert mx.array_equal(plain(x), one(x)).item()


def test_split_and_policy_checks():
    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split(1, 2) == [(0, 1), (1, 1)]
    with pytest.raises(ifp_mlx.IFPError, match="shard policy"):
        ifp_mlx.load(None, distributed=True, shard_policy="fair")
