"""Shared fixtures: deterministic seeds, few threads, isolated caches."""

from __future__ import annotations

import os

import pytest
import torch

# Keep the suite reproducible and friendly to 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def one_thread():
    """One intra-op thread for tests of tiny models (MLPs, small policies): they gain nothing from
    threads, and on a busy 2-core machine the threads' synchronisation cost 15x (0.13 s vs 2 s for 60
    MLP steps, measured in tests/test_actions_data.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def run_root(tmp_path):
    """A fresh parent folder for run folders."""
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """A small image folder (coloured shapes on varied backgrounds) in nested sub-folders."""
    import random

    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for i in range(24):
        img = Image.new("RGB", (80, 72), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.randrange(60), rng.randrange(50)
            box = (x0, y0, x0 + rng.randrange(10, 30), y0 + rng.randrange(10, 30))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tokenizer_and_codes(tmp_path_factory):
    """A tiny VQ-VAE trained on fashion_mnist and its code folder (train 256 / val 64 items)."""
    from helpers import train_and_tokenize

    return train_and_tokenize(tmp_path_factory.mktemp("e2e"), "vqvae", ["trainer.max_steps=12"])


@pytest.fixture(scope="session")
def klvae_and_latents(tmp_path_factory):
    """A tiny KL-VAE trained on fashion_mnist and its folder of float16 latents (train 256 / val 64 items)."""
    from helpers import train_and_tokenize

    return train_and_tokenize(tmp_path_factory.mktemp("latents"), "klvae",
                              ["trainer.max_steps=8", "model.params.disc_start=null"], name="kl")


@pytest.fixture(scope="session")
def vqvae2_and_codes(tmp_path_factory):
    """A tiny two-level VQ-VAE-2 (4x4 top over 8x8 bottom) trained on fashion_mnist at 16 px, and its
    hierarchical code folder (train 256 / val 64 items, labelled)."""
    from helpers import train_and_tokenize

    return train_and_tokenize(tmp_path_factory.mktemp("vqvae2"), "vqvae2", ["trainer.max_steps=12"])


@pytest.fixture(scope="session")
def action_tokenizer(tmp_path_factory):
    """A tiny behaviour tokenizer (configs/smoke/action_vq.yaml: MountainCar chunks) for action policies."""
    from helpers import CONFIGS, train

    root = tmp_path_factory.mktemp("actions")
    train(CONFIGS / "smoke" / "action_vq.yaml", root / "runs", ["trainer.max_steps=10"], name="tok")
    return root / "runs" / "tok" / "checkpoints" / "last.ckpt"
