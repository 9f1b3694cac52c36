"""MaskGIT: schedules, training masks, the decode loop (instrumented), CFG and the Lightning prior."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import SYNTHETIC_SPEC, write_synthetic_code_folder
from stage2.maskgit import MaskGITPrior, mask_counts, maskgit_decode, random_mask, remask_counts
from stage2.schedules import SCHEDULES, get_schedule, mask_ratio

# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_monotone_from_one_to_zero(name: str) -> None:
    r = torch.linspace(0, 1, 257, dtype=torch.float64)
    g = mask_ratio(name, r)
    assert g[0].item() == pytest.approx(1.0, abs=1e-9)
    assert g[-1].item() == pytest.approx(0.0, abs=1e-9)
    diffs = g[1:] - g[:-1]
    assert (diffs < 0).all(), f"{name} is not strictly decreasing"


def test_schedules_differ_and_have_expected_shape() -> None:
    # concave schedules keep more masked at mid-progress than linear; convex ones fewer
    mid = {n: float(mask_ratio(n, 0.5)) for n in SCHEDULES}
    assert mid["linear"] == pytest.approx(0.5)
    assert mid["cosine"] == pytest.approx(math.cos(math.pi / 4))
    for concave in ("cosine", "square", "cubic"):
        assert mid[concave] > 0.5
    for convex in ("sqrt", "log", "exp"):
        assert mid[convex] < 0.5
    assert len(set(round(v, 6) for v in mid.values())) == len(mid)


def test_unknown_schedule_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown mask schedule 'cosin'.*cosine"):
        get_schedule("cosin")


# ---------------------------------------------------------------- training masks


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exp"])
def test_training_mask_has_the_scheduled_count(schedule: str) -> None:
    g = torch.Generator().manual_seed(0)
    n = 37
    r = torch.rand(400, generator=g, dtype=torch.float64)
    r[:3] = torch.tensor([0.0, 1.0, 0.999999])  # extremes: all masked, and "none" clamped up to 1
    mask = random_mask(r, n, schedule, generator=g)
    expected = [max(1, min(n, math.ceil(float(get_schedule(schedule)(x)) * n))) for x in r]
    assert mask.sum(dim=1).tolist() == expected
    assert mask[0].all() and mask[1].sum() == 1
    # positions are spread uniformly: every position gets masked sometimes, none always
    freq = mask.float().mean(dim=0)
    assert (freq > 0.5 * freq.mean()).all() and (freq < 1.5 * freq.mean()).all()
    assert mask_counts(torch.tensor([0.5]), 10, "linear").item() == 5


# ---------------------------------------------------------------- decode loop


class RecordingModel:
    """A stand-in network: random but fixed logits per position, records every input it sees."""

    def __init__(self, n: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(n, vocab, generator=g) * 2
        self.inputs: list[torch.Tensor] = []

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.inputs.append(tokens.clone())
        return self.table.expand(tokens.shape[0], -1, -1).clone()


@pytest.mark.parametrize(
    "schedule,steps,n", [("cosine", 8, 16), ("linear", 5, 23), ("exp", 12, 9), ("cubic", 4, 64)]
)
def test_decode_never_remasks_a_fixed_token(schedule: str, steps: int, n: int) -> None:
    vocab, mask_id, batch = 11, 11, 6
    model = RecordingModel(n, vocab)
    out = maskgit_decode(
        model, batch, n, mask_id, steps=steps, schedule=schedule, generator=torch.Generator().manual_seed(1)
    )
    assert len(model.inputs) == steps  # exactly T model calls
    assert not (out == mask_id).any() and out.min() >= 0 and out.max() < vocab
    states = model.inputs + [out]
    assert (states[0] == mask_id).all()
    for t, (before, after) in enumerate(zip(states[:-1], states[1:])):
        fixed = before != mask_id
        assert torch.equal(after[fixed], before[fixed]), f"a fixed token changed or was re-masked at step {t}"
        masked_after = (after == mask_id).sum(dim=1)
        unknown_before = (before == mask_id).sum(dim=1)
        assert torch.equal(masked_after, remask_counts(t, steps, n, unknown_before, schedule))
        if t < steps - 1:
            # progress every step (until one token is left for the last step), one mask kept to the
            # end, and the schedule itself honoured wherever those two rules leave room
            assert ((masked_after < unknown_before) | (unknown_before == 1)).all()
            assert (masked_after >= 1).all()
            target = math.floor(float(get_schedule(schedule)(torch.tensor((t + 1) / steps))) * n)
            if 1 <= target < unknown_before.min():
                assert (masked_after == target).all()


def test_decode_fewer_tokens_than_steps_still_ends_unmasked() -> None:
    model = RecordingModel(3, 5)
    out = maskgit_decode(model, 2, 3, 5, steps=6, generator=torch.Generator().manual_seed(0))
    assert len(model.inputs) == 6 and not (out == 5).any()


def test_decode_greedy_without_choice_noise_takes_argmax() -> None:
    model = RecordingModel(10, 7, seed=3)
    out = maskgit_decode(model, 3, 10, 7, steps=4, temperature=0.0, choice_temperature=0.0)
    assert torch.equal(out, model.table.argmax(-1).expand(3, -1))
    # without choice noise the most confident positions are fixed first
    first = model.inputs[1][0] != 7
    conf = model.table.log_softmax(-1).max(-1).values
    assert conf[first].min() >= conf[~first].max()


def test_decode_top_k_and_temperature_restrict_tokens() -> None:
    model = RecordingModel(12, 9, seed=4)
    g = torch.Generator().manual_seed(2)
    out = maskgit_decode(model, 50, 12, 9, steps=3, top_k=2, temperature=1.5, generator=g)
    top2 = model.table.topk(2, dim=-1).indices
    assert (out.unsqueeze(-1) == top2).any(-1).all()
    assert (out != out[0]).any()  # sampling, not argmax


def test_decode_is_deterministic_under_a_seeded_generator() -> None:
    model = RecordingModel(16, 8)
    a = maskgit_decode(model, 4, 16, 8, generator=torch.Generator().manual_seed(5))
    b = maskgit_decode(model, 4, 16, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_decode_refuses_logits_that_include_the_mask() -> None:
    with pytest.raises(ValueError, match="mask id"):
        maskgit_decode(lambda tok, t: torch.zeros(*tok.shape, 9), 1, 4, 8, steps=2)


# ---------------------------------------------------------------- the prior

SPEC = SYNTHETIC_SPEC
TINY = {"dim": 32, "depth": 2, "heads": 4}


def _prior(**kw) -> MaskGITPrior:
    params = {"code_spec": SPEC, "num_classes": 3, **TINY, **kw}
    return MaskGITPrior(**params).eval()


def _sample(model: MaskGITPrior, seed: int = 7, n: int = 5, **kw) -> torch.Tensor:
    return model.sample(n, generator=torch.Generator().manual_seed(seed), **kw)


def test_prior_forward_calls_and_mask_token_layout() -> None:
    model = _prior()
    assert model.mask_id == 12 and model.embed.tokens.num_embeddings == 13 and model.head.out_features == 12
    assert model.classes.table.num_embeddings == 4 and model.null_class == 3
    calls = []
    original = model.forward
    model.forward = lambda tokens, *rest: calls.append(tokens.clone()) or original(tokens, *rest)
    codes = _sample(model, steps=5)
    assert codes.shape == (5, 3, 3) and codes.min() >= 0 and codes.max() < 12
    assert len(calls) == 5 and (calls[0] == 12).all()  # one forward per step, starting all-masked


def test_training_loss_is_cross_entropy_on_exactly_the_masked_positions() -> None:
    model = _prior(label_smoothing=0.0, cond_drop_prob=0.0)
    seen = {}
    original = model.forward

    def spy(tokens, labels=None, *rest):
        seen["tokens"], seen["labels"] = tokens.clone(), labels
        seen["logits"], aux = original(tokens, labels, *rest)
        return seen["logits"], aux

    model.forward = spy
    codes = torch.randint(0, 12, (8, 3, 3), generator=torch.Generator().manual_seed(0))
    batch = {"codes": codes, "label": torch.arange(8) % 3}
    model.train()
    out = model.loss(codes, batch["label"], generator=torch.Generator().manual_seed(4))
    loss, nll = out.loss, out.nll
    r = torch.rand(8, generator=torch.Generator().manual_seed(4))
    masked = seen["tokens"] == model.mask_id
    assert masked.sum(1).tolist() == mask_counts(r, 9, "cosine").tolist()
    flat = codes.reshape(8, 9)
    assert torch.equal(seen["tokens"][~masked], flat[~masked])  # visible tokens are the true codes
    expected = torch.nn.functional.cross_entropy(seen["logits"][masked], flat[masked])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected)
    assert torch.equal(seen["labels"], batch["label"])
    smooth = _prior(label_smoothing=0.2, cond_drop_prob=0.0)
    smooth.load_state_dict(model.state_dict())
    smooth.train()
    s_out = smooth.loss(codes, batch["label"], generator=torch.Generator().manual_seed(4))
    s_loss, s_nll = s_out.loss, s_out.nll
    torch.testing.assert_close(s_nll, nll)
    # same weights and masks, so the same logits: smoothing mixes in the mean NLL over all codes
    uniform = -seen["logits"][masked].log_softmax(-1).mean(-1).mean()
    torch.testing.assert_close(s_loss, 0.8 * expected + 0.2 * uniform)


def test_cfg_scale_zero_equals_plain_conditional_sampling() -> None:
    model = _prior()
    cond = torch.tensor([0, 1, 2, 1, 0])
    plain = _sample(model, cond=cond)
    assert torch.equal(_sample(model, cond=cond, cfg_scale=0.0), plain)
    assert torch.equal(_sample(model, cond=cond, cfg_scale=0.0, cfg_ramp=True), plain)
    assert not torch.equal(_sample(model, seed=8, cond=cond), plain)  # the seed matters
    assert torch.equal(_sample(model, cfg_scale=3.0), _sample(model))  # no cond: nothing to guide towards


def test_guided_one_step_greedy_decoding_follows_the_cfg_formula() -> None:
    torch.manual_seed(2)
    model = _prior()
    with torch.no_grad():  # large random weights: sharp, class- and position-dependent logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    cond = torch.tensor([0, 1, 2, 0, 1])
    kw = {"steps": 1, "temperature": 0.0, "choice_temperature": 0.0}
    codes = model.sample(5, cond=cond, cfg_scale=3.0, **kw)
    assert not torch.equal(codes, model.sample(5, cond=cond, **kw))
    masked = torch.full((5, 9), model.mask_id)
    with torch.no_grad():  # one step decides every token from the all-mask input
        lc, _ = model(masked, cond)
        lu, _ = model(masked, None)
    assert torch.equal(codes.reshape(5, 9), (lc + 3.0 * (lc - lu)).argmax(-1))


def test_cfg_ramp_raises_the_scale_linearly(monkeypatch) -> None:
    import stage2.maskgit as mg

    real = mg.cfg_logits
    scales: list[float] = []

    def spy(cond, uncond, scale):
        scales.append(scale)
        return real(cond, uncond, scale)

    monkeypatch.setattr(mg, "cfg_logits", spy)
    model = _prior()
    _sample(model, cond=1, steps=4, cfg_scale=2.0, cfg_ramp=True)
    assert scales == [0.5, 1.0, 1.5, 2.0]
    scales.clear()
    _sample(model, cond=1, steps=3, cfg_scale=2.0)
    assert scales == [2.0, 2.0, 2.0]


def test_unconditional_prior_and_bad_arguments() -> None:
    model = _prior(num_classes=None)
    assert model.classes.table.num_embeddings == 1 and model.null_class == 0
    assert _sample(model, top_k=3, steps=3).shape == (5, 3, 3)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, cond=1)
    with pytest.raises(ValueError, match="class labels"):
        _prior().sample(2, cond=3)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        _prior(mask_schedule="cosinus")
    with pytest.raises(ValueError, match="unknown mask schedule"):
        _prior().sample(2, schedule="nope")


@pytest.mark.parametrize("positions", ["rope2d", "learned", "rope1d"])
def test_residual_codes_flatten_over_depth(positions: str) -> None:
    spec = {**SPEC, "grid": [2, 3], "depth": 2}
    model = MaskGITPrior(code_spec=spec, num_classes=None, positions=positions, **TINY).eval()
    assert model.seq_len == 12
    codes = torch.randint(0, 12, (4, 2, 3, 2))
    logits, _ = model(codes)
    assert logits.shape == (4, 12, 12)
    with torch.no_grad():  # codes and their depth-minor flattening are the same input
        torch.testing.assert_close(model(codes.reshape(4, 12))[0], logits)
    # bidirectional: changing the last token changes the prediction at the first position
    changed = codes.clone()
    changed[:, -1, -1, -1] = (changed[:, -1, -1, -1] + 1) % 12
    assert not torch.allclose(model(changed)[0][:, 0], logits[:, 0])
    assert _sample(model, steps=4).shape == (5, 2, 3, 2)


def test_moe_ffn_slot_accepts_sequence_mixing_routers() -> None:
    topk = {"target": "layers.moe.MoE", "params": {"num_experts": 4, "top_k": 2, "hidden_dim": 32}}
    model = _prior(ffn=topk).train()
    batch = {"codes": torch.randint(0, 12, (4, 3, 3)), "label": torch.tensor([0, 1, 2, 0])}
    aux = model.loss(batch["codes"], batch["label"]).aux
    assert aux["aux_loss"] > 0 and any(k.startswith("layer0/") for k in aux)
    # expert choice looks at the whole sequence: refused by the causal AR prior, fine here
    ec = {"target": "layers.moe.MoE",
          "params": {"num_experts": 4, "router": {"target": "layers.moe.ExpertChoiceRouter"}}}
    assert _sample(_prior(ffn=ec), steps=3).shape == (5, 3, 3)


# ---------------------------------------------------------------- training through the front door


def test_smoke_config_trains_with_falling_loss_and_round_trips(tmp_path) -> None:
    import csv

    from stage2.prior import load_prior
    from tokenforge.train import main

    codes = tmp_path / "codes"
    write_synthetic_code_folder(codes)
    trainer = main(["configs/smoke/maskgit.yaml", f"data.params.codes={codes}", "trainer.max_steps=40",
                    "--runs", str(tmp_path / "runs")])
    assert trainer.global_step == 40
    rows = list(csv.DictReader(open(tmp_path / "runs" / "maskgit" / "logs" / "csv" / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(val) >= 2 and val[-1] < val[0] - 0.3, val
    assert train[-1] < train[0], train
    assert val[-1] < math.log(12) - 0.7  # well below the uniform distribution over the codebook

    path = tmp_path / "runs" / "maskgit" / "checkpoints" / "last.ckpt"
    meta = torch.load(path, weights_only=True)["tokenforge"]
    assert meta["kind"] == "prior" and meta["target"] == "stage2.maskgit.MaskGITPrior"
    loaded = load_prior(path)
    assert isinstance(loaded, MaskGITPrior) and not loaded.training
    assert loaded.num_classes == 3 and loaded.code_spec == SPEC and loaded.tokenizer_path == "none.ckpt"
    model = trainer.lightning_module.eval()
    batch = {"codes": torch.randint(0, 12, (4, 3, 3)), "label": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["codes"], batch["label"])[0],
                                   model(batch["codes"], batch["label"])[0])
    first = _sample(loaded, cond=2, n=4)
    assert torch.equal(first, _sample(model, cond=2, n=4))
    # the trained prior has learned the class patterns: greedy samples of class c follow (c+1)*i mod 12
    greedy = loaded.sample(3, cond=torch.arange(3), temperature=0.0, steps=4)
    pattern = (torch.arange(9)[None] * (torch.arange(3)[:, None] + 1)) % 12
    assert (greedy.reshape(3, 9) == pattern).float().mean() > 0.6
