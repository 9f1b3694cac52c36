"""bench/moe_study.py trains what Prior.training_step trains: the NLL plus the routers' aux loss."""

from __future__ import annotations

import argparse

import pytest
import torch

from bench.moe_study import build, train_variant

SPEC = {"modality": "image", "grid": [2, 2], "codebook_size": 8, "depth": None, "continuous_dim": None}


def _data() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8, (16, 2, 2), generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return {"spec": SPEC, "num_classes": 3, "train": (x, y), "val": (x[:4], y[:4])}


def _one_step_by_hand(prior: str, data: dict, args: argparse.Namespace, with_aux: bool) -> torch.nn.Module:
    """The reference: one step of the study's loop written out, with or without the aux loss."""
    torch.manual_seed(0)
    model = build("token_choice", data["spec"], data["num_classes"], args, prior)
    configured = model.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured[0][0]
    xt, yt = data["train"]
    idx = torch.randint(0, len(xt), (args.batch_size,), generator=torch.Generator().manual_seed(0))
    out = model.loss(xt[idx], model.drop_labels(yt[idx]))
    (out.loss + out.aux["aux_loss"] if with_aux else out.loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return model


@pytest.mark.parametrize("prior", ["maskgit", "ar"])
def test_token_choice_trains_with_its_balance_loss(prior: str) -> None:
    data = _data()
    args = argparse.Namespace(dim=16, depth=1, steps=1, batch_size=8, eval_every=1)
    trained, record = train_variant("token_choice", 0, data, args, prior)
    with_aux = _one_step_by_hand(prior, data, args, with_aux=True)
    without = _one_step_by_hand(prior, data, args, with_aux=False)
    name = next(n for n, _ in trained.named_parameters() if "router" in n)
    got, want, other = (dict(m.named_parameters())[name] for m in (trained, with_aux, without))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, other, atol=1e-6)  # the aux loss moves the router: the test can tell
    assert record["parameters"] == sum(p.numel() for p in trained.parameters())
