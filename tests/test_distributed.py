"""torch.distributed on the CPU (gloo): sharded prediction equals one process; a 2-rank torchrun
`run` gives a valid selection with its outputs written once, by rank 0."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import inputs_of, run_args

from beton_builder.beton import BetonFile
from ccfs_fast.data.readers import read_labels
from ccfs_fast.runs.config import Machine
from ccfs_fast.train.distributed import DistContext, shard
from ccfs_fast.train.models import create_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _predict_rank(rank: int, world: int, port: int, data: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from ccfs_fast.runs.workspace import open_workspace
    from ccfs_fast.train.distributed import init_distributed

    ctx, device = init_distributed("cpu")
    ws = open_workspace(inputs_of(data, teacher_model="convnet_small"), 4,
                        Machine(device=device, workers=1, eval_batch_size=64), ctx)
    torch.manual_seed(3)
    model = create_model("convnet_small", 10, 32)
    index, pred, logit = ws.predict_pool(model, np.arange(5, 700, 3))
    if ctx.is_main:
        np.savez(out, index=index, pred=pred, logit=logit)
    torch.distributed.destroy_process_group()


def test_shards_partition_in_order():
    idx = np.arange(11)
    parts = [shard(idx, DistContext(r, 3, r)) for r in range(3)]
    assert np.concatenate(parts).tolist() == idx.tolist() and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_prediction_equals_one_process(engine_data, tmp_path):
    out = str(tmp_path / "sharded.npz")
    mp.start_processes(_predict_rank, args=(2, _free_port(), engine_data, out), nprocs=2, join=True,
                       start_method="spawn")
    from ccfs_fast.runs.workspace import open_workspace

    ws = open_workspace(inputs_of(engine_data, teacher_model="convnet_small"), 4,
                        Machine(workers=1, eval_batch_size=64))
    torch.manual_seed(3)
    index, pred, logit = ws.predict_pool(create_model("convnet_small", 10, 32), np.arange(5, 700, 3))
    with np.load(out) as sharded:
        assert sharded["index"].tolist() == index.tolist() == list(range(5, 700, 3))
        assert sharded["pred"].tolist() == pred.tolist()
        np.testing.assert_allclose(sharded["logit"], logit, rtol=1e-5, atol=1e-5)


def _torchrun(args: list[str], cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"XDG_CACHE_HOME": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(_free_port()), "-m", "ccfs_fast.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_two_rank_torchrun_run(engine_data, tmp_path):
    """A 2-rank run (lazy coarse pass, the default) is valid and written once; a 2-rank run that
    differs only by --coarse-pass full selects the same images in the same order."""
    out = tmp_path / "ddp"
    proc = _torchrun(run_args(engine_data, out, "--workers", "1", "--num-eval", "1"), tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["phases"]) == 3
    # a cache of its own: the two ranks' lazy teacher pass predicted in the curricula (not all of the pool)
    assert metrics["totals"]["teacher_pass"] == "lazy" and metrics["phases"][0]["teacher_predicted"] > 0
    assert 64 < metrics["totals"]["teacher_predicted_this_run"] < 800
    assert all(p["coarse_pass"] == "lazy" and p["pool_evaluated"] <= p["pool_eligible"] for p in metrics["phases"])
    picked = np.array(json.loads((out / "selected_indices.json").read_text())["idx_selected"])
    labels = read_labels(BetonFile.open(engine_data["pool"]))
    assert len(np.unique(picked)) == len(picked) == 160
    assert (np.bincount(labels[picked], minlength=10) == 16).all()
    with np.load(out / "teacher_pass.npz") as tp:
        assert (tp["pred"][picked] == labels[picked]).all()
    # written once, by rank 0: one summary table on stdout, no leftover temp files
    assert proc.stdout.count("final:") == 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    full = tmp_path / "ddp-full"
    proc = _torchrun(run_args(engine_data, full, "--workers", "1", "--num-eval", "0", "--coarse-pass", "full"),
                     tmp_path / "cache-full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((full / "selected_indices.json").read_text())["idx_selected"] == picked.tolist()
