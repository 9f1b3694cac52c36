"""The train command: smoke configs, resume after interruption, DDP, clear data errors."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import tokenforge.train as train_mod
from helpers import CONFIGS, logged_series, train


class _InterruptAt(pl.Callback):
    """Sends SIGINT to this process after ``step`` optimiser steps (as Ctrl-C would)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class _RecordStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.opt_state = copy.deepcopy(trainer.optimizers[0].state_dict())  # Adam updates in place


def test_interrupted_run_resumes_at_same_step_with_same_optimizer_state(run_root, monkeypatch):
    cfg = CONFIGS / "smoke" / "vqvae.yaml"
    original = train_mod.build_trainer
    monkeypatch.setattr(train_mod, "build_trainer", lambda c, d, model=None: original(c, d, [_InterruptAt(7)], model))
    trainer = train(cfg, run_root, ["checkpoint_every_n_steps=1000"])
    stopped_at = trainer.global_step
    assert 7 <= stopped_at < 20, "the run should stop right after the signal, well before max_steps"
    last = run_root / "vqvae" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == stopped_at

    recorder = _RecordStart()
    monkeypatch.setattr(train_mod, "build_trainer", lambda c, d, model=None: original(c, d, [recorder], model))
    trainer = train(cfg, run_root, ["checkpoint_every_n_steps=1000"])
    assert recorder.step == stopped_at
    restored = recorder.opt_state["state"]
    for pid, state in saved["optimizer_states"][0]["state"].items():
        for k, v in state.items():
            assert torch.equal(restored[pid][k].cpu(), v), f"optimizer state {pid}.{k} differs after resume"
    assert trainer.global_step == 20
    run = run_root / "vqvae"
    assert (run / "logs" / "csv" / "metrics.csv").is_file(), "the first segment's log must survive the resume"
    assert (run / "logs" / "csv-resume1" / "metrics.csv").is_file()


def test_fresh_moves_the_old_run_aside(run_root):
    cfg = CONFIGS / "smoke" / "vqvae.yaml"
    train(cfg, run_root, ["trainer.max_steps=2", "trainer.val_check_interval=2"])
    from tokenforge.train import main

    main([str(cfg), "--runs", str(run_root), "--fresh", "trainer.max_steps=2", "trainer.val_check_interval=2"])
    assert len(list(run_root.glob("vqvae.old-*"))) == 1
    assert (run_root / "vqvae" / "checkpoints" / "last.ckpt").is_file()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "scripts" / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_missing_and_empty_image_folders_give_clear_errors(tmp_path):
    cfg = str(CONFIGS / "smoke" / "vqgan.yaml")
    missing = tmp_path / "no_such_folder"
    r = _cli("train.py", cfg, "--runs", str(tmp_path / "runs"), "data.params.dataset=folder",
             f"data.params.root={missing}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(missing) in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("train.py", cfg, "--runs", str(tmp_path / "runs"), "data.params.dataset=folder",
             f"data.params.root={empty}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(empty) in r.stderr and "Traceback" not in r.stderr


def test_two_process_ddp_counts_codes_of_both_ranks(tmp_path):
    cfg = str(CONFIGS / "smoke" / "vqvae.yaml")
    r = _cli("train.py", cfg, "--runs", str(tmp_path / "runs"), "trainer.strategy=ddp", "trainer.devices=2",
             "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=4",
             "data.params.limit_val=64", "trainer.num_sanity_val_steps=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, counted = logged_series(tmp_path / "runs" / "vqvae", keys=["val/codes_counted"])
    # 64 validation images, 7x7 codes each, split over two ranks: both halves must be counted.
    assert counted[-1] == 64 * 49, counted


def test_resuming_with_a_differently_shaped_model_names_the_fix(run_root):
    from layers.instantiate import ConfigError

    cfg = CONFIGS / "smoke" / "vqvae.yaml"
    train(cfg, run_root, ["trainer.max_steps=2", "trainer.val_check_interval=2"])
    with pytest.raises(ConfigError, match="--fresh"):
        train(cfg, run_root, ["trainer.max_steps=4", "model.params.embed_dim=4"])


# -- run-folder safety (issue 11) -------------------------------------------------------------------------
SHORT = ["trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint_every_n_steps=1000"]


def test_interrupt_leaves_a_single_last_checkpoint(run_root, monkeypatch):
    original = train_mod.build_trainer
    monkeypatch.setattr(train_mod, "build_trainer", lambda c, d, model=None: original(c, d, [_InterruptAt(3)], model))
    train(CONFIGS / "smoke" / "vqvae.yaml", run_root, ["checkpoint_every_n_steps=1000"])
    names = sorted(p.name for p in (run_root / "vqvae" / "checkpoints").iterdir())
    assert names == ["last.ckpt"], f"two saves of 'last' at interrupt: {names}"


def test_a_refused_resume_leaves_the_saved_config_untouched(run_root):
    from layers.instantiate import ConfigError

    cfg = CONFIGS / "smoke" / "vqvae.yaml"
    train(cfg, run_root, SHORT)
    saved = (run_root / "vqvae" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="--fresh"):
        train(cfg, run_root, [*SHORT, "model.params.embed_dim=4"])
    assert (run_root / "vqvae" / "config.yaml").read_text() == saved


def test_a_locked_run_folder_is_refused_and_a_stale_lock_is_taken_over(run_root):
    import json
    import socket

    from tokenforge.run_lock import RunFolderLockedError

    run = run_root / "vqvae"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    with pytest.raises(RunFolderLockedError, match=f"in use by process {os.getpid()}"):
        train(CONFIGS / "smoke" / "vqvae.yaml", run_root, SHORT)
    assert sorted(p.name for p in run.iterdir()) == [".lock"], "the refused run must not write anything"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    train(CONFIGS / "smoke" / "vqvae.yaml", run_root, SHORT)  # the owner is gone: taken over
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / ".lock").exists()


def test_a_truncated_last_checkpoint_names_fresh_or_falls_back_to_an_intact_one(run_root):
    from stage1.tokenizer import CorruptCheckpointError

    cfg = CONFIGS / "smoke" / "vqvae.yaml"
    train(cfg, run_root, SHORT)
    ckpts = run_root / "vqvae" / "checkpoints"
    last = ckpts / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="--fresh") as err:
        train(cfg, run_root, ["trainer.max_steps=4", "trainer.val_check_interval=2"])
    assert "\n" not in str(err.value) and "truncated" in str(err.value)

    (ckpts / "step2.ckpt").write_bytes(data)  # an intact older checkpoint
    with pytest.warns(UserWarning, match="newest intact checkpoint"):
        trainer = train(cfg, run_root, ["trainer.max_steps=4", "trainer.val_check_interval=2"])
    assert trainer.global_step == 4  # resumed at step 2, not restarted
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_checkpoints_are_renamed_into_place_from_beside_the_target(run_root, monkeypatch):
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((Path(src), Path(dst))) or real(src, dst))
    train(CONFIGS / "smoke" / "vqvae.yaml", run_root, SHORT)
    last = run_root / "vqvae" / "checkpoints" / "last.ckpt"
    into_last = [src for src, dst in renames if dst == last]
    assert into_last and all(src.parent == last.parent for src in into_last), renames


def test_a_failed_start_leaves_no_run_folder(run_root, tmp_path):
    with pytest.raises(FileNotFoundError):
        train(CONFIGS / "smoke" / "vqgan.yaml", run_root, ["data.params.dataset=folder",
                                                            f"data.params.root={tmp_path / 'missing'}"])
    assert not (run_root / "vqgan").exists()


def test_labels_beyond_the_priors_classes_are_refused_before_training(run_root, tmp_path):
    from helpers import write_synthetic_code_folder
    from layers.instantiate import ConfigError

    write_synthetic_code_folder(tmp_path / "codes")  # labels 0..2
    with pytest.raises((ConfigError, ValueError), match="num_classes"):
        train(CONFIGS / "smoke" / "ar.yaml", run_root, [f"data.params.codes={tmp_path / 'codes'}",
                                                        "model.params.num_classes=2", "trainer.max_steps=2"])


def test_starting_a_finished_run_again_leaves_its_checkpoint_bytes_alone(run_root):
    """Priors record their tokenizer's SHA-256; re-running a finished tokenizer run must not rewrite it."""
    from data.codes import sha256_file

    overrides = ["trainer.max_steps=2", "trainer.limit_val_batches=1"]
    train(CONFIGS / "smoke" / "vqvae.yaml", run_root, overrides, name="done")
    last = run_root / "done" / "checkpoints" / "last.ckpt"
    before = sha256_file(last)
    train(CONFIGS / "smoke" / "vqvae.yaml", run_root, overrides, name="done")
    assert sha256_file(last) == before
    train(CONFIGS / "smoke" / "vqvae.yaml", run_root, ["trainer.max_steps=3", "trainer.limit_val_batches=1"],
          name="done")
    assert sha256_file(last) != before  # a longer budget trains on and saves


def test_ddp_searches_unused_parameters_only_where_a_backward_leaves_some_out(tmp_path):
    from omegaconf import OmegaConf

    from helpers import write_synthetic_code_folder
    from layers.instantiate import instantiate

    def model(name: str, *overrides: str) -> pl.LightningModule:
        cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "smoke" / name), OmegaConf.from_dotlist(list(overrides)))
        spec = OmegaConf.to_container(cfg, resolve=True)["model"]
        return instantiate(spec, where="model")

    gan = model("vqgan.yaml")  # manual optimization: generator and discriminator backward apart
    assert train_mod.ddp_strategy_for("ddp", gan) == "ddp_find_unused_parameters_true"
    assert train_mod.ddp_strategy_for("ddp_spawn", gan) == "ddp_spawn"  # an explicit choice is kept
    assert train_mod.ddp_strategy_for("auto", gan) == "auto"
    plain = model("vqvae.yaml")
    assert plain.automatic_optimization and train_mod.ddp_strategy_for("ddp", plain) == "ddp"
    write_synthetic_code_folder(tmp_path / "codes")
    moe = model("ar_moe.yaml", f"data.params.codes={tmp_path / 'codes'}")  # an expert may receive no token in a step
    assert train_mod.ddp_strategy_for("ddp", moe) == "ddp_find_unused_parameters_true"


def test_vqgan_with_its_discriminator_on_trains_on_two_ddp_ranks(tmp_path):
    # Plain DDP refuses the discriminator step ("parameters that were not used in producing the loss").
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "train.py"), str(CONFIGS / "smoke" / "vqgan.yaml"),
                           "--runs", str(tmp_path), "--name", "gan", "model.params.disc_start=0",
                           "trainer.max_steps=2", "trainer.devices=2", "trainer.strategy=ddp",
                           "data.params.limit_val=4"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "gan" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 2
    _, d_losses = logged_series(tmp_path / "gan", ["train/d_loss"])  # the discriminator trained on both steps
    assert len(d_losses) == 2 and all(0.0 < v < 10.0 for v in d_losses)
