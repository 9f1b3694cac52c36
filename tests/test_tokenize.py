"""Tokenizing through Lightning prediction: two DDP ranks write their own shards, resume an
interrupted folder, and produce the same bytes as one single-process run."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.codes import CodeWriter, read_manifest
from tokenforge.tokenize import ShardBatchSampler
from tokenforge.tokenize import main as tokenize

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tokenize.py"


def test_shard_batches_never_cross_a_shard_boundary():
    batches = list(ShardBatchSampler([(0, 5), (10, 13)], batch_size=2))
    assert batches == [[0, 1], [2, 3], [4], [10, 11], [12]]


class SimulatedKill(RuntimeError):
    pass


def test_two_ddp_ranks_finish_an_interrupted_folder_with_single_process_bytes(tokenizer_and_codes, tmp_path,
                                                                              monkeypatch):
    ckpt, reference = tokenizer_and_codes  # written by one process: --shard-size 64 --batch-size 32
    out = tmp_path / "codes"
    original = CodeWriter.write_shard

    def dying_write(self, split, index, *args, **kwargs):
        if index == 1:
            raise SimulatedKill("killed while writing shard 1")
        return original(self, split, index, *args, **kwargs)

    monkeypatch.setattr(CodeWriter, "write_shard", dying_write)
    with pytest.raises(SimulatedKill):
        tokenize([str(ckpt), "--out", str(out), "--shard-size", "64", "--batch-size", "32"])
    assert sorted(p.name for p in out.glob("*.npy")) == ["train-00000.labels.npy", "train-00000.npy"]
    assert not read_manifest(out)["complete"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), str(ckpt), "--out", str(out), "--shard-size", "64", "--batch-size", "32",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in out.iterdir())  # no temporary files left either
    for name in names:
        if name != "manifest.json":
            assert filecmp.cmp(reference / name, out / name, shallow=False), f"{name} differs from one process"
    manifest, ref = read_manifest(out), read_manifest(reference)
    assert manifest["complete"] and manifest["splits"] == ref["splits"]
    # Shards 1 and 3 of train were rank 1's, 0 (resumed) and 2 rank 0's: all are listed.
    assert [s["index"] for s in manifest["splits"]["train"]["shards"]] == [0, 1, 2, 3]
