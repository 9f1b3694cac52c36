"""The AR prior, its sampler (top-k/top-p/CFG), training on code files, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import SYNTHETIC_SPEC, write_synthetic_code_folder
from layers.instantiate import ConfigError
from stage1.tokenizer import CheckpointKindError
from stage2.ar import ARPrior
from stage2.prior import load_prior
from stage2.sampling import cfg_logits, filter_logits, sample_from_logits

SPEC = SYNTHETIC_SPEC
TINY = {"dim": 32, "depth": 2, "heads": 4}


def _draws(logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return sample_from_logits(logits.expand(n, -1), 1.0, g, **kw)


def test_top_k_never_samples_outside_the_k_largest():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)) * 0.3  # nearly flat
    allowed = set(logits[0].topk(5).indices.tolist())
    seen = set(_draws(logits, 4000, top_k=5).tolist())
    assert seen == allowed  # never outside, and all five are reachable
    assert set(_draws(logits, 200, top_k=1).tolist()) == {int(logits.argmax())}


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
    logits = probs.log()[torch.tensor([3, 0, 6, 1, 5, 2, 4])][None]  # shuffled order
    order = logits[0].argsort(descending=True).tolist()
    # mass 0.4 + 0.25 + 0.15 = 0.8 reaches top_p = 0.75 at the third most likely token
    seen = set(_draws(logits, 4000, top_p=0.75).tolist())
    assert seen == set(order[:3])
    seen = set(_draws(logits, 4000, top_k=2, top_p=0.99).tolist())  # top-k first, then nucleus
    assert seen == set(order[:2])
    assert set(_draws(logits, 100, top_p=1e-6).tolist()) == {order[0]}  # at least one token kept
    filtered = filter_logits(torch.full((2, 5), 1.0), top_p=0.5)
    assert torch.isfinite(filtered).sum(-1).min() >= 1


def test_temperature_zero_is_greedy_and_bad_arguments_fail():
    logits = torch.randn(6, 10)
    assert torch.equal(sample_from_logits(logits, 0.0), logits.argmax(-1))
    with pytest.raises(ValueError):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=1.5)


def test_cfg_convention():
    cond, uncond = torch.randn(4, 10), torch.randn(4, 10)
    assert cfg_logits(cond, uncond, 0.0) is cond
    torch.testing.assert_close(cfg_logits(cond, uncond, 2.5), uncond + 3.5 * (cond - uncond))


def _prior(**kw) -> ARPrior:
    params = {"code_spec": SPEC, "num_classes": 3, **TINY, **kw}
    return ARPrior(**params).eval()


def _sample(model: ARPrior, seed: int = 7, **kw) -> torch.Tensor:
    return model.sample(5, generator=torch.Generator().manual_seed(seed), **kw)


def test_cfg_scale_zero_equals_plain_conditional_sampling():
    model = _prior()
    cond = torch.tensor([0, 1, 2, 1, 0])
    plain = _sample(model, cond=cond)
    assert plain.shape == (5, 3, 3) and plain.min() >= 0 and plain.max() < 12
    assert torch.equal(_sample(model, cond=cond, cfg_scale=0.0), plain)
    assert torch.equal(_sample(model, cond=cond, use_cache=False), plain)  # cache = recomputation
    assert not torch.equal(_sample(model, seed=8, cond=cond), plain)  # the seed matters


def test_guided_greedy_sampling_follows_the_batched_cfg_formula():
    torch.manual_seed(2)
    model = _prior()
    with torch.no_grad():
        model.classes.table.weight.mul_(50)  # make the class matter so guidance changes the argmax
    cond = torch.tensor([0, 1, 2, 0, 1])
    codes = model.sample(5, cond=cond, temperature=0.0, cfg_scale=3.0)
    assert not torch.equal(codes, model.sample(5, cond=cond, temperature=0.0))
    with torch.no_grad():  # teacher-force the sampled codes through the cond and uncond branches
        lc, _ = model(codes, cond)
        lu, _ = model(codes, None)
    expected = (lc + 3.0 * (lc - lu)).argmax(-1)
    assert torch.equal(expected, codes.reshape(5, -1))


def test_unconditional_paths():
    model = _prior()
    codes = _sample(model)  # cond=None: the null class
    assert codes.shape == (5, 3, 3)
    assert torch.equal(_sample(model, cfg_scale=4.0), codes)  # nothing to guide towards
    uncond = _prior(num_classes=None)
    assert uncond.classes.table.num_embeddings == 1  # the learned start vector is the null row
    assert _sample(uncond, top_k=3, top_p=0.9).shape == (5, 3, 3)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.sample(2, cond=1)
    with pytest.raises(ValueError, match="class labels"):
        model.sample(2, cond=3)


# flat codes, residual levels (depth 3) and grouped codes (the groups axis plays depth in the code spec)
CACHE_SPECS = {
    "flat": {**SPEC, "grid": [2, 3]},
    "residual": {**SPEC, "grid": [2, 2], "depth": 3},
    "grouped": {**SPEC, "grid": [3, 1], "depth": 2},
}


@pytest.mark.parametrize("num_classes", [3, None])
@pytest.mark.parametrize("layout", sorted(CACHE_SPECS))
def test_cached_sampling_draws_from_the_teacher_forced_distribution(layout, num_classes, monkeypatch):
    """Issue 10: every step of KV-cached sampling (step 0 included) sees the logits of training, and
    cached and uncached sampling with one generator give the same codes, for every code layout."""
    import stage2.ar as ar

    torch.manual_seed(0)
    model = ARPrior(code_spec=CACHE_SPECS[layout], num_classes=num_classes, **TINY).eval()
    if model.embed.levels is not None:
        with torch.no_grad():  # level embeddings far from zero: a missing level term shows at once
            model.embed.levels.weight.normal_(0, 1.0)
    seen: list[torch.Tensor] = []
    real = ar.sample_from_logits
    monkeypatch.setattr(ar, "sample_from_logits", lambda logits, *a, **k: seen.append(logits) or real(logits, *a, **k))
    cond = torch.tensor([0, 1, 2, 1]) if num_classes else None
    codes = model.sample(4, cond=cond, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        forced, _ = model(codes, cond)
    stepwise = torch.stack(seen, dim=1)
    assert stepwise.shape == forced.shape == (4, model.seq_len, 12)
    torch.testing.assert_close(stepwise[:, 0], forced[:, 0], rtol=1e-5, atol=1e-5)  # the start token
    torch.testing.assert_close(stepwise, forced, rtol=1e-5, atol=1e-5)
    for seed in range(4):
        g = torch.Generator()
        cached = model.sample(4, cond=cond, generator=g.manual_seed(seed))
        assert torch.equal(model.sample(4, cond=cond, use_cache=False, generator=g.manual_seed(seed)), cached)


@pytest.mark.parametrize("positions", ["rope2d", "learned"])
def test_residual_codes_flatten_depth_minor_and_cache_matches(positions):
    spec = {**SPEC, "grid": [2, 3], "depth": 2}
    model = ARPrior(code_spec=spec, num_classes=None, positions=positions, **TINY).eval()
    codes = torch.randint(0, 12, (4, 2, 3, 2))
    logits, _ = model(codes)
    assert logits.shape == (4, 12, 12)
    # the first depth level of cell (0, 1) is token 2: it must not see the second level of that cell
    changed = codes.clone()
    changed[:, 0, 1, 1] = (changed[:, 0, 1, 1] + 1) % 12
    torch.testing.assert_close(model(changed)[0][:, :4], logits[:, :4], rtol=0, atol=0)
    a = _sample(model)
    assert a.shape == (5, 2, 3, 2)
    assert torch.equal(_sample(model, use_cache=False), a)


def test_load_prior_refuses_other_kinds(tmp_path):
    tok = tmp_path / "tok.ckpt"
    torch.save({"state_dict": {}, "tokenforge": {"kind": "tokenizer", "target": "stage1.vqvae.VQVAE"}}, tok)
    with pytest.raises(CheckpointKindError, match="tokenizer.*prior"):
        load_prior(tok)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}}, bare)
    with pytest.raises(CheckpointKindError, match="not a tokenforge checkpoint"):
        load_prior(bare)


def test_code_spec_resolves_from_manifest_into_hparams(tmp_path):
    folder = tmp_path / "codes"
    write_synthetic_code_folder(folder, n_train=8, n_val=4)  # the manifest is read by data.codes only
    model = ARPrior(codes=str(folder), **TINY)
    assert model.hparams["code_spec"] == SPEC and model.hparams["num_classes"] == 3
    assert model.hparams["tokenizer_path"] == "none.ckpt"
    (folder / "manifest.json").unlink()  # the stored hparams alone rebuild it
    rebuilt = ARPrior(**dict(model.hparams))
    assert rebuilt.num_classes == 3 and rebuilt.seq_len == 9
    assert ARPrior(codes=None, code_spec=SPEC, num_classes=0, **TINY).num_classes is None
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ARPrior(codes=str(folder), **TINY)
    with pytest.raises(ConfigError, match="codes"):
        ARPrior(**TINY)


def test_moe_ffn_adds_aux_loss_and_refuses_sequence_mixing_routers():
    moe = {"target": "layers.moe.MoE", "params": {"num_experts": 4, "top_k": 2, "hidden_dim": 32}}
    model = _prior(ffn=moe).train()
    batch = {"codes": torch.randint(0, 12, (4, 3, 3)), "label": torch.tensor([0, 1, 2, 0])}
    aux = model.loss(batch["codes"], batch["label"]).aux
    assert aux["aux_loss"] > 0 and any(k.startswith("layer0/") for k in aux)
    assert _sample(model.eval()).shape == (5, 3, 3)  # T=1 cached decoding through the MoE
    ec = {"target": "layers.moe.MoE",
          "params": {"num_experts": 4, "router": {"target": "layers.moe.ExpertChoiceRouter"}}}
    with pytest.raises(ValueError, match="causal"):
        _prior(ffn=ec)


def test_smoke_config_trains_with_falling_loss_and_checkpoint_round_trips(tmp_path):
    import csv

    from tokenforge.train import main

    codes = tmp_path / "codes"
    write_synthetic_code_folder(codes)
    trainer = main(["configs/smoke/ar.yaml", f"data.params.codes={codes}", "trainer.max_steps=40",
                    "--runs", str(tmp_path / "runs")])
    metrics = (tmp_path / "runs" / "ar" / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    rows = list(csv.DictReader(metrics))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(val) == 4 and val[-1] < val[0] - 0.1, val  # validated every 10 steps
    assert len(train) >= 4 and train[-1] < train[0] - 0.5, train
    assert val[-1] < math.log(12) - 1.0  # far below the uniform distribution over the codebook
    bits = [float(r["val/bits_per_token"]) for r in rows if r.get("val/bits_per_token")]
    assert bits == pytest.approx([v / math.log(2) for v in val])
    assert trainer.global_step == 40

    path = tmp_path / "runs" / "ar" / "checkpoints" / "last.ckpt"
    assert torch.load(path, weights_only=True)["tokenforge"]["kind"] == "prior"
    loaded = load_prior(path)  # rebuilt from the checkpoint alone, not the code folder
    assert isinstance(loaded, ARPrior) and not loaded.training
    assert loaded.num_classes == 3 and loaded.code_spec == SPEC and loaded.tokenizer_path == "none.ckpt"
    trained = trainer.lightning_module.eval()
    codes_batch, labels = torch.randint(0, 12, (4, 3, 3)), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes_batch, labels)[0], trained(codes_batch, labels)[0])
    g = torch.Generator().manual_seed(0)
    first = loaded.sample(4, cond=2, generator=g)
    assert torch.equal(first, trained.sample(4, cond=2, generator=g.manual_seed(0)))
