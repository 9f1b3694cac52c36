"""The RQ-Transformer prior: causality of both transformers, cached sampling, soft labels, training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import CONFIGS
from stage2.prior import load_prior
from stage2.rq_transformer import RQTransformer, residual_soft_codes

SPEC = {"grid": [2, 3], "depth": 3, "codebook_size": 10, "continuous_dim": None}
TINY = {"dim": 32, "spatial_layers": 2, "depth_layers": 2, "heads": 4}


def _model(**kw) -> RQTransformer:
    torch.manual_seed(0)
    params = {"code_spec": SPEC, "num_classes": 3, **TINY, **kw}
    return RQTransformer(**params).eval()


def _codes(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 10, (n, 2, 3, 3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("depth_input", ["cumsum", "previous"])
def test_changing_level_j_never_changes_logits_of_levels_up_to_j(depth_input):
    model = _model(depth_input=depth_input)
    codes, labels = _codes(), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        logits, _ = model(codes, labels)  # (B, T, D, K)
        assert logits.shape == (4, 6, 3, 10)
        for pos in (0, 4):
            for j in range(3):
                changed = codes.clone().view(4, 6, 3)
                changed[:, pos, j] = (changed[:, pos, j] + 3) % 10
                new, _ = model(changed.view_as(codes), labels)
                # the same position: levels <= j are predicted before level j is known
                assert torch.equal(new[:, pos, : j + 1], logits[:, pos, : j + 1])
                assert torch.equal(new[:, :pos], logits[:, :pos])  # earlier positions
                if j < 2:
                    assert not torch.allclose(new[:, pos, j + 1 :], logits[:, pos, j + 1 :])
                if pos < 5:  # later positions see the changed code through the spatial transformer
                    assert not torch.allclose(new[:, pos + 1 :], logits[:, pos + 1 :])


@pytest.mark.parametrize("num_classes,shared,depth_input,positions", [
    (3, True, "cumsum", "rope1d"), (None, True, "previous", "rope2d"), (3, False, "cumsum", "learned"),
])
def test_cached_and_uncached_sampling_draw_identical_codes(num_classes, shared, depth_input, positions):
    model = _model(num_classes=num_classes, shared_embedding=shared, depth_input=depth_input, positions=positions)
    cond = torch.tensor([0, 1, 2, 1]) if num_classes else None
    kw = {"cfg_scale": 1.5, "top_k": [8, 5, 3], "top_p": 0.95} if num_classes else {"top_k": 6}
    for seed in range(3):
        g = torch.Generator()
        cached = model.sample(4, cond=cond, generator=g.manual_seed(seed), **kw)
        assert cached.shape == (4, 2, 3, 3) and cached.min() >= 0 and cached.max() < 10
        assert torch.equal(model.sample(4, cond=cond, use_cache=False, generator=g.manual_seed(seed), **kw), cached)


@pytest.mark.parametrize("num_classes", [3, None])
def test_every_sampling_step_sees_the_teacher_forced_logits(num_classes, monkeypatch):
    """The sampler's (spatial + depth) KV-cached steps reproduce training's logits for the drawn codes."""
    import stage2.rq_transformer as rq

    model = _model(num_classes=num_classes)
    seen: list[torch.Tensor] = []
    real = rq.sample_from_logits
    monkeypatch.setattr(rq, "sample_from_logits", lambda logits, *a, **k: seen.append(logits) or real(logits, *a, **k))
    cond = torch.tensor([0, 2, 1]) if num_classes else None
    codes = model.sample(3, cond=cond, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        forced, _ = model(codes, cond)
    stepwise = torch.stack(seen, dim=1).view(3, 6, 3, 10)
    torch.testing.assert_close(stepwise, forced, rtol=1e-5, atol=1e-5)


def test_top_k_applies_per_level_and_cfg_needs_a_label():
    model = _model()
    with torch.no_grad():
        codes = model.sample(6, cond=1, top_k=[1, 10, 1], generator=torch.Generator().manual_seed(0))
        forced, _ = model(codes, torch.full((6,), 1))
    greedy = forced.argmax(-1).view(6, 2, 3, 3)
    assert torch.equal(codes[..., 0], greedy[..., 0]) and torch.equal(codes[..., 2], greedy[..., 2])
    with pytest.raises(ValueError, match="one per level"):
        model.sample(2, top_k=[1, 2])


def _tables(seed: int = 0) -> torch.Tensor:
    return torch.randn(10, 4, generator=torch.Generator().manual_seed(seed)).expand(3, -1, -1)


def test_soft_labels_follow_the_papers_formula():
    """Q_tau(k | r_d) = softmax_k(-||r_d - e_k||^2 / tau), r_0 = z_hat = sum_d e(c_d), r_{d+1} = r_d - e(c_d)."""
    tables, codes, tau = _tables(), _codes(2).view(-1, 3), 0.7
    soft, used = residual_soft_codes(tables, codes, tau)
    assert torch.equal(used, codes)
    book = tables[0]
    for n in range(codes.shape[0]):
        r = sum(book[c] for c in codes[n])
        for d in range(3):
            dist = torch.tensor([float(((r - book[k]) ** 2).sum()) for k in range(10)])
            torch.testing.assert_close(soft[n, d], torch.softmax(-dist / tau, 0), rtol=1e-4, atol=1e-6)
            r = r - book[codes[n, d]]


def test_soft_target_loss_and_its_gradient_match_the_formula():
    """Training loss = mean over codes of -sum_k Q(k) log p(k); its gradient wrt the logits is (p - Q)/N."""
    model = _model(soft_label_temperature=0.5).train()
    model.set_codebook(_tables()[0])
    codes = _codes()
    captured = {}
    real_forward = model.forward

    def forward(codes, labels=None):
        logits, aux = real_forward(codes, labels)
        logits.retain_grad()
        captured["logits"] = logits
        return logits, aux

    model.forward = forward
    out = model.loss(codes, torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    loss = out.loss
    soft = residual_soft_codes(model.codebook_tables, codes.view(-1, 3), 0.5)[0].reshape(-1, 10)
    logits = captured["logits"].detach().reshape(-1, 10)
    expected = -(soft * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    grad = (torch.softmax(logits, -1) - soft) / logits.shape[0]
    torch.testing.assert_close(captured["logits"].grad.reshape(-1, 10), grad, rtol=1e-4, atol=1e-7)


def test_stochastic_codes_are_drawn_from_q_tau_level_by_level():
    tables = _tables(3)
    codes = torch.tensor([[2, 5, 7]]).expand(20000, -1)
    soft, used = residual_soft_codes(tables, codes, 2.0, stochastic=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(used[:, 0], minlength=10).float() / used.shape[0]
    torch.testing.assert_close(freq, soft[0, 0], atol=0.015, rtol=0)  # level 0: r_0 = z_hat is fixed
    # the next level's target is computed from the residual of the code actually drawn
    rows = used[:, 0] != used[0, 0]
    assert not torch.allclose(soft[rows, 1], soft[0, 1].expand(int(rows.sum()), -1))
    # a vanishing temperature draws the nearest code: RQ of z_hat again
    _, cold = residual_soft_codes(tables, codes[:5], 1e-4, stochastic=True)
    near = torch.cdist(tables[0][codes[:5]].sum(1), tables[0]).argmin(-1)
    assert torch.equal(cold[:, 0], near)
    with pytest.raises(ValueError, match="soft_label_temperature"):
        _model(stochastic_codes=True)


def _write_residual_code_folder(folder: Path, n_train: int = 128, n_val: int = 32) -> None:
    """2x3 positions x 3 levels of 10 codes, 3 classes: a class pattern on level 0, the next levels
    follow from the previous one, plus 10% noise."""
    from data.codes import CodeWriter

    writer = CodeWriter(folder, SPEC, tokenizer_path="none.ckpt", tokenizer_sha256="0" * 64, shard_size=64)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = torch.arange(n) % 3
        base = (torch.arange(6)[None] * (labels[:, None] + 1)) % 10
        codes = torch.stack([base, (base * 3 + 1) % 10, (base + 7) % 10], dim=-1)
        noise = torch.rand(codes.shape, generator=g) < 0.1
        codes = torch.where(noise, torch.randint(0, 10, codes.shape, generator=g), codes).view(n, 2, 3, 3)
        for i in range(0, n, 64):
            writer.write_shard(split, i // 64, codes[i : i + 64], labels[i : i + 64])
    writer.finalize()


def test_smoke_config_trains_on_residual_codes_and_checkpoint_round_trips(tmp_path):
    from tokenforge.train import main

    codes = tmp_path / "codes"
    _write_residual_code_folder(codes)
    trainer = main([str(CONFIGS / "smoke" / "rq_transformer.yaml"), f"data.params.codes={codes}",
                    "--runs", str(tmp_path / "runs")])
    rows = list(csv.DictReader(open(tmp_path / "runs" / "rq_transformer" / "logs" / "csv" / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(val) == 4 and val[-1] < val[0] - 0.3, val
    assert train[-1] < train[0] - 0.5, train
    assert val[-1] < math.log(10) - 1.0
    levels = [float(rows[-1][f"val/nll_level{d}"] or "nan") for d in range(3)]
    per_level = [float(r[f"val/nll_level{d}"]) for r in rows for d in range(3) if r.get(f"val/nll_level{d}")]
    assert len(per_level) == 12 and sum(per_level[-3:]) / 3 == pytest.approx(val[-1], rel=1e-4), levels

    loaded = load_prior(tmp_path / "runs" / "rq_transformer" / "checkpoints" / "last.ckpt")
    assert isinstance(loaded, RQTransformer) and loaded.code_spec["depth"] == 3 and loaded.num_classes == 3
    trained = trainer.lightning_module.eval()
    g = torch.Generator()
    sample = loaded.sample(4, cond=2, top_k=5, generator=g.manual_seed(0))
    assert torch.equal(sample, trained.sample(4, cond=2, top_k=5, generator=g.manual_seed(0)))


def test_soft_labels_and_stochastic_codes_train_with_a_falling_loss():
    model = _model(soft_label_temperature=0.5, stochastic_codes=True).train()
    model.set_codebook(_tables()[0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = torch.arange(16) % 3
    base = (torch.arange(6)[None] * (labels[:, None] + 1)) % 10
    codes = torch.stack([base, (base + 3) % 10, (base + 5) % 10], -1).view(16, 2, 3, 3)
    losses = []
    for _ in range(30):
        loss = model.loss(codes, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


def test_flat_codes_are_depth_one():
    model = _model(code_spec={**SPEC, "depth": None})
    codes = model.sample(2, cond=0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 2, 3)
    logits, _ = model(codes, torch.tensor([0, 0]))
    assert logits.shape == (2, 6, 1, 10)
    nll = F.cross_entropy(logits.reshape(-1, 10), codes.reshape(-1))
    assert torch.isfinite(nll)
