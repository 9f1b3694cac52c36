"""Actions through the generic commands: the smoke behaviour tokenizer (configs/smoke/action_vq.yaml,
MountainCar demonstrations) trains a few steps, ``tokenize`` writes its chunk codes in split order,
and ``evaluate`` reports chunk reconstruction MSE/MAE and code usage per residual level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.actions import ActionChunkDataModule
from data.codes import CodeDataset
from helpers import CONFIGS, train
from stage1 import load_tokenizer
from tokenforge.evaluate import main as evaluate
from tokenforge.tokenize import main as tokenize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny policies: see conftest.one_thread


def test_split_dataloader_is_unshuffled_and_carries_each_items_position(tmp_path):
    dm = ActionChunkDataModule("mountain_car", num_episodes=4, history=2, chunk=3, batch_size=7,
                               cache_dir=str(tmp_path), progress=False)
    dm.setup("fit")
    seen = list(dm.split_dataloader("train"))
    index = torch.cat([b["index"] for b in seen])
    assert torch.equal(index, torch.arange(len(dm.split_dataset("train"))))
    assert torch.equal(torch.cat([b["x"] for b in seen]), dm.split_dataset("train").actions)
    assert "index" not in next(iter(dm.train_dataloader()))  # the training loaders stay as they were
    with pytest.raises(ValueError, match="split"):
        dm.split_dataloader("test")


def test_action_tokenizer_tokenizes_and_evaluates_end_to_end(tmp_path):
    data = [f"data.params.cache_dir={tmp_path / 'cache'}"]
    train(CONFIGS / "smoke" / "action_vq.yaml", tmp_path / "runs", ["trainer.max_steps=12", *data], name="tok")
    ckpt = tmp_path / "runs" / "tok" / "checkpoints" / "last.ckpt"
    codes = tmp_path / "codes"
    manifest = tokenize([str(ckpt), "--out", str(codes), "--shard-size", "64", "--batch-size", "16", *data])

    tok = load_tokenizer(ckpt).eval()
    dm = ActionChunkDataModule("mountain_car", num_episodes=6, history=2, chunk=4, cache_dir=str(tmp_path / "cache"),
                               progress=False)
    dm.setup("fit")
    for split in ("train", "val"):
        chunks = dm.split_dataset(split).actions
        assert manifest["splits"][split]["count"] == len(chunks) > 0
        stored = torch.stack([CodeDataset(codes, split)[i]["codes"] for i in range(len(chunks))])
        with torch.no_grad():
            assert torch.equal(stored.long(), tok.encode(chunks).long())  # same codes, in split order
    assert manifest["code_spec"]["modality"] == "actions"

    res = evaluate([str(ckpt), "--out", str(tmp_path / "ev"), "--json", str(tmp_path / "ev.json"), *data])
    val = dm.split_dataset("val").actions
    with torch.no_grad():
        rec = tok.decode(tok.encode(val)).clamp(-1, 1)
    assert res["num_examples"] == len(val)
    assert res["mse"] == pytest.approx(float(((rec - val) ** 2).mean()), rel=1e-4, abs=1e-7)
    assert res["mae"] == pytest.approx(float((rec - val).abs().mean()), rel=1e-4, abs=1e-7)
    for level in (0, 1):  # primary and secondary code: usage, perplexity and dead codes of each
        assert 0 < res[f"usage_level{level}"] <= 1 and res[f"perplexity_level{level}"] >= 1
        assert f"dead_codes_level{level}" in res
    assert (tmp_path / "ev" / "reconstructions.png").is_file() and (tmp_path / "ev" / "report.md").is_file()
    assert np.isfinite(res["mse"])
