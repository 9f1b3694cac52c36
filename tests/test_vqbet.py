"""VQ-BeT (issue 20, model half): the action tokenizer, the focal loss, the code and offset heads, the
observation-conditioned AR prior, checkpoints, and policies acting on raw observations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1.action_vq import ActionVQ
from stage2.observation_ar import ObservationARPrior
from stage2.prior import load_prior
from stage2.vqbet import VQBeT, focal_loss

CHUNK, ACT, OBS, HIST = 4, 2, 2, 3


def residual_spec(codebook_size: int = 8, depth: int = 2) -> dict:
    return {"target": "stage1.quantizers.residual.ResidualQuantizer",
            "params": {"depth": depth, "quantizer": {"target": "stage1.quantizers.vq.VectorQuantizer",
                                                     "params": {"codebook_size": codebook_size, "decay": 0.8,
                                                                "beta": 1.0, "restart_dead": True}}}}


def make_tokenizer(codebook_size: int = 8) -> ActionVQ:
    return ActionVQ(chunk=CHUNK, action_dim=ACT, quantizer=residual_spec(codebook_size), embed_dim=8, hidden_dim=32)


def save_checkpoint(model, path) -> str:
    """A checkpoint as the train command writes it (state, hyper-parameters, tokenforge metadata)."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def bimodal_batch(n: int = 64, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Observation histories and chunks whose sign follows the last observation (two modes) and whose
    magnitude varies continuously with it (what a coarse codebook cannot hold and an offset can)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    obs = torch.randn(n, HIST, OBS, generator=g)
    mode = torch.where(obs[:, -1, 0] > 0, 1.0, -1.0)
    ramp = torch.linspace(0.5, 1.0, CHUNK)
    first = mode[:, None] * ramp[None] * (1 + 0.5 * obs[:, -1, 1:2])
    second = obs[:, -1, 1:2] * ramp[None]
    return {"obs": obs, "actions": torch.stack([first, second], dim=-1)}


def vqbet(tokenizer_path: str, **kwargs) -> VQBeT:
    args = dict(obs_dim=OBS, history=HIST, tokenizer=tokenizer_path, dim=32, depth=2, heads=4, head_hidden=32,
                lr=3e-3, warmup_steps=0, dropout=0.0)
    return VQBeT(**{**args, **kwargs})


def fit(model, steps: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        codes, _, context = model.unpack_batch(bimodal_batch(64, seed=step))
        out = model.loss(codes, None, context)
        opt.zero_grad()
        (out.loss + out.aux["aux_loss"]).backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest, and on a shared 2-core machine two threads contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tiny ActionVQ fitted for a few steps on the bimodal chunks, saved as a tokenizer checkpoint."""
    torch.manual_seed(0)
    tok = make_tokenizer()
    tok.hparams.lr = 3e-3
    opt = tok.configure_optimizers()
    for step in range(150):
        x = bimodal_batch(64, seed=1000 + step)["actions"]
        xrec, q = tok(x)
        loss = F.l1_loss(xrec, x) + tok.hparams.quantizer_weight * q.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(tok.eval(), tmp_path_factory.mktemp("tok") / "tok.ckpt")


# --- focal loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_and_its_gradient_match_the_formula(gamma):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, 2, 2, 1, 3])
    loss = focal_loss(logits, target, gamma)
    (grad,) = torch.autograd.grad(loss, logits)
    # direct: p_t = softmax(z)_t, FL = mean -(1 - p_t)^γ log p_t
    z = logits.detach()
    p = z.exp() / z.exp().sum(1, keepdim=True)
    pt = p[torch.arange(6), target]
    expected = (-(1 - pt) ** gamma * pt.log()).mean()
    assert torch.allclose(loss.double(), expected, atol=1e-6)
    # dFL/dz_j = [γ (1-p_t)^(γ-1) p_t log p_t - (1-p_t)^γ] (δ_jt - p_j) / B
    onehot = F.one_hot(target, 5).double()
    scale = gamma * (1 - pt) ** (gamma - 1) * pt * pt.log() - (1 - pt) ** gamma if gamma else -torch.ones(6).double()
    expected_grad = scale[:, None] * (onehot - p) / 6
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6)
    if gamma == 0:  # γ = 0 is cross-entropy
        assert torch.allclose(loss.double(), F.cross_entropy(z, target), atol=1e-6)


# --- the tokenizer ------------------------------------------------------------------------------------
def test_residual_vq_over_chunks_round_trips_codes():
    tok = make_tokenizer(codebook_size=8).eval()
    # well separated first-level codes, small second-level ones: every (c0, c1) sum is decodable
    levels = tok.quantizer.quantizers
    with torch.no_grad():
        levels[0].embed.copy_(10 * torch.eye(8)[:, :8])
        levels[1].embed.copy_(0.5 * torch.eye(8)[:, :8].roll(1, 1) - 0.2)
    codes = torch.cartesian_prod(torch.arange(8), torch.arange(8))[:, None]  # (64, 1, 2)
    z = tok.quantizer.decode(codes)  # the codebook vectors' sums, (64, 8, 1)
    assert torch.equal(tok.quantizer.encode(z), codes)
    assert torch.allclose(tok.quantizer.decode(tok.quantizer.encode(z)), z)
    chunks = tok.decode(codes)
    assert chunks.shape == (64, CHUNK, ACT)
    spec = tok.code_spec
    assert (spec["grid"], spec["depth"], spec["codebook_size"], spec["modality"]) == ([1], 2, 8, "actions")
    assert tok.encode(chunks).shape == (64, 1, 2)


def test_tokenizer_learns_chunks_and_reports_usage_per_level(tokenizer_path):
    from stage1 import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    x = bimodal_batch(256, seed=7)["actions"]
    mse = F.mse_loss(tok.decode(tok.encode(x)), x)
    assert mse < 0.2 * x.var(), f"reconstruction MSE {mse:.3f} vs data variance {x.var():.3f}"
    _, q = tok(x)
    assert {"usage_level0", "usage_level1"} <= set(q.stats)
    assert q.stats["usage_level0"] > 0.2


# --- VQ-BeT --------------------------------------------------------------------------------------------
def test_secondary_head_uses_the_primary_code(tokenizer_path):
    model = vqbet(tokenizer_path).eval()
    f = torch.randn(3, model.dim)
    a = model.code_logits(f, 1, torch.tensor([[0, 0]] * 3))
    b = model.code_logits(f, 1, torch.tensor([[5, 0]] * 3))
    assert not torch.allclose(a, b), "changing the primary code must change the secondary logits"
    same = model.code_logits(f, 1, torch.tensor([[0, 7]] * 3))  # its own (later) code is not an input
    assert torch.allclose(a, same)
    independent = vqbet(tokenizer_path, condition_secondary=False).eval()
    assert torch.allclose(independent.code_logits(f, 1, torch.tensor([[0, 0]] * 3)),
                          independent.code_logits(f, 1, torch.tensor([[5, 0]] * 3)))


def test_vqbet_loss_is_the_papers_weighted_sum(tokenizer_path):
    model = vqbet(tokenizer_path, offset_codes="target", primary_weight=5.0, secondary_weight=0.5,
                  offset_weight=100.0, gamma=2.0).eval()
    codes, _, ctx = model.unpack_batch(bimodal_batch(16, seed=3))
    out = model.loss(codes, None, ctx)
    f, _ = model.features(ctx["obs"])
    c = codes[:, 0]
    fl0 = focal_loss(model.code_heads[0](f), c[:, 0], 2.0)
    fl1 = focal_loss(model.code_heads[1](torch.cat([f, F.one_hot(c[:, 0], 8).float()], 1)), c[:, 1], 2.0)
    table = model.offset_head(f).view(16, 2, 8, CHUNK, ACT)
    offset = table[torch.arange(16), 0, c[:, 0]] + table[torch.arange(16), 1, c[:, 1]]
    predicted = model.frozen_tokenizer.decode(codes) + offset
    expected = 5.0 * fl0 + 0.5 * fl1 + 100.0 * (predicted - ctx["actions"]).abs().mean()
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    nll = 0.5 * (F.cross_entropy(model.code_heads[0](f), c[:, 0])
                 + F.cross_entropy(model.code_heads[1](torch.cat([f, F.one_hot(c[:, 0], 8).float()], 1)), c[:, 1]))
    assert torch.allclose(out.nll, nll, rtol=1e-5)


def test_offset_head_corrects_the_decoded_chunk(tmp_path):
    """A codebook too coarse for the chunks (2 codes per level): the decoded chunk alone is far off,
    decoded + predicted offset comes much closer to the true actions."""
    torch.manual_seed(0)
    coarse = save_checkpoint(make_tokenizer(codebook_size=2).eval(), tmp_path / "coarse.ckpt")
    model = vqbet(coarse)
    losses = fit(model, 50)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    held_out = bimodal_batch(256, seed=999)
    obs, actions = held_out["obs"], held_out["actions"]
    with torch.no_grad():
        with_offset = model.predict_chunks(obs, temperature=0.0)
        decoded = model.predict_chunks(obs, temperature=0.0, use_offset=False)
    mse_offset, mse_decoded = F.mse_loss(with_offset, actions), F.mse_loss(decoded, actions)
    assert mse_offset < 0.25 * mse_decoded, f"decoded+offset {mse_offset:.4f} vs decoded {mse_decoded:.4f}"


def test_vqbet_trains_samples_and_acts_after_a_weights_only_round_trip(tokenizer_path, tmp_path):
    torch.manual_seed(0)
    model = vqbet(tokenizer_path)
    with torch.no_grad():  # statistics as the DataModule would hand them over: raw = 2 * normalised + 1
        model.observations.set(torch.ones(OBS), 2 * torch.ones(OBS))
    losses = fit(model, 40)
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    obs = bimodal_batch(8, seed=5)["obs"]
    codes = model.sample(8, context=obs, temperature=0.0)
    assert codes.shape == (8, 1, 2) and codes.max() < 8
    g1, g2 = (torch.Generator().manual_seed(1) for _ in range(2))
    assert torch.equal(model.sample(8, context=obs, generator=g1), model.sample(8, context=obs, generator=g2))
    path = save_checkpoint(model, tmp_path / "vqbet.ckpt")
    loaded = load_prior(path)
    assert isinstance(loaded, VQBeT)
    raw = 2 * obs + 1
    assert torch.allclose(loaded.act(raw, temperature=0.0), model.act(raw, temperature=0.0), atol=1e-5)
    chunk = loaded.policy(raw[0].numpy(), temperature=0.0)
    assert chunk.shape == (CHUNK, ACT) and chunk.dtype == np.float32


# --- the plain AR policy through the prior base --------------------------------------------------------
def test_observation_ar_prior_conditions_on_observations_and_learns(tokenizer_path):
    torch.manual_seed(0)
    model = ObservationARPrior(obs_dim=OBS, history=HIST, tokenizer=tokenizer_path, dim=32, depth=2, heads=4,
                               lr=3e-3, warmup_steps=0)
    assert model.seq_len == 2  # primary then secondary code of one chunk
    losses = fit(model, 60)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    codes, _, obs = model.unpack_batch(bimodal_batch(4, seed=11))
    logits, _ = model(codes, None, obs)
    other, _ = model(codes, None, -obs)
    assert not torch.allclose(logits, other), "the observations must change the code logits"
    assert model.sample(4, context=obs, temperature=0.0).shape == (4, 1, 2)
    assert model.policy(obs[0].numpy(), temperature=0.0).shape == (CHUNK, ACT)
    with pytest.raises(ValueError, match="observation histories"):  # not the code-grid context's message
        model.sample(4)


# --- with the real demonstrations and environment (data.actions) -------------------------------------
def test_policies_train_on_demonstrations_and_roll_out_in_the_environment(tmp_path):
    """Lightning fits on MountainCar chunks (the DataModule's statistics land in the checkpoint's
    buffers), then both policies run closed-loop in the environment for a few steps."""
    import pytorch_lightning as pl

    from data.actions import ActionChunkDataModule, heldout_seeds, rollout
    from stage2.observation_ar import ObservationARPrior

    def datamodule():
        return ActionChunkDataModule(env="mountain_car", num_episodes=4, seed=0, history=2, chunk=4, batch_size=32,
                                     cache_dir=str(tmp_path / "cache"), progress=False)

    def fit_steps(model, steps):
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
        trainer.fit(model, datamodule=datamodule())

    torch.manual_seed(0)
    tok = ActionVQ(chunk=4, env="mountain_car", quantizer=residual_spec(4), embed_dim=8, hidden_dim=16)
    fit_steps(tok, 3)
    stats = datamodule().stats
    assert torch.allclose(tok.actions.std, torch.as_tensor(stats["actions"]["std"]).float())
    tok_path = save_checkpoint(tok.eval(), tmp_path / "tok.ckpt")
    common = dict(env="mountain_car", history=2, tokenizer=tok_path, dim=16, depth=1, heads=2, warmup_steps=0)
    for model in (VQBeT(head_hidden=16, **common), ObservationARPrior(**common)):
        fit_steps(model, 3)
        assert torch.allclose(model.observations.mean, torch.as_tensor(stats["obs"]["mean"]).float())
        [result] = rollout(model.as_policy(temperature=1.0), "mountain_car", heldout_seeds(1), max_steps=10,
                           history=2)
        assert result.steps == 10 and result.actions.shape == (10, 1) and np.isfinite(result.actions).all()


@pytest.mark.parametrize("quantizer", [
    {"target": "stage1.quantizers.fsq.FSQ", "params": {"levels": [5, 3]}},
    {"target": "stage1.quantizers.residual.ResidualQuantizer",
     "params": {"depth": 2, "level_scale": 2.0,
                "quantizer": {"target": "stage1.quantizers.lfq.LFQ", "params": {"bits": 3}}}},
])
def test_any_zoo_quantizer_tokenizes_chunks_for_vqbet(quantizer, tmp_path):
    """A flat quantizer (FSQ: one code per chunk) or another residual one (LFQ levels) behind the same
    tokenizer, and VQ-BeT over its codes (one head for flat codes)."""
    torch.manual_seed(0)
    tok = ActionVQ(chunk=CHUNK, action_dim=ACT, quantizer=quantizer, embed_dim=2 if "fsq" in quantizer["target"]
                   else 3, hidden_dim=16)
    x = bimodal_batch(8, seed=1)["actions"]
    xrec, q = tok(x)
    xrec.square().mean().backward()  # gradients reach the encoder through the quantizer
    assert tok.encoder[0].weight.grad.abs().sum() > 0
    codes = tok.encode(x)
    depth = tok.code_spec["depth"]
    assert codes.shape == ((8, 1) if depth is None else (8, 1, depth))
    model = vqbet(save_checkpoint(tok.eval(), tmp_path / "tok.ckpt"))
    assert len(model.code_heads) == (depth or 1)
    fit(model, 2)
    assert model.predict_chunks(bimodal_batch(4, seed=2)["obs"], temperature=0.0).shape == (4, CHUNK, ACT)


def test_true_code_offsets_keep_the_mode_where_the_observations_do_not_tell_it(tokenizer_path):
    """Where the observations do not decide the mode (the first push of MountainCar), offsets trained at
    the *sampled* codes (official) learn to pull every code toward the median action, so a sampled
    left-code can come out as a right push; offsets trained at the *true* codes (``offset_codes:
    target``) are residuals within the code's mode and keep it."""
    def ambiguous_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
        batch = bimodal_batch(n, seed)
        g = torch.Generator().manual_seed(10_000 + seed)
        batch["actions"][..., 0] *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
        return batch

    kept = {}
    for offset_codes in ("sampled", "target"):
        torch.manual_seed(0)
        model = vqbet(tokenizer_path, offset_codes=offset_codes)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(50):
            codes, _, ctx = model.unpack_batch(ambiguous_batch(64, step))
            loss = model.loss(codes, None, ctx).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            f, _ = model.features(ambiguous_batch(512, 77)["obs"])
            codes = model.draw_codes(f, 1.0, torch.Generator().manual_seed(0))
            decoded = model._decode(codes)
            predicted = decoded + model.offsets(f, codes)
        same_sign = torch.sign(predicted[..., 0].mean(1)) == torch.sign(decoded[..., 0].mean(1))
        kept[offset_codes] = float(same_sign.float().mean())
    assert kept["target"] > 0.95, kept
    assert kept["target"] > kept["sampled"] + 0.15, kept
