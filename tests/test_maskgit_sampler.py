"""MaskGIT's per-position sampler keeps the law of ``filter_logits`` + softmax while drawing only among the
top-k (when top-k alone filters) and by inverse CDF instead of ``torch.multinomial`` (issue 22's speed-up):
empirical frequencies against the exact filtered softmax, log-probabilities exact, ties at the k-th kept."""

from __future__ import annotations

import pytest
import torch

from stage2.maskgit import _categorical, _sample_tokens, maskgit_decode
from stage2.sampling import filter_logits

LOGITS = torch.tensor([[2.0, 1.5, 0.3, -0.4, 0.9, -2.0],
                       [0.1, 0.0, 3.0, 2.2, -1.0, 2.9],
                       [-1.0, -1.2, -0.7, -3.0, -0.8, -1.1]])


def _law(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    return torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8),
                                                     (1.0, 2, 0.9), (2.0, 5, None), (1.0, 1, None)])
def test_sampled_frequencies_and_log_probs_follow_the_filtered_softmax(temperature, top_k, top_p):
    draws = 20000
    rows = LOGITS.repeat(draws, 1)  # (draws * 3, V): row i is LOGITS[i % 3]
    tokens, logp = _sample_tokens(rows, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    law = _law(LOGITS, temperature, top_k, top_p)
    freq = torch.stack([torch.bincount(tokens.view(draws, 3)[:, i], minlength=6).double() / draws
                        for i in range(3)])
    assert (freq[law == 0] == 0).all()  # a filtered-out token is never drawn
    assert (freq - law.double()).abs().max() < 0.015  # 4 standard deviations of a frequency at 20k draws
    expected = torch.log(law).repeat(draws, 1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)


def test_ties_at_the_kth_logit_are_all_kept_as_filter_logits_does():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]]).repeat(6000, 1)
    tokens, logp = _sample_tokens(logits, 1.0, 2, None, torch.Generator().manual_seed(1))
    law = _law(logits[:1], 1.0, 2, None)[0]
    assert law[2] > 0 and set(tokens.unique().tolist()) == {0, 1, 2}
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    assert (freq - law.double()).abs().max() < 0.025
    torch.testing.assert_close(logp, torch.log(law)[tokens])


def test_greedy_takes_the_argmax_with_the_untempered_filtered_log_prob():
    tokens, logp = _sample_tokens(LOGITS, 0.0, 3, None, None)
    assert torch.equal(tokens, LOGITS.argmax(-1))
    expected = torch.log_softmax(filter_logits(LOGITS, 3, None), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)


def test_categorical_never_draws_a_zero_probability_token_and_takes_unnormalised_rows():
    probs = torch.tensor([[0.0, 0.5, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]]).repeat(5000, 1)
    drawn = _categorical(probs, torch.Generator().manual_seed(3)).view(5000, 2)
    assert set(drawn[:, 0].unique().tolist()) == {1, 3} and (drawn[:, 1] == 4).all()
    assert abs((drawn[:, 0] == 3).double().mean().item() - 0.75) < 0.025


def test_decode_with_nothing_masked_returns_the_start_unchanged():
    init = torch.randint(0, 7, (3, 10))
    calls = []

    def logits_fn(tokens, step):
        calls.append(step)
        return torch.randn(*tokens.shape, 7)

    out = maskgit_decode(logits_fn, 3, 10, 7, steps=3, top_k=2, init=init, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, init) and calls == [0, 1, 2]


def test_decode_from_a_partial_start_keeps_its_tokens_and_fills_every_mask():
    g = torch.Generator().manual_seed(4)
    table = torch.randn(12, 9, generator=g)
    init = torch.randint(0, 9, (5, 12), generator=g)
    init[:, 3:9] = 9  # the mask id: the middle is to be filled
    out = maskgit_decode(lambda tokens, step: table.expand(tokens.shape[0], -1, -1).clone(), 5, 12, 9, steps=4,
                         top_k=3, init=init, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :3], init[:, :3]) and torch.equal(out[:, 9:], init[:, 9:])
    filled = out[:, 3:9]
    assert (filled < 9).all() and (filled.unsqueeze(-1) == table[3:9].topk(3, -1).indices).any(-1).all()
