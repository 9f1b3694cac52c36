"""MaskGIT: schedules, training masks, the decode loop (instrumented), CFG and the Lightning prior."""

from __future__ import annotations

import math

import pytest
import torch

from stage2.maskgit import mask_counts, maskgit_decode, random_mask, remask_counts
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
